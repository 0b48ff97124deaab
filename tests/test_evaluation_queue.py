"""Evaluation sharded over RQ workers (training/evaluation/sharded.py): two real `rq worker`
processes, Redis at 127.0.0.1:6379, the history on the real PostgreSQL; the merged numbers
equal a local run's."""
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from training.evaluation.cli import main
from training.evaluation.datasets import load_dataset
from training.evaluation.predictors import PredictorSpec
from training.evaluation.runner import evaluate_dataset

from .conftest import DATASETS, ROOT
from .test_evaluation_history import pg_url  # noqa: F401  (fixture: a fresh PostgreSQL database)

REDIS = "redis://127.0.0.1:6379/0"


def redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


pytestmark = [pytest.mark.e2e,  # real Redis, PostgreSQL and rq worker processes
              pytest.mark.skipif(not redis_up(), reason="no Redis at 127.0.0.1:6379"),
              pytest.mark.skipif(not (DATASETS / "GrabCut").is_dir(), reason="no GrabCut data")]


def run_workers(queue: str, n: int = 2):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    rq = [sys.executable, "-c", "import sys; from rq.cli import main; sys.exit(main())"]
    # SimpleWorker: jobs run in the worker process (torch imported once: seconds per job less).
    procs = [subprocess.Popen(rq + ["worker", "--burst", "-w", "rq.worker.SimpleWorker", "-u", REDIS,
                                    "--name", f"{queue}-{i}", queue],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    return logs


@pytest.fixture
def queue():
    """A queue of its own; its jobs (kept 7 days by default) are deleted afterwards."""
    import redis
    from rq import Queue
    from rq.job import Job
    from rq.registry import FailedJobRegistry, FinishedJobRegistry

    name = f"simclick-eval-test-{uuid.uuid4().hex[:8]}"
    yield name
    conn = redis.Redis.from_url(REDIS)
    q = Queue(name, connection=conn)
    ids = set(q.job_ids) | set(FinishedJobRegistry(queue=q).get_job_ids()) | set(FailedJobRegistry(queue=q).get_job_ids())
    for job in Job.fetch_many(list(ids), connection=conn):
        if job is not None:
            job.delete()
    q.delete(delete_jobs=True)


def test_shards_on_two_workers_equal_a_local_run(pg_url, tiny_checkpoint, capsys, queue):  # noqa: F811
    args = ["--checkpoint", str(tiny_checkpoint), "--datasets", "GrabCut,Berkeley", "--limit", "2",
            "--data-root", str(DATASETS), "--db", pg_url, "--queue", "--queue-name", queue, "--shard-size", "1",
            "--redis-url", REDIS, "--no-progress", "--tag", "sharded"]
    assert main(args) == 0
    group = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["merge", group, "--db", pg_url]) == 3                  # nothing run yet: refused
    assert "0 of 4 shards" in capsys.readouterr().err

    logs = run_workers(queue)
    Path(os.environ.get("SIMCLICK_TEST_RQ_LOG", os.devnull)).write_text("\n".join(logs))
    assert sum(log.count("Job OK") for log in logs) == 4, logs        # 2 data sets x 2 shards
    assert main(["merge", group, "--db", pg_url, "--json"]) == 0
    merged = {m["dataset"]: m for m in map(json.loads, capsys.readouterr().out.strip().splitlines())}

    predictor = PredictorSpec(str(tiny_checkpoint))()
    for name in ("GrabCut", "Berkeley"):
        local = evaluate_dataset(predictor, load_dataset(name, DATASETS, 2), dataset=name, progress=False).metrics()
        m = merged[name]
        assert m["instances"] == 2 and m["group"] == group
        for k in ("noc85", "noc90", "nof90", "miou"):
            assert m[k] == local[k], (name, k)

    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        rows = c.execute(sa.text("select dataset, shard, start, stop, per_instance from evaluation_shards "
                                 "where group_id = :g order by dataset, shard"), {"g": group}).all()
        assert [(r.dataset, r.shard, r.start, r.stop) for r in rows] == \
            [("Berkeley", 0, 0, 1), ("Berkeley", 1, 1, 2), ("GrabCut", 0, 0, 1), ("GrabCut", 1, 1, 2)]
        assert all(len(p["ious"]) >= 20 and len(p["clicks"]) == len(p["ious"]) for r in rows for p in r.per_instance)
        runs = c.execute(sa.text("select id, dataset, tag, instances from evaluation_runs order by id")).all()
    eng.dispose()
    assert sorted((r.dataset, r.tag, r.instances) for r in runs) == [("Berkeley", "sharded", 2), ("GrabCut", "sharded", 2)]
    # Merging again shows the same stored runs, adds none.
    assert main(["merge", group, "--db", pg_url, "--json"]) == 0
    again = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert sorted(m["run_id"] for m in again) == sorted(r.id for r in runs)
    assert main(["history", "--db", pg_url, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_queue_needs_redis_and_an_unknown_group_is_an_error(pg_url, capsys, monkeypatch):  # noqa: F811
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["--checkpoint", "oracle", "--datasets", "GrabCut", "--limit", "1", "--db", pg_url,
                 "--data-root", str(DATASETS), "--queue"]) == 2
    assert "REDIS_URL" in capsys.readouterr().err
    assert main(["merge", "nosuchgroup", "--db", pg_url]) == 2
    assert "no evaluation group" in capsys.readouterr().err
