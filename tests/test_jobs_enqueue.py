"""Webhook -> RQ queue on the real Redis (127.0.0.1:6379, db 9 and 10, flushed before and after):
one job per delivery, folding into the pending job, the every-N-annotations trigger, the job status
route, the per-project lock, and Redis being down (webhook 503 with the reason, predictions still
served). The backend is the real Flask app with a small real model."""
from __future__ import annotations

import base64
import copy
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from backend.app import create_app
from backend.bench import keypoint, predict_body
from backend.config import Config
from backend import jobs
from backend.jobs.lock import waiting_for

from .conftest import REDIS_DBS

FIX = Path(__file__).parent / "fixtures" / "labelstudio"
QUEUE = "simclick-test-enqueue"


def capture(name):
    return json.loads((FIX / name).read_text())["body"]


@pytest.fixture
def rdb(request):
    db = getattr(request, "param", REDIS_DBS["test_jobs_enqueue"])
    conn = redis.Redis(db=db)
    conn.flushdb()
    yield f"redis://127.0.0.1:6379/{db}", conn
    conn.flushdb()


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    from model.predictor import Predictor
    return Predictor.load(str(tiny_checkpoint), coarse_size=128)


def make_app(predictor, tmp_path, **env):
    env = {"DATA_DIR": str(tmp_path), "TRAINING_QUEUE": QUEUE, **{k.upper(): str(v) for k, v in env.items()}}
    return create_app(Config.from_env(env), predictor)


def annotation_event(ann_id, cancelled=False, updated="2026-03-01T10:00:00Z", project=5):
    body = copy.deepcopy(capture("016_POST_webhook_ANNOTATION_CREATED.json"))
    body["annotation"]["id"] = ann_id
    body["annotation"]["was_cancelled"] = cancelled
    body["annotation"]["updated_at"] = updated
    body["project"]["id"] = project
    return body


def train_event(project=5, stamp="2026-03-01T10:00:00Z"):
    body = copy.deepcopy(capture("017_POST_webhook_START_TRAINING.json"))
    body["project"]["id"] = project
    body["project"]["updated_at"] = stamp
    return body


def connect_projects(c, *ids):
    """Label Studio connects a project with /setup; webhooks of other projects queue nothing."""
    for pid in ids:
        body = dict(capture("007_POST_setup.json"), project=f"{pid}.1795584533")
        assert c.post("/setup", json=body).status_code == 200


def queued_ids(conn):
    from rq import Queue
    return Queue(QUEUE, connection=conn).job_ids


def test_default_enqueue_follows_redis_url():
    assert Config.from_env({"REDIS_URL": "redis://h:6379/0"}).training_enqueue == "backend.jobs:enqueue_webhook"
    assert Config.from_env({"REDIS_URL": "redis://h:6379/0", "TRAINING_ENQUEUE": "off"}).training_enqueue == ""
    assert Config.from_env({}).training_enqueue == ""


@pytest.mark.e2e
def test_same_delivery_twice_is_one_job_and_triggers_fold(rdb, predictor, tmp_path):
    url, conn = rdb
    c = make_app(predictor, tmp_path, redis_url=url).test_client()
    connect_projects(c, 5, 6)
    t0 = time.perf_counter()
    r1 = c.post("/webhook", json=train_event())
    fast = time.perf_counter() - t0
    assert r1.status_code == 200, r1.get_json()
    job = r1.get_json()["job"]
    assert job.startswith("train-p5-") and r1.get_json()["training"] == "enqueued"
    assert fast < 1.0, f"the webhook took {fast:.2f} s; Label Studio waits about 1 s"
    r2 = c.post("/webhook", json=train_event())                       # the same delivery again
    assert r2.get_json()["job"] == job and "duplicate delivery" in r2.get_json()["training"]
    r3 = c.post("/webhook", json=train_event(stamp="2026-03-01T10:05:00Z"))   # a second press
    assert r3.get_json()["job"] == job and r3.get_json()["training"] == "folded into the pending job"
    assert queued_ids(conn) == [job]
    other = c.post("/webhook", json=train_event(project=6)).get_json()["job"]
    assert other != job and other.startswith("train-p6-") and queued_ids(conn) == [job, other]
    # Status over HTTP and the CLI's function.
    st = c.get(f"/jobs/{job}").get_json()
    assert (st["status"], st["stage"], st["percent"], st["project"], st["folded_triggers"]) == \
        ("queued", "queued", 0, "5", 1)
    assert [j["id"] for j in c.get("/jobs?project=5").get_json()["jobs"]] == [job]
    assert c.get("/jobs/nope").status_code == 404
    events = c.get("/webhook/events").get_json()["events"]
    assert [e.get("job") for e in events] == [job, job, job, other]
    # A job that failed or finished is no longer pending: the next trigger makes a new job.
    from rq.job import Job
    j = Job.fetch(job, connection=conn)
    j.set_status("failed")
    new = c.post("/webhook", json=train_event(stamp="2026-03-01T11:00:00Z")).get_json()["job"]
    assert new not in (job, other) and new.startswith("train-p5-")


