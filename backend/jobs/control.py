"""Operations on one job: retry (resumes from its saved state) and cancel."""
from __future__ import annotations

import time

from rq.exceptions import NoSuchJobError
from rq.job import Job

from .keys import CAD, key
from .settings import JobSettings
from .status import existing_job_info, fail_abandoned


class JobNotFound(RuntimeError):
    """No job with that id (unknown, or expired after TRAINING_RESULT_TTL)."""


class JobConflict(RuntimeError):
    """The job is in a state the operation does not apply to (cancel a finished job, retry a
    running one)."""



def retry_job(conn, job_id: str) -> str:
    """Requeue a failed (or stopped) job with the same id, on the queue it came from: it resumes
    from its saved state."""
    job = Job.fetch(job_id, connection=conn)
    status = existing_job_info(conn, job_id)["status"]
    if status == "abandoned":
        fail_abandoned(conn, job, "abandoned: no heartbeat (retried)")
    elif str(job.get_status().value) == "canceled":
        raise JobConflict(f"job {job_id} was cancelled before it started: enqueue a new one")
    elif status not in ("failed", "stopped", "canceled"):
        raise JobConflict(f"job {job_id} is {status}; only failed, stopped, canceled or abandoned jobs are retried")
    conn.delete(key("cancel", job_id))
    pid = job.meta.get("project")
    job.meta["stage"], job.meta["percent"], job.meta["detail"], job.meta["canceled"] = "queued", 0, "retry", None
    job.save_meta()
    job.requeue()
    if pid is not None:
        with conn.lock(key("enqueue-lock", pid), timeout=10, blocking_timeout=5):
            if not conn.get(key("pending", pid)):
                conn.set(key("pending", pid), job_id)
    return job_id


def cancel_job(conn, job_id: str, actor: str, wait: float = 0.0) -> dict:
    """Cancel a job: a queued one never runs; a running one is ended by its guard (within
    TRAINING_HEARTBEAT_TTL/4 s; its lock released, its saved state kept: `retry` resumes it); an
    abandoned one is failed now. Waits up to `wait` s for a running job to end. Returns
    {"job", "status", "detail"}; JobNotFound, or JobConflict (with the reason) when there is
    nothing to cancel."""
    try:
        job = Job.fetch(job_id, connection=conn)
    except NoSuchJobError:
        raise JobNotFound(f"no job {job_id}") from None
    status = existing_job_info(conn, job_id)["status"]
    pid = job.meta.get("project")
    if status in ("queued", "deferred", "scheduled"):
        job.cancel()
        if pid is not None:
            conn.eval(CAD, 1, key("pending", pid), job_id)     # the next trigger queues a new job
        return {"job": job_id, "status": "canceled", "detail": f"cancelled by {actor} before it started"}
    if status == "abandoned":
        fail_abandoned(conn, job, f"abandoned; cancelled by {actor}")
        job.meta["canceled"] = f"cancelled by {actor}"
        job.save_meta()
        return {"job": job_id, "status": "canceled", "detail": f"abandoned; cancelled by {actor}"}
    if status != "started":
        raise JobConflict(f"job {job_id} is {status}: nothing to cancel")
    conn.set(key("cancel", job_id), actor, ex=JobSettings.from_env().result_ttl)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and existing_job_info(conn, job_id)["status"] == "started":
        time.sleep(0.2)
    info = existing_job_info(conn, job_id)
    if info["status"] == "started":
        return {"job": job_id, "status": "cancelling",
                "detail": f"cancelled by {actor}; the job ends within seconds (`status {job_id}`)"}
    return {"job": job_id, "status": info["status"], "detail": info.get("error") or info.get("detail")}
