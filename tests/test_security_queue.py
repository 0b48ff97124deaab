"""The training queue's routes, /webhook and /jobs, against unauthenticated requests (issue 22,
items 8 and 10): what they can make Redis hold, and their statuses.

The real app with a small real model and the real Redis (127.0.0.1:6379, db 8, flushed before
and after each test); the default enqueue (backend.jobs:enqueue_webhook, RQ).
"""
from __future__ import annotations

import pytest
import redis

from backend.app import create_app
from backend.bench import LABEL_CONFIG
from backend.config import Config

from .conftest import REDIS_DBS

REDIS_DB = REDIS_DBS["test_security_queue"]
QUEUE = "simclick-test-security-queue"


@pytest.fixture
def rdb(tmp_path):
    conn = redis.Redis(db=REDIS_DB)
    conn.flushdb()
    yield f"redis://127.0.0.1:6379/{REDIS_DB}", conn
    conn.flushdb()


def client(predictor, url, tmp_path, **env):
    env = {"REDIS_URL": url, "TRAINING_QUEUE": QUEUE, "DATA_DIR": str(tmp_path),
           **{k.upper(): str(v) for k, v in env.items()}}
    return create_app(Config.from_env(env), predictor).test_client()


def train(project: int) -> dict:
    return {"action": "START_TRAINING", "project": {"id": project}}


def annotation(project: int, ann_id: int = 7) -> dict:
    return {"action": "ANNOTATION_CREATED", "project": {"id": project}, "task": {"id": 3},
            "annotation": {"id": ann_id, "result": [{"type": "brushlabels", "value": {}}]}}


def setup(c, project: str) -> None:
    r = c.post("/setup", json={"project": project, "schema": LABEL_CONFIG})
    assert r.status_code == 200, r.get_json()


# -- 8: webhooks for unknown projects --------------------------------------------------------------
def test_webhooks_for_unknown_projects_create_nothing(tiny_predictor, rdb, tmp_path):
    """The attack: START_TRAINING for {"id": 987654321} queued a job and left simclick:pending:* and
    simclick:jobseq:* keys without expiry; ANNOTATION_CREATED for an unknown id created
    simclick:annotations:*. A project is known once Label Studio has connected it (/setup) or it
    has registry versions."""
    url, conn = rdb
    c = client(tiny_predictor, url, tmp_path, train_every_n_annotations=2)
    for project in range(987654321, 987654321 + 20):
        for body in (train(project), annotation(project), annotation(project, 8)):
            r = c.post("/webhook", json=body)
            assert r.status_code == 200 and r.get_json()["job"] is None, r.get_json()
            assert "unknown project" in r.get_json()["training"]
    assert conn.dbsize() == 0, sorted(conn.keys())[:10]
    assert not (tmp_path / "registry").exists() or not any((tmp_path / "registry").iterdir())
    # Still listed for the operator (in memory, WEBHOOK_HISTORY events at most).
    assert c.get("/webhook/events").get_json()["events"][-1]["project"] == 987654321 + 19


def test_webhooks_of_a_connected_project_enqueue_and_every_key_expires(tiny_predictor, rdb, tmp_path):
    url, conn = rdb
    c = client(tiny_predictor, url, tmp_path, train_every_n_annotations=2)
    setup(c, "5.1795584533")
    first = c.post("/webhook", json=annotation(5)).get_json()
    assert first["job"] is None and first["training"].startswith("1/2"), first
    job = c.post("/webhook", json=annotation(5, 8)).get_json()["job"]
    assert job and job.startswith("train-p5-")
    assert c.post("/webhook", json=train(5)).get_json()["job"] == job        # folded into it
    # Another replica (or this one after a restart) knows the project through Redis.
    other = client(tiny_predictor, url, tmp_path)
    assert other.post("/webhook", json=dict(train(5), stamp=1)).get_json()["job"] == job
    # Nothing a webhook or /setup wrote stays forever: the job's own hash and every simclick: key
    # expire (RQ's queue list and its registries hold job ids, which RQ drops with the jobs).
    keys = [k.decode() for k in conn.keys()]
    assert any(k.startswith("simclick:known:") for k in keys) and f"rq:job:{job}" in keys
    forever = [k for k in keys if (k.startswith(("simclick:", "rq:job:"))) and conn.ttl(k) < 0]
    assert forever == [], forever


# -- 10: job ids --------------------------------------------------------------------------------------
@pytest.mark.parametrize("job_id", ["a.b", "a%20b", "%2e%2e", "%C3%A9", "a:b", "x" * 300])
def test_a_job_id_that_is_not_one_is_400_not_503(tiny_predictor, rdb, tmp_path, job_id):
    """The attack: GET /jobs/a.b (also a%20b, %2e%2e, %C3%A9) answered 503 "the training queue is
    unreachable: ValueError" while Redis was up."""
    url, _ = rdb
    token = "admin-token-0123456789"
    c = client(tiny_predictor, url, tmp_path, admin_token=token)
    r = c.get(f"/jobs/{job_id}")
    assert r.status_code in (400, 404), (r.status_code, r.get_json())
    r = c.post(f"/admin/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code in (400, 404), (r.status_code, r.get_json())
    assert c.get("/jobs/train-p5-1-abcdef").status_code == 404          # a job id, no such job