@pytest.mark.e2e
@pytest.mark.parametrize("rdb", [REDIS_DBS["test_jobs_enqueue_lock"]], indirect=True)
def test_every_n_annotations_enqueues(rdb, predictor, tmp_path):
    url, conn = rdb
    c = make_app(predictor, tmp_path, redis_url=url, train_every_n_annotations=3).test_client()
    connect_projects(c, 5)
    answers = [c.post("/webhook", json=annotation_event(i)).get_json() for i in (1, 2)]
    assert [a["job"] for a in answers] == [None, None]
    assert [a["training"] for a in answers] == ["1/3 annotations until the next fine-tuning",
                                                "2/3 annotations until the next fine-tuning"]
    dup = c.post("/webhook", json=annotation_event(2)).get_json()          # redelivered: not counted
    assert dup["job"] is None and "duplicate" in dup["training"]
    skipped = c.post("/webhook", json=annotation_event(9, cancelled=True)).get_json()
    assert skipped["training"].startswith("not counted")
    third = c.post("/webhook", json=annotation_event(3)).get_json()
    assert third["job"] and third["training"] == "3 annotations: enqueued"
    assert queued_ids(conn) == [third["job"]]
    again = [c.post("/webhook", json=annotation_event(i)).get_json() for i in (4, 5, 6)]
    assert again[-1]["job"] == third["job"] and "folded" in again[-1]["training"]
    assert int(conn.get("simclick:annotations:5")) == 0
    off = make_app(predictor, tmp_path, redis_url=url).test_client()         # TRAIN_EVERY 0: count only
    a = off.post("/webhook", json=annotation_event(7)).get_json()
    assert a["job"] is None and "automatic fine-tuning is off" in a["training"]


def _data_uri(h=96, w=128):
    img = np.zeros((h, w, 3), np.uint8)
    img[30:70, 40:90] = (200, 60, 60)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_redis_down_webhook_503_predictions_served(predictor, tmp_path):
    c = make_app(predictor, tmp_path, redis_url="redis://127.0.0.1:1/0").test_client()
    t0 = time.perf_counter()
    r = c.post("/webhook", json=train_event())
    took = time.perf_counter() - t0
    assert r.status_code == 503, r.get_json()
    err = r.get_json()["error"]
    assert "could not enqueue the training job" in err and "ConnectionError" in err and "6379" not in err
    assert "Connection refused" in r.status or "connecting" in r.status      # the reason Label Studio shows
    assert took < 2.0
    p = c.post("/predict", json=predict_body(1, _data_uri(), [keypoint(64, 50, 128, 96)]))
    assert p.status_code == 200, p.get_json()
    assert p.get_json()["results"][0]["model_version"] == predictor.version
    assert c.get("/health").status_code == 200
    assert c.get("/jobs/x").status_code == 503
    # Nothing is lost: the job pulls every annotation, so a trigger after Redis is back covers it.
    events = c.get("/webhook/events").get_json()["events"]
    assert events[-1]["action"] == "START_TRAINING" and "could not enqueue" in events[-1]["error"]


@pytest.mark.e2e
@pytest.mark.parametrize("rdb", [REDIS_DBS["test_jobs_enqueue_lock"]], indirect=True)
def test_project_lock(rdb):
    url, conn = rdb
    a = jobs.ProjectLock(conn, "5", "job-a", ttl=1.0)
    b = jobs.ProjectLock(conn, "5", "job-b", ttl=1.0)
    other = jobs.ProjectLock(conn, "6", "job-c", ttl=1.0)
    a.acquire()
    assert b.try_acquire() == "job-a" and other.try_acquire() is None
    with pytest.raises(TimeoutError, match="job-a"):
        b.acquire(timeout=1.6, poll=0.2)            # a's heartbeat keeps it past its 1 s lease
    a.check()
    a.release()
    b.acquire(timeout=1)
    b._stop.set()                                   # b's worker "dies": no more heartbeats
    b._thread.join()
    assert jobs.ProjectLock(conn, "5", "job-b", ttl=1.0).try_acquire() is None   # the same owner takes over
    conn.pexpire("simclick:train-lock:5", 300)
    time.sleep(0.4)
    assert a.try_acquire() is None                  # the dead holder's lease ran out
    with pytest.raises(RuntimeError, match="lost the training lock"):
        b.check()
    a.release()
    other.release()
    # Owners are attempts: two attempts of one job are two owners (see test_jobs_attempts.py).
    first, second = jobs.attempt_owner("job-x"), jobs.attempt_owner("job-x")
    assert first != second and first.startswith("job-x/")
    assert "earlier attempt of this job" in waiting_for(first, "job-x", "5")
    assert waiting_for(first, "job-y", "5") == "project 5 is being trained by job job-x"
