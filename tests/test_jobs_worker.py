"""Real worker processes (`python -m backend.jobs worker --burst`) on the real Redis (db 11, 12),
fine-tuning a small real model on Label Studio-format exports of training images (SOD masks on
BSDS500 images; never a benchmark image):

- a worker killed mid-training: the job is failed, the registry and the served model are
  unchanged; `retry` resumes the job from its saved state, and it registers a version with its
  numbers (promoted or kept, as the rule says), which the backend then serves (or not);
- two workers on one queue never train the same project at once: the second job waits for the
  project lock, and a trigger during a training queues a new job instead of folding into it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from backend import jobs
from backend.labelstudio.make_export import make_export
from backend.registry import ProjectRegistry

from .conftest import REDIS_DBS

pytestmark = pytest.mark.e2e          # real Redis and worker processes that fine-tune

REPO = Path(__file__).resolve().parents[1]
QUEUE = "simclick-test-worker"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("ls-export"), count=5)


def worker_env(url, tmp_path, export, tiny_checkpoint, **extra):
    env = dict(os.environ, REDIS_URL=url, TRAINING_QUEUE=QUEUE, DATA_DIR=str(tmp_path / "data"),
               MODEL_CHECKPOINT=str(tiny_checkpoint), SIMCLICK_EVAL_DB=str(tmp_path / "eval.sqlite"),
               LOCAL_FILES_ROOT=str(export.parent / "images"), TRAINING_LOCK_TTL="3",
               FINETUNE_BATCH_SIZE="2", FINETUNE_CROP_SIZE="128", FINETUNE_CHECKPOINT_EVERY="2",
               FINETUNE_WARMUP_STEPS="1", FINETUNE_SIM_ROUNDS="1", FINETUNE_BENCH_DATASETS="",
               FINETUNE_EVAL_COARSE_SIZE="128", FINETUNE_THREADS="1", FINETUNE_MIN_TRAIN="2",
               FINETUNE_MIN_HOLDOUT="1", FINETUNE_HOLDOUT_FRACTION="0.2", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_worker(env, log_path, name):
    """A real RQ worker process (not burst: it outlives a killed work-horse, as in production)."""
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "backend.jobs", "worker", "--name", name],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(w):
    if w.poll() is None:
        w.send_signal(signal.SIGTERM)            # warm shutdown: finishes nothing new, exits
        try:
            return w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()
            return w.wait(10)
    return w.returncode


def workers_listening(conn, n):
    from rq import Worker
    return len([w for w in Worker.all(connection=conn) if w.name.startswith("w")]) >= n


def cli(env, *args):
    r = subprocess.run([sys.executable, "-m", "backend.jobs", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def wait_for(pred, timeout, what, log_path=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.3)
    tail = Path(log_path).read_text(errors="replace")[-3000:] if log_path else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


DB = REDIS_DBS["test_jobs_worker"]


@pytest.fixture(scope="module")
def workers(tmp_path_factory, export, tiny_checkpoint):
    """Two real worker processes on one queue (db 11, flushed before and after), shared by the tests."""
    conn = redis.Redis(db=DB)
    conn.flushdb()
    tmp = tmp_path_factory.mktemp("workers")
    url = f"redis://127.0.0.1:6379/{DB}"
    env = worker_env(url, tmp, export, tiny_checkpoint)
    log = tmp / "workers.log"
    ws = [start_worker(env, log, "w1"), start_worker(env, log, "w2")]
    try:
        wait_for(lambda: workers_listening(conn, 2), 180, "two workers on the queue", log)
        yield {"url": url, "conn": conn, "env": env, "log": log, "tmp": tmp}
    finally:
        codes = [stop_worker(w) for w in ws]
        conn.flushdb()
    assert codes == [0, 0], Path(log).read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def base_predictor(tiny_checkpoint):
    from model.predictor import Predictor
    return Predictor.load(str(tiny_checkpoint), coarse_size=128)


def served_version(app, project):
    return app.extensions["simclick"].models.for_project(project).version


def test_killed_worker_fails_the_job_and_a_retry_resumes(workers, export, base_predictor):
    from backend.app import create_app
    from backend.config import Config
    from rq.job import Job

    conn, env, log = workers["conn"], workers["env"], workers["log"]
    app = create_app(Config.from_env({"DATA_DIR": env["DATA_DIR"], "MODEL_RELOAD_INTERVAL": "0"}), base_predictor)
    assert served_version(app, "5") == base_predictor.version
    s = jobs.JobSettings.from_env(env)
    job_id, created = jobs.enqueue_training(conn, 5, settings=s, overrides={"steps": 8}, export=str(export))
    assert created
    job = Job.fetch(job_id, connection=conn)

    def training_step():
        m = job.get_meta()
        return m if m.get("stage") == "train" and m.get("step", 0) >= 3 else None

    meta = wait_for(training_step, 120, "the job to reach training step 3", log)
    os.kill(meta["pid"], signal.SIGKILL)              # the work-horse dies mid-training (OOM killer)
    wait_for(lambda: job.get_status() == "failed", 30, "the job to be marked failed", log)
    info = jobs.job_info(conn, job_id)
    assert "terminated unexpectedly" in info["error"] and info["stage"] == "train", info
    reg = ProjectRegistry(Path(env["DATA_DIR"]) / "registry", 5)
    assert [v.info["kind"] for v in reg.versions()] == ["base"] and reg.pointer() is None
    assert served_version(app, "5") == base_predictor.version          # serving unchanged
    state = Path(env["DATA_DIR"]) / "jobs" / job_id / "train" / "state.safetensors"
    assert state.exists()                                               # what the retry resumes from

    assert cli(env, "retry", job_id).strip() == job_id                 # the workers take it again
    wait_for(lambda: job.get_status() in ("finished", "failed"), 240, "the retried job", log)
    assert job.get_status() == "finished", jobs.job_info(conn, job_id)
    result = job.return_value()
    print("\nretried job timings:", result["timings"])
    assert result["train"] == {"steps": 8, "resumed": True, "device": result["train"]["device"], "rehearsal": 0.5}
    assert result["version"] == "p5-v001" and result["parent"] == reg.versions()[0].name
    h = result["metrics"]["holdout"]
    better = h["candidate"]["noc90"] < h["parent"]["noc90"]
    assert result["promoted"] is better and result["status"] == ("promoted" if better else "kept")
    assert result["reason"] and f"{h['candidate']['noc90']:.2f}" in result["reason"]
    v = reg.get("p5-v001")
    assert (v.job_id, v.parent, v.decision["promote"]) == (job_id, result["parent"], better)
    assert v.info["metrics"]["holdout"] == h and v.info["train_config"]["init_checkpoint"].endswith("model.safetensors")
    assert (reg.promoted() is not None) is better
    assert served_version(app, "5") == ("p5-v001" if better else base_predictor.version)
    meta = job.get_meta()
    assert (meta["stage"], meta["percent"], meta["attempt"]) == ("done", 100, 2)
    # Both holdout runs are in the evaluation history, tagged with the job.
    from training.evaluation.history import list_runs
    rows = [r for r in list_runs(env["SIMCLICK_EVAL_DB"]) if r["tag"] == f"finetune:{job_id}"]
    assert sorted(r["model_version"] for r in rows) == sorted([result["parent"], "p5-v001"])
    assert not (Path(env["DATA_DIR"]) / "jobs" / job_id).exists()      # work folder cleaned up
    status = jobs.job_info(conn, job_id)
    assert status["status"] == "finished" and status["result"]["version"] == "p5-v001"


def test_two_workers_never_train_one_project_at_once(workers, export):
    from rq.job import Job

    conn, env, log = workers["conn"], workers["env"], workers["log"]
    first = json.loads(cli(env, "enqueue", "--project", "6", "--export", str(export), "--steps", "3", "--json"))
    assert first["created"]
    job1 = Job.fetch(first["job"], connection=conn)
    wait_for(lambda: job1.get_meta().get("stage") in ("pull", "train"), 60, "job 1 to start", log)
    # A trigger while job 1 trains is a new job (job 1 pulled its annotations already); the idle
    # worker takes it and waits for the project lock. (It is told to need more annotations than
    # there are, so it ends right after its pull: the test needs only one real training.)
    s = jobs.JobSettings.from_env(env)
    job2_id, created = jobs.enqueue_training(conn, 6, settings=s, export=str(export), overrides={"min_train": 1000})
    assert created and job2_id != first["job"]
    assert jobs.enqueue_training(conn, 6, settings=s)[0] == job2_id       # folds into job 2
    job2 = Job.fetch(job2_id, connection=conn)
    waiting = wait_for(lambda: job2.get_meta().get("stage") == "waiting" and job2.get_meta().get("detail"),
                       60, "job 2 to wait for the project lock", log)
    assert first["job"] in waiting and job1.get_meta()["stage"] not in ("done", "waiting")
    wait_for(lambda: job2.get_status() in ("finished", "failed"), 240, "both jobs", log)
    m1, m2 = job1.get_meta(), job2.get_meta()
    assert job1.get_status() == job2.get_status() == "finished", (jobs.job_info(conn, job1.id),
                                                                    jobs.job_info(conn, job2.id))
    assert m1["lock_released"] <= m2["lock_acquired"], (m1, m2)       # one after the other
    assert {m1["worker"], m2["worker"]} == {"w1", "w2"}
    r1, r2 = job1.return_value(), job2.return_value()
    assert r1["version"] == "p6-v001" and r1["status"] in ("promoted", "kept")
    assert r2["parent"] == ("p6-v001" if r1["promoted"] else r1["parent"])   # job 2 saw what job 1 left
    # Too few annotations: a distinct status with the reason, naming the setting it checks.
    assert r2["status"] == "skipped" and "FINETUNE_MIN_TRAIN=1000" in r2["reason"], r2
    info = jobs.job_info(conn, job2_id)
    assert (info["status"], info["reason"], info["stage"]) == ("skipped", r2["reason"], "skipped")
    assert f"{job2_id}  skipped" in cli(env, "status", job2_id)
    assert jobs.job_info(conn, job2_id)["folded_triggers"] == 1
