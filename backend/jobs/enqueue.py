"""Enqueueing fine-tuning jobs: from the backend's /webhook (`enqueue_webhook`, Redis only, a few
ms), the CLI (`enqueue_training`) and the annotation counter's re-derivation (`resync_counter`).

- START_TRAINING enqueues a job for the project; ANNOTATION_CREATED/UPDATED with a mask region
  count towards TRAIN_EVERY_N_ANNOTATIONS (0 = count only) and enqueue when the count is reached.
- At most one *pending* job per project: simclick:pending:<project> names the job that has not
  started pulling annotations yet; later triggers fold into it (the answer names that job). The job
  clears the pointer when it starts pulling, so triggers during a training queue one more job.
- The same delivery twice (identical body within WEBHOOK_DEDUP_SECONDS) is handled once; the
  second answer names the first one's job.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any, Dict, Optional

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

from ..registry import ProjectRegistry, default_root, project_key
from training.redisconn import connect

from ..config import Config
from .keys import COUNT, LIVE, key, text
from .settings import JobSettings

log = logging.getLogger(__name__)

# The job function by its public name, not the object: RQ stores this string with each job, and
# `backend.jobs.run_training_job` stays importable whichever module of the package holds it (a job
# queued before an upgrade still runs after it).
JOB_FUNCTION = "backend.jobs.run_training_job"


def _job_status(conn, job_id: str) -> Optional[str]:
    try:
        return str(Job.fetch(job_id, connection=conn).get_status().value)
    except NoSuchJobError:
        return None


def enqueue_training(conn, project: Any, *, settings: Optional[JobSettings] = None, trigger: str = "manual",
                     overrides: Optional[dict] = None, export: Optional[str] = None) -> tuple[str, bool]:
    """Enqueue a fine-tuning job for the project, or fold into its pending one.
    Returns (job id, created)."""
    s = settings or JobSettings.from_env()
    pid = project_key(project)
    pending = key("pending", pid)
    with conn.lock(key("enqueue-lock", pid), timeout=10, blocking_timeout=5):
        cur = text(conn.get(pending))
        if cur and _job_status(conn, cur) in LIVE:
            conn.incr(key("folded", cur))
            conn.expire(key("folded", cur), s.result_ttl)
            log.info("project %s: %s folded into pending job %s", pid, trigger, cur)
            return cur, False
        seq = conn.incr(key("jobseq", pid))
        # Every key a webhook makes expires (an unauthenticated request must not grow Redis for good):
        # the sequence only makes ids readable (the suffix makes them unique), the pending pointer
        # and a job that no worker started go after TRAINING_RESULT_TTL.
        conn.expire(key("jobseq", pid), s.result_ttl)
        # The suffix keeps ids unique if Redis is ever flushed (the registry keys reservations by job id).
        job_id = f"train-p{pid}-{seq}-{uuid.uuid4().hex[:6]}"
        Queue(s.queue, connection=conn).enqueue_call(
            func=JOB_FUNCTION, args=(pid,), kwargs={"overrides": overrides or None, "export": export},
            timeout=s.job_timeout, result_ttl=s.result_ttl, failure_ttl=s.result_ttl, ttl=s.result_ttl, job_id=job_id,
            description=f"fine-tune project {pid} ({trigger})",
            meta={"project": pid, "stage": "queued", "percent": 0, "trigger": trigger,
                  "enqueued": time.time()})
        conn.set(pending, job_id, ex=s.result_ttl)
        log.info("project %s: %s enqueued job %s on %s", pid, trigger, job_id, s.queue)
        return job_id, True


def has_mask_region(annotation: Any) -> bool:
    if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
        return False
    return any(isinstance(r, dict) and str(r.get("type", "")).lower() in ("brushlabels", "polygonlabels")
               for r in annotation.get("result") or [])


def enqueue_webhook(event, *, redis_url: Optional[str] = None, queue: Optional[str] = None,
                    train_every: Optional[int] = None, dedup_seconds: Optional[int] = None,
                    timeout: float = 0.5) -> dict:
    """TRAINING_ENQUEUE target for backend/webhook.py: called with a WebhookEvent, only talks to
    Redis (each command waits at most `timeout` s), returns {"job": id or None, "training": what
    happened}. Raises if Redis is unreachable (the backend answers 503 with the reason)."""
    s = JobSettings.from_env(redis_url=redis_url or None, queue=queue or None, train_every=train_every,
                             dedup_seconds=dedup_seconds)
    conn = connect(s.redis_url, timeout=timeout)
    pid = event.project_id
    body = json.dumps(event.payload, sort_keys=True, default=str).encode()
    dkey = key("delivery", hashlib.sha1(body).hexdigest())
    if not conn.set(dkey, "", nx=True, ex=max(1, s.dedup_seconds)):
        first = text(conn.get(dkey)) or None
        return {"job": first, "training": "duplicate delivery: handled already"
                + (f" (job {first})" if first else "")}
    answer: Dict[str, Any]
    try:
        if event.action == "START_TRAINING":
            job_id, created = enqueue_training(conn, pid, settings=s, trigger="START_TRAINING")
            answer = {"job": job_id, "training": "enqueued" if created else "folded into the pending job"}
        elif not has_mask_region(event.payload.get("annotation")):
            answer = {"job": None, "training": "not counted: cancelled or no mask region"}
        else:
            n, due = conn.eval(COUNT, 1, key("annotations", pid), s.train_every, s.result_ttl)
            if due:
                job_id, created = enqueue_training(conn, pid, settings=s, trigger=f"{n} annotations")
                answer = {"job": job_id, "training": f"{n} annotations: "
                          + ("enqueued" if created else "folded into the pending job")}
            elif s.train_every > 0:
                answer = {"job": None, "training": f"{n}/{s.train_every} annotations until the next fine-tuning"}
            else:
                answer = {"job": None, "training": f"{n} annotation(s) since the last trigger; automatic "
                                                   f"fine-tuning is off (TRAIN_EVERY_N_ANNOTATIONS=0)"}
    except BaseException as e:
        # A redelivery may try again; a Redis that does not answer is not asked once more (the
        # webhook must answer within Label Studio's second), the key expires by itself.
        if not isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
            try:
                conn.delete(dkey)
            except redis.RedisError:
                pass
        raise
    conn.set(dkey, answer["job"] or "", ex=max(1, s.dedup_seconds), xx=True)
    return answer



def resync_counter(conn, project: Any, settings: Optional[JobSettings] = None, registry_root=None) -> dict:
    """Re-derive the annotation counter from Label Studio: annotations updated after the newest one
    the project's latest version was trained on; enqueue if that reaches TRAIN_EVERY_N_ANNOTATIONS."""
    from ..labelstudio import pull  # imports torch (model.checkpoint): enqueue and status stay light

    s = settings or JobSettings.from_env()
    pid = project_key(project)
    reg = ProjectRegistry(registry_root or default_root(), pid)
    trained = [v.info.get("data", {}).get("latest_annotation") for v in reg.versions()]
    cutoff = max((t for t in trained if t), default="")
    cfg = Config.from_env()
    _, tasks = pull.fetch_tasks(pull.ls_client(cfg.label_studio_url, cfg.label_studio_api_key), int(pid))
    n = sum(1 for t in tasks for a in t.get("annotations") or []
            if has_mask_region(a) and str(a.get("updated_at") or a.get("created_at") or "") > cutoff)
    conn.set(key("annotations", pid), n)
    out = {"project": pid, "annotations_since_last_training": n, "cutoff": cutoff or None, "job": None}
    if s.train_every > 0 and n >= s.train_every:
        out["job"], _ = enqueue_training(conn, pid, settings=s, trigger="resync")
        conn.set(key("annotations", pid), 0)
    return out
