"""The RQ job (`run_training_job`, run by the worker): take the project's training lock, fine-tune
(backend.finetune), release; progress in job.meta.

A job killed mid-way leaves the registry untouched (versions are registered only at the end,
atomically); a retry resumes training from the last saved state.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Optional, cast

from rq import get_current_job
from rq.job import Job

from ..registry import project_key

from ..finetune import FinetuneSettings, run_finetune
from .guard import JobGuard, JobInterrupted, forking_worker_pid, interruptible
from .keys import CAD, key, text
from .lock import ProjectLock, attempt_owner, waiting_for
from .settings import JobSettings

log = logging.getLogger(__name__)


class _Meta:
    """Thread-safe, best-effort job.meta updates (a Redis hiccup must not kill the training). The
    job's progress: called in the job's main thread, where `interruptible` raises JobInterrupted,
    which must pass."""

    def __init__(self, job):
        self.job = job
        self.lock = threading.Lock()

    def update(self, **kw) -> None:
        with self.lock:
            self.job.meta.update(kw)
            try:
                self.job.save_meta()
            except JobInterrupted:   # the SIGTERM handler's, raised here when the signal came now
                raise
            except Exception as e:
                log.warning("could not save job meta: %s", e)

    def progress(self, stage: str, percent: int, **kw) -> None:
        self.update(stage=stage, percent=int(percent), at=time.time(), **kw)



def run_training_job(project: Any, overrides: Optional[dict] = None, export: Optional[str] = None) -> dict:
    """The RQ job: take the project's training lock, fine-tune, release. See backend.finetune."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = cast(Job, get_current_job())        # run by an RQ worker: there is a current job
    conn = job.connection
    s = JobSettings.from_env()
    guard = JobGuard(conn, job.id, s.heartbeat_ttl, forking_worker_pid(conn, job))
    meta = _Meta(job)
    guard.start()
    meta.update(heartbeat_ttl=s.heartbeat_ttl)
    try:
        with interruptible(guard):
            return _train_locked(job, conn, project, overrides, export, s, meta)
    except JobInterrupted as e:
        meta.update(stage="interrupted", detail=str(e), canceled=guard.reason if guard.cancelled else None)
        log.warning("job %s %s", job.id, e)
        raise
    finally:
        guard.stop()


def _train_locked(job, conn, project, overrides, export, s: JobSettings, meta: "_Meta") -> dict:
    pid = project_key(project)
    meta.update(stage="waiting", percent=0, pid=os.getpid(), host=socket.gethostname(), worker=job.worker_name,
                attempt=int(job.meta.get("attempt", 0)) + 1, started=time.time(), canceled=None)
    settings = FinetuneSettings.from_env(**(overrides or {}))   # bad settings fail before waiting
    lock = ProjectLock(conn, pid, attempt_owner(job.id), ttl=s.lock_ttl)
    lock.acquire(on_wait=lambda holder: meta.update(stage="waiting", detail=waiting_for(holder, job.id, pid)))
    try:
        meta.update(lock_acquired=time.time(), detail="")
        conn.eval(CAD, 1, key("pending", pid), job.id)   # later triggers queue the next job
        rates_key = key("rates", socket.gethostname())
        result = run_finetune(pid, job.id, settings, progress=meta.progress, export=export,
                              before_register=lock.check, rates=_load_rates(conn, rates_key))
        _save_rates(conn, rates_key, result.get("rates"))
        return result
    finally:
        meta.update(lock_released=time.time())
        lock.release()


def _load_rates(conn, rates_key: str) -> dict:
    """Speeds measured by this host's previous job (seconds per training step, per evaluation click):
    the ETA's guess before the job has measured its own."""
    try:
        return {text(k): float(v) for k, v in conn.hgetall(rates_key).items()}
    except Exception:
        return {}


def _save_rates(conn, rates_key: str, rates: Optional[dict]) -> None:
    if rates:
        try:
            conn.hset(rates_key, mapping={k: v for k, v in rates.items() if v})
        except Exception as e:
            log.warning("could not save the measured speeds: %s", e)
