"""Two attempts of one job never run at once (issue 11, item 12).

When an RQ worker is SIGKILLed, its work-horse lives on in its own process group; RQ marks the job
abandoned and `retry` starts a second attempt with the same job id. Here both attempts are real
processes running the real job function (`Job.perform()`, what a work-horse does) on the real Redis
(db 15): attempt 1 is held in its pull by an image server that answers only when told to; attempt 2
starts meanwhile. Attempt 2 must wait for the project lock instead of pulling (and later training
and writing the same run folder) alongside attempt 1.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from backend import jobs
from backend.labelstudio.make_export import brush_result

from .conftest import REDIS_DBS

pytestmark = pytest.mark.e2e          # real Redis and fine-tuning job processes

REPO = Path(__file__).resolve().parents[1]
DB = REDIS_DBS["test_jobs_attempts"]
QUEUE = "simclick-test-attempts"


class HeldImageServer:
    """Serves one PNG, but holds every request until `release` is set; counts requests in flight."""

    def __init__(self, data: bytes):
        self.release = threading.Event()
        self.inflight = self.max_inflight = self.total = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with lock:
                    server.total += 1
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    server.release.wait(60)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with lock:
                        server.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


ATTEMPT = ("import sys, redis; from rq.job import Job; "
           "job = Job.fetch(sys.argv[2], connection=redis.Redis.from_url(sys.argv[1])); "
           "print(job.perform())")


def test_a_second_attempt_of_a_job_waits_for_the_first(tmp_path, tiny_checkpoint):
    conn = redis.Redis(db=DB)
    conn.flushdb()
    img = np.zeros((64, 80, 3), np.uint8)
    img[20:40, 20:60] = 200
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    server = HeldImageServer(buf.getvalue())
    mask = np.zeros((64, 80), bool)
    mask[20:40, 20:60] = True
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"id": 1, "data": {"image": f"{server.url}/img.png"},
                                   "annotations": [{"id": 1, "result": [brush_result(mask)]}]}]))
    url = f"redis://127.0.0.1:6379/{DB}"
    env = dict(os.environ, REDIS_URL=url, TRAINING_QUEUE=QUEUE, DATA_DIR=str(tmp_path / "data"),
               MODEL_CHECKPOINT=str(tiny_checkpoint), TRAINING_LOCK_TTL="2", FETCH_TIMEOUT="60",
               FINETUNE_BENCH_DATASETS="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOCAL_FILES_ROOT"):
        env.pop(var, None)
    job_id, _ = jobs.enqueue_training(conn, 7, settings=jobs.JobSettings(redis_url=url, queue=QUEUE),
                                      overrides={"min_train": 1000}, export=str(export))
    procs = []
    try:
        with open(tmp_path / "attempts.log", "ab") as log:
            def start():
                procs.append(subprocess.Popen([sys.executable, "-c", ATTEMPT, url, job_id], cwd=REPO,
                                              env=env, stdout=log, stderr=subprocess.STDOUT))
            start()                                           # attempt 1: pulls, held by the server
            wait_for(lambda: server.total >= 1, 90, "attempt 1 to download the task image")
            start()                                           # attempt 2: the retry of the same job

            def attempt2_decided():
                meta = jobs.job_info(conn, job_id)["meta"]
                return server.max_inflight >= 2 or "earlier attempt" in str(meta.get("detail"))
            wait_for(attempt2_decided, 90, "attempt 2 to wait for the lock or to pull alongside")
            time.sleep(3)                                     # over the lock's 2 s lease: it must hold
            assert server.max_inflight == 1, "two attempts of one job ran at once"
            detail = jobs.job_info(conn, job_id)["meta"]["detail"]
            assert "earlier attempt" in detail, detail
            server.release.set()
            for p in procs:
                assert p.wait(120) == 0, (tmp_path / "attempts.log").read_text()[-3000:]
        assert server.max_inflight == 1 and server.total == 2     # one after the other
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        server.close()
        conn.flushdb()
