"""What a job is doing: its status (with "abandoned", "canceled" and "skipped" told apart from RQ's
own), stage, percent, time left and where the time went; the jobs of a queue.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import List, Optional, cast

from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job_lifecycle import record_job_failure
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.utils import now as rq_now

from .keys import key
from .settings import JobSettings


def existing_job_info(conn, job_id: str) -> dict:
    """job_info of a job just fetched: it exists."""
    return cast(dict, job_info(conn, job_id))


def job_info(conn, job_id: str) -> Optional[dict]:
    try:
        job = Job.fetch(job_id, connection=conn)
    except NoSuchJobError:
        return None
    status = str(job.get_status().value)
    meta = job.get_meta()
    if status == "started" and _abandoned(conn, job):
        status = "abandoned"
    elif status == "failed" and meta.get("canceled"):
        status = "canceled"
    d = {"id": job.id, "status": status, "project": meta.get("project"), "stage": meta.get("stage"),
         "percent": meta.get("percent"), "detail": meta.get("detail"), "trigger": meta.get("trigger"),
         "description": job.description, "folded_triggers": int(conn.get(key("folded", job.id)) or 0),
         "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
         "started_at": job.started_at.isoformat() if job.started_at else None,
         "ended_at": job.ended_at.isoformat() if job.ended_at else None,
         "worker": job.worker_name, "meta": meta}
    d.update(_eta(meta) if status == "started" else {})
    d["timings"] = meta.get("timings") or {}        # seconds per stage done: where the time goes
    if status == "finished":
        d["result"] = job.return_value()
        if isinstance(d["result"], dict) and d["result"].get("timings"):
            d["timings"] = d["result"]["timings"]
        if isinstance(d["result"], dict) and d["result"].get("status") == "skipped":
            # Finished for RQ, but nothing was trained: say so where an admin looks first.
            d["status"], d["reason"] = "skipped", d["result"].get("reason")
    elif status in ("failed", "stopped", "canceled"):
        latest = job.latest_result()
        exc = (latest.exc_string if latest is not None else "") or ""
        d["error"] = exc.strip().splitlines()[-1] if exc.strip() else status
    elif status == "abandoned":
        ttl = meta.get("heartbeat_ttl") or _heartbeat_ttl()
        d["error"] = (f"no heartbeat for over TRAINING_HEARTBEAT_TTL={ttl:g} s: its worker and "
                      f"work-horse are gone; `retry` resumes it, `cancel` drops it")
    return d


def _eta(meta: dict) -> dict:
    """{"eta_s", "eta_at"}: the job's last estimate of its time left (backend.finetune.Eta), less
    the time since it was made; {} when it has none yet."""
    eta, at = meta.get("eta_s"), meta.get("at")
    if not isinstance(eta, (int, float)) or not isinstance(at, (int, float)):
        return {}
    left = max(0.0, eta - (time.time() - at))
    end = dt.datetime.fromtimestamp(time.time() + left, dt.timezone.utc)
    return {"eta_s": round(left), "eta_at": end.isoformat(timespec="seconds")}


def _heartbeat_ttl() -> float:
    return float(JobSettings.from_env().heartbeat_ttl)


def _abandoned(conn, job) -> bool:
    """A started job whose heartbeat lapsed, and that started long enough ago to have had one (its
    own TRAINING_HEARTBEAT_TTL, from its meta; this process's setting if it has not said yet)."""
    if conn.exists(key("alive", job.id)):
        return False
    started = job.started_at
    if started is None:
        return False

    ttl = job.meta.get("heartbeat_ttl") or _heartbeat_ttl()
    return (rq_now() - started).total_seconds() > float(ttl)


def fail_abandoned(conn, job, why: str) -> None:
    """Move an abandoned job to failed now (what RQ's own cleanup does minutes later)."""
    with conn.pipeline() as pipe:
        for execution in job.get_executions():
            execution.delete(job=job, pipeline=pipe)
        record_job_failure(job, why, pipe)
        pipe.execute()


def list_jobs(conn, queue: str, project: Optional[str] = None, limit: int = 20) -> List[dict]:
    q = Queue(queue, connection=conn)
    ids = list(q.job_ids)
    for reg in (StartedJobRegistry, FinishedJobRegistry, FailedJobRegistry):
        ids += reg(queue=q).get_job_ids()
    out = []
    for jid in dict.fromkeys(ids):
        info = job_info(conn, jid)
        if info and (project is None or str(info["project"]) == str(project)):
            out.append(info)
    out.sort(key=lambda d: d.get("enqueued_at") or "", reverse=True)
    return out[:limit]
