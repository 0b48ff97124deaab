"""Stopping, crashing and cancelling fine-tuning jobs, and their ETA (issue 14, items 7 and 8).

Real worker processes (`python -m backend.jobs worker`) on the real Redis (db 12, flushed before
and after) run the real job function. Most jobs are held in their pull by an image server that
answers only when told to, so a job is "started" for as long as a test needs without training;
the killed-worker test lets its job train. Before issue 14: a SIGKILLed worker left its work-horse
training and the job "started" for minutes (retry refused); a stopped worker waited for the whole
job; there was no cancel.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from backend import jobs
from backend.labelstudio.make_export import brush_result

from .conftest import REDIS_DBS
from .test_jobs_attempts import HeldImageServer
from .test_jobs_worker import cli, start_worker, wait_for, worker_env, workers_listening

pytestmark = pytest.mark.e2e          # real Redis and fine-tuning jobs

REPO = Path(__file__).resolve().parents[1]
DB = REDIS_DBS["test_jobs_stop"]
URL = f"redis://127.0.0.1:6379/{DB}"


@pytest.fixture
def conn():
    c = redis.Redis(db=DB)
    c.flushdb()
    yield c
    c.flushdb()


@pytest.fixture
def held(tmp_path):
    """An export of one task whose image download is held until `server.release` is set."""
    img = np.zeros((64, 80, 3), np.uint8)
    img[20:40, 20:60] = 200
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    server = HeldImageServer(buf.getvalue())
    mask = np.zeros((64, 80), bool)
    mask[20:40, 20:60] = True
    export = tmp_path / "held.json"
    export.write_text(json.dumps([{"id": 1, "data": {"image": f"{server.url}/img.png"},
                                   "annotations": [{"id": 1, "result": [brush_result(mask)]}]}]))
    yield server, export
    server.close()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from backend.labelstudio.make_export import make_export
    return make_export(tmp_path_factory.mktemp("ls-export"), count=5)


def env_for(tmp_path, export, tiny_checkpoint, **extra):
    env = worker_env(URL, tmp_path, export, tiny_checkpoint, TRAINING_QUEUE="simclick-test-stop",
                     TRAINING_HEARTBEAT_TTL="2", FETCH_TIMEOUT="120", **extra)
    return env


def enqueue(conn, env, project, export, **overrides):
    s = jobs.JobSettings.from_env(env)
    job_id, created = jobs.enqueue_training(conn, project, settings=s, export=str(export),
                                            overrides=overrides or None)
    assert created
    return job_id


def status(conn, job_id):
    return jobs.job_info(conn, job_id)["status"]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a dead parent's init) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def started_worker(conn, env, log, name):
    w = start_worker(env, log, name)
    wait_for(lambda: workers_listening(conn, 1), 180, f"worker {name}", log)
    return w


def horse_pid(conn, job_id, stage, log):
    meta = wait_for(lambda: (m := jobs.job_info(conn, job_id)["meta"]).get("stage") == stage and m,
                    120, f"the job to reach {stage}", log)
    return meta["pid"]


def test_a_killed_worker_takes_its_training_down_and_retry_is_accepted_at_once(conn, tmp_path, export,
                                                                              tiny_checkpoint):
    env = env_for(tmp_path, export, tiny_checkpoint)
    log = tmp_path / "worker.log"
    w = started_worker(conn, env, log, "wkill")
    try:
        job_id = enqueue(conn, env, 21, export, steps=200)
        wait_for(lambda: (jobs.job_info(conn, job_id)["meta"].get("step") or 0) >= 3, 180,
                 "training step 3", log)
        info = jobs.job_info(conn, job_id)
        # Item 8: the time left, from the measured step speed, in /jobs and `status`.
        assert info["eta_s"] > 0 and info["eta_at"], info
        assert "ETA" in cli(env, "status", job_id)
        horse = info["meta"]["pid"]
        w.kill()                                              # SIGKILL: no handler runs in the worker
        w.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: not alive(horse), 15, "the orphaned work-horse to end", log)
        wait_for(lambda: status(conn, job_id) == "failed", 15, "the job to be failed", log)
        took = time.monotonic() - t0
        info = jobs.job_info(conn, job_id)
        assert "interrupted: its worker" in info["error"] and "died" in info["error"], info
        assert conn.get("simclick:train-lock:21") is None     # released by the job itself
        assert cli(env, "retry", job_id).strip() == job_id   # accepted at once
        print(f"\nwork-horse ended and job failed {took:.1f} s after its worker was SIGKILLed")
    finally:
        if w.poll() is None:
            w.kill()


def test_stopping_the_worker_ends_its_running_job(conn, tmp_path, export, tiny_checkpoint, held):
    server, held_export = held
    env = env_for(tmp_path, export, tiny_checkpoint)
    log = tmp_path / "worker.log"
    w = started_worker(conn, env, log, "wstop")
    try:
        job_id = enqueue(conn, env, 22, held_export)
        horse = horse_pid(conn, job_id, "pull", log)
        wait_for(lambda: server.total >= 1, 60, "the download to start", log)
        w.send_signal(signal.SIGTERM)                        # docker stop, systemd stop
        assert w.wait(30) == 0, Path(log).read_text()[-3000:]
        assert not alive(horse)
        info = jobs.job_info(conn, job_id)
        assert info["status"] == "failed" and "the worker was stopped" in info["error"], info
        assert f"retry {job_id}" in info["error"]
        assert conn.get("simclick:train-lock:22") is None
    finally:
        if w.poll() is None:
            w.kill()


def test_cancel_a_running_job(conn, tmp_path, export, tiny_checkpoint, held):
    server, held_export = held
    env = env_for(tmp_path, export, tiny_checkpoint)
    log = tmp_path / "worker.log"
    w = started_worker(conn, env, log, "wcancel")
    try:
        job_id = enqueue(conn, env, 23, held_export)
        horse = horse_pid(conn, job_id, "pull", log)
        out = json.loads(cli(env, "cancel", job_id, "--json"))
        assert out["status"] == "canceled", out
        assert not alive(horse) and status(conn, job_id) == "canceled"
        assert "cancelled by cli" in jobs.job_info(conn, job_id)["error"]
        assert conn.get("simclick:train-lock:23") is None
        # The worker goes on with the next job; nothing left to cancel on this one.
        r = subprocess.run([sys.executable, "-m", "backend.jobs", "cancel", job_id], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "nothing to cancel" in r.stderr
        assert w.poll() is None
    finally:
        if w.poll() is None:
            w.kill()


def test_an_abandoned_job_is_seen_within_seconds(conn, tmp_path, export, tiny_checkpoint, held):
    """Worker and work-horse both gone (OOM killer, machine crash): no heartbeat."""
    server, held_export = held
    env = env_for(tmp_path, export, tiny_checkpoint)
    log = tmp_path / "worker.log"
    w = started_worker(conn, env, log, "wgone")
    try:
        job_id = enqueue(conn, env, 24, held_export)
        horse = horse_pid(conn, job_id, "pull", log)
        os.kill(horse, signal.SIGKILL)
        w.kill()
        w.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: status(conn, job_id) == "abandoned", 15, "the job to show as abandoned", log)
        print(f"\nabandoned job seen {time.monotonic() - t0:.1f} s after its processes died")
        assert "no heartbeat" in jobs.job_info(conn, job_id)["error"]
        assert cli(env, "retry", job_id).strip() == job_id     # no waiting for RQ's own cleanup
        assert status(conn, job_id) == "queued"
    finally:
        if w.poll() is None:
            w.kill()


def test_cancel_route_and_queued_jobs(conn, tmp_path, export, tiny_checkpoint):
    from backend.app import create_app
    from backend.config import Config
    from model.predictor import Predictor

    env = env_for(tmp_path, export, tiny_checkpoint)
    token = "test-admin-token-0123456789"
    app = create_app(Config.from_env({"REDIS_URL": URL, "TRAINING_QUEUE": "simclick-test-stop",
                                      "ADMIN_TOKEN": token, "DATA_DIR": str(tmp_path / "data")}),
                     Predictor.load(str(tiny_checkpoint), coarse_size=128))
    c = app.test_client()
    job_id = enqueue(conn, env, 25, export)                  # no worker: it stays queued
    assert c.post(f"/admin/jobs/{job_id}/cancel").status_code == 401
    r = c.post(f"/admin/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.get_json()["status"] == "canceled", r.get_json()
    assert c.get(f"/jobs/{job_id}").get_json()["status"] == "canceled"
    assert conn.get("simclick:pending:25") is None            # the next trigger makes a new job
    assert jobs.enqueue_training(conn, 25, settings=jobs.JobSettings.from_env(env))[0] != job_id
    again = c.post(f"/admin/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {token}"})
    assert again.status_code == 409 and "nothing to cancel" in again.get_json()["error"]
    assert c.post("/admin/jobs/train-p25-404-abc/cancel",
                  headers={"Authorization": f"Bearer {token}"}).status_code == 404
    app.extensions["simclick"].models.stop()


def test_eta_from_measured_speeds_or_the_previous_jobs():
    from backend.finetune import Eta

    now = [0.0]
    eta = Eta(steps=100, rates={}, clock=lambda: now[0])
    eta.eval_clicks = 400
    assert eta.step(10) == {"eta_s": None}                   # nothing measured, no previous job
    now[0] = 20.0
    assert eta.step(20) == {"eta_s": None}                   # 2 s/step, but clicks not measured yet
    assert eta.measured == {"train_step_s": 2.0}
    first = eta.eval_start()                                 # an evaluation pass starts at t = 20 s
    now[0] = 70.0
    assert eta.clicks(100) == {"eta_s": 80 * 2.0 + 150.0}    # 80 steps left; 0.5 s/click x 300 clicks left
    assert first == {"eta_s": None}
    now[0] = 1000.0                                          # training in between: not evaluation time
    eta.eval_start()
    now[0] = 1010.0
    assert eta.clicks(20) == eta.left() and eta.measured["eval_click_s"] == 0.5     # 60 s / 120 clicks
    prior = Eta(steps=100, rates={"train_step_s": 2.0, "eval_click_s": 0.5}, clock=lambda: now[0])
    prior.eval_clicks = 400
    assert prior.left() == {"eta_s": 400.0}                  # the previous job's speeds stand in
