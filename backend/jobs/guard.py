"""What ends a running job early and cleanly: its guard thread (heartbeat, cancel request, dead
worker) and the SIGTERM handler that turns the guard's signal, or the worker's stop, into
JobInterrupted in the job's main thread.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import List, Optional, cast

from rq import Worker

from .keys import key, text

log = logging.getLogger(__name__)


class JobInterrupted(RuntimeError):
    """The job was ended before its end: its worker stopped or died, or it was cancelled. Its work
    folder keeps the last saved training state, so `retry` resumes it."""


class JobGuard(threading.Thread):
    """Runs beside a job, in its own process: every TRAINING_HEARTBEAT_TTL/4 seconds it renews the
    job's heartbeat key (simclick:alive:<job>), so a job whose process is gone shows as abandoned
    within seconds instead of RQ's minutes; and it ends the job (JobInterrupted in the job's main
    thread) when the job is cancelled (simclick:cancel:<job>) or when the worker that forked this
    work-horse died (SIGKILL), so no orphaned training goes on."""

    def __init__(self, conn, job_id: str, ttl: float, worker_pid: Optional[int]):
        super().__init__(name=f"guard-{job_id}", daemon=True)
        self.conn, self.job_id, self.ttl, self.worker_pid = conn, job_id, ttl, worker_pid
        self.reason: Optional[str] = None
        self.cancelled = False        # the reason is a cancel request (simclick:cancel:<job>)
        self.armed = False            # the job's SIGTERM handler is in place (`interruptible`)
        self._halt = threading.Event()

    def run(self) -> None:
        every = max(0.2, self.ttl / 4)
        while not self._halt.is_set():
            why = self.check()
            if why and self.armed:
                self.reason = why
                # A real signal to the main thread: it also breaks a blocking call (a download).
                signal.pthread_kill(cast(int, threading.main_thread().ident), signal.SIGTERM)
                return
            self._halt.wait(every)

    def check(self) -> Optional[str]:
        """Renew the heartbeat; the reason to end the job, if any."""
        if self.worker_pid is not None and os.getppid() != self.worker_pid:
            return f"its worker (pid {self.worker_pid}) died"
        try:
            self.conn.set(key("alive", self.job_id), str(os.getpid()), ex=max(1, int(round(self.ttl))))
            who = self.conn.get(key("cancel", self.job_id))
        except Exception as e:       # Redis briefly away: the heartbeat lapses, the job goes on
            log.warning("job %s: heartbeat failed: %s", self.job_id, e)
            return None
        if who is None:
            return None
        self.cancelled = True
        return f"cancelled by {text(who)}"

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        try:
            self.conn.delete(key("alive", self.job_id))
        except Exception:
            pass


def forking_worker_pid(conn, job) -> Optional[int]:
    """The pid of the RQ worker that forked this process (a work-horse), else None (a SimpleWorker
    or a direct Job.perform(): no parent to outlive)."""
    if not job.worker_name:
        return None
    try:
        w = Worker.find_by_key(Worker.redis_worker_namespace_prefix + job.worker_name, connection=conn)
    except Exception:
        return None
    return w.pid if w is not None and w.pid == os.getppid() else None


@contextlib.contextmanager
def interruptible(guard: JobGuard):
    """SIGTERM (the worker's stop, or the guard) raises JobInterrupted in the job, once: the job's
    `finally` blocks run (the project lock is released), the training state on disk stays for a
    retry. A handler that was there (a SimpleWorker's own stop request) is called first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    fired: List[Optional[int]] = []

    def handler(signum, frame):
        if guard.reason is None and callable(previous):    # a real SIGTERM, not the guard's
            previous(signum, frame)
        if fired:
            return
        fired.append(signum)
        raise JobInterrupted(f"interrupted: {guard.reason or 'the worker was stopped (SIGTERM)'}; "
                             f"`python -m backend.jobs retry {guard.job_id}` resumes it from its last saved state")

    signal.signal(signal.SIGTERM, handler)
    guard.armed = True
    try:
        yield
    finally:
        guard.armed = False
        fired.append(None)          # from here on a SIGTERM raises nothing: the cleanup must finish
        signal.signal(signal.SIGTERM, previous)
