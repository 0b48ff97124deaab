"""The per-project training lock: one training at a time per project, across workers and machines.

The lock's owner is one *attempt* of a job (job id + a random token), not the job: a work-horse
whose worker was SIGKILLed lives on in its own process group until its guard notices
(backend.jobs.guard), and a `retry` meanwhile starts a second attempt with the same job id; that
attempt waits until the first one ends (it still renews its lease) or dies (its lease expires
after TRAINING_LOCK_TTL seconds).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Optional

from .keys import ACQUIRE, CAD, EXTEND, key, text

log = logging.getLogger(__name__)


class ProjectLock:
    """One training at a time per project, across workers and machines: a Redis key holding the
    owner (one attempt of a job, see `attempt_owner`) with a lease (TTL) that a heartbeat thread
    renews. An owner that dies stops renewing and the lease expires; only the same owner may take
    it over before that."""

    def __init__(self, conn, project: str, owner: str, ttl: float = 30.0):
        self.conn, self.project, self.owner = conn, str(project), owner
        self.key = key("train-lock", project)
        self.ttl_ms = int(ttl * 1000)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost = False

    def holder(self) -> Optional[str]:
        return text(self.conn.get(self.key))

    def try_acquire(self) -> Optional[str]:
        """None if acquired, else the job id that holds it."""
        cur = self.conn.eval(ACQUIRE, 1, self.key, self.owner, self.ttl_ms)
        cur = text(cur)
        return None if not cur else cur

    def acquire(self, timeout: Optional[float] = None, on_wait=None, poll: float = 1.0) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        holder = self.try_acquire()
        while holder is not None:
            if on_wait:
                on_wait(holder)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"project {self.project} is being trained by job {holder}")
            time.sleep(poll)
            holder = self.try_acquire()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lock-{self.project}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        every = max(0.2, self.ttl_ms / 3000.0)
        while not self._stop.wait(every):
            try:
                if not self.conn.eval(EXTEND, 1, self.key, self.owner, self.ttl_ms):
                    self.lost = True
                    log.error("lost the training lock of project %s (held by %s now)", self.project, self.holder())
                    return
            except Exception as e:  # Redis briefly away: keep trying while the lease lasts
                log.warning("could not renew the training lock of project %s: %s", self.project, e)

    def check(self) -> None:
        if self.lost or self.holder() != self.owner:
            self.lost = True
            raise RuntimeError(f"job {self.owner} lost the training lock of project {self.project}; "
                               f"not registering its result")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        try:
            self.conn.eval(CAD, 1, self.key, self.owner)
        except Exception as e:
            log.warning("could not release the training lock of project %s (it expires by itself): %s",
                        self.project, e)


def attempt_owner(job_id: str) -> str:
    """The lock owner of one attempt of a job: two attempts of the same job (a retry while an
    orphaned work-horse still runs) are two owners, so the second waits for the first."""
    return f"{job_id}/{uuid.uuid4().hex[:12]}"


def waiting_for(holder: str, job_id: str, pid: str) -> str:
    holder_job = holder.split("/", 1)[0]
    if holder_job == job_id:
        return (f"an earlier attempt of this job still holds project {pid}'s training lock (a work-horse "
                f"that outlived its worker?); waiting until it finishes or its lease expires")
    return f"project {pid} is being trained by job {holder_job}"
