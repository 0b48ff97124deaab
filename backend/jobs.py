"""Fine-tuning jobs on an RQ queue (Redis): enqueueing from webhooks, the job function, the CLI.

    python -m backend.jobs worker [--burst]             # = make worker; or: rq worker -u $REDIS_URL simclick-training
    python -m backend.jobs status [JOB] [--project P] [--json]
    python -m backend.jobs enqueue --project P [--export FILE] [--steps N] [--bench-limit N] ...
    python -m backend.jobs versions --project P [--json]
    python -m backend.jobs rollback --project P [--to VERSION]
    python -m backend.jobs retry JOB                    # failed, stopped, canceled or abandoned: resumes
    python -m backend.jobs cancel JOB [--wait 30]       # queued: never runs; running: ended (resumable)
    python -m backend.jobs resync --project P           # re-derive the annotation counter from Label Studio

Enqueueing (the backend's /webhook calls `enqueue_webhook`; it only talks to Redis, a few ms):
- START_TRAINING enqueues a job for the project; ANNOTATION_CREATED/UPDATED with a mask region
  count towards TRAIN_EVERY_N_ANNOTATIONS (0 = count only) and enqueue when the count is reached.
- At most one *pending* job per project: simclick:pending:<project> names the job that has not
  started pulling annotations yet; later triggers fold into it (the answer names that job). The job
  clears the pointer when it starts pulling, so triggers during a training queue one more job.
- The same delivery twice (identical body within WEBHOOK_DEDUP_SECONDS) is handled once; the
  second answer names the first one's job.
- Redis unreachable: the enqueue raises, the backend answers 503 with the reason. Nothing is lost
  for good: a job pulls every finished annotation of the project from Label Studio, so the next
  trigger (Train button, `enqueue`, or `resync`) covers whatever arrived meanwhile.

The job (`run_training_job`, run by the worker) holds a per-project Redis lock
(simclick:train-lock:<project>, a lease renewed by a heartbeat thread) for the whole fine-tuning,
so two workers on one queue never train the same project at once: the second waits (job.meta
stage "waiting"). The lock's owner is one *attempt* of a job (job id + a random token), not the
job: a work-horse whose worker was SIGKILLed lives on in its own process group until its guard
notices (below), and a `retry` meanwhile starts a second attempt with the same job id; that
attempt waits until the first one ends (it still renews its lease) or dies (its lease expires
after TRAINING_LOCK_TTL seconds), then resumes training from the last saved state. A job killed mid-way
leaves the registry untouched (versions are registered only at the end, atomically).

Stopping and crashing: each job runs a guard thread (`JobGuard`) that renews a heartbeat key
(simclick:alive:<job>, TTL TRAINING_HEARTBEAT_TTL); a started job without one is shown as
"abandoned" within seconds, and `retry`/`cancel` accept it at once. The guard also ends the job
(`JobInterrupted`, its lock released, its saved state kept) when it is cancelled
(simclick:cancel:<job>, set by `cancel` or POST /admin/jobs/<id>/cancel) or when the worker that
forked it died; and the worker's stop (SIGTERM/SIGINT) ends its running job the same way instead
of waiting for it. A job with too few annotations finishes at once as "skipped", with the reason.
Progress is in job.meta: stage (queued, waiting, pull, evaluate_parent, train, evaluate_candidate,
register, promote, done, skipped, interrupted), percent, detail, eta_s (backend.finetune.Eta) and
timings (seconds per stage done); `status` and /jobs show the time left (eta_s, eta_at) and where
the time went (timings).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, cast

import redis
from rq import Queue, SimpleWorker, Worker, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job_lifecycle import record_job_failure
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry, clean_registries
from rq.utils import now as rq_now

from model.registry import ProjectRegistry, RegistryError, default_root, project_key
from model.settings import (REDIS_URL, TRAIN_EVERY_N_ANNOTATIONS, TRAINING_HEARTBEAT_TTL, TRAINING_JOB_TIMEOUT,
                            TRAINING_LOCK_TTL, TRAINING_QUEUE, TRAINING_RESULT_TTL, WEBHOOK_DEDUP_SECONDS,
                            env_field, help_text, read_fields)
from training.redisconn import connect

from .config import Config
from .finetune import FinetuneSettings, run_finetune

log = logging.getLogger(__name__)

PREFIX = "simclick:"
LIVE = ("queued", "deferred", "scheduled", "started")

@dataclass
class JobSettings:
    """The job queue's settings (declared in model/settings.py); the backend enqueues with them, the
    worker runs the jobs."""
    redis_url: str = env_field(REDIS_URL)
    queue: str = env_field(TRAINING_QUEUE)
    train_every: int = env_field(TRAIN_EVERY_N_ANNOTATIONS)
    job_timeout: int = env_field(TRAINING_JOB_TIMEOUT)
    lock_ttl: int = env_field(TRAINING_LOCK_TTL)
    heartbeat_ttl: int = env_field(TRAINING_HEARTBEAT_TTL)
    dedup_seconds: int = env_field(WEBHOOK_DEDUP_SECONDS)
    result_ttl: int = env_field(TRAINING_RESULT_TTL)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides) -> "JobSettings":
        """From `env` (default os.environ); overrides that are not None win (unknown names are ignored)."""
        values = read_fields(cls, env)
        values.update({k: v for k, v in overrides.items() if v is not None and k in values})
        return cls(**values)


def _key(*parts: Any) -> str:
    return PREFIX + ":".join(str(p) for p in parts)


def _s(v) -> Optional[str]:
    return v.decode() if isinstance(v, bytes) else v


# Atomic helpers (Lua): compare-and-delete, compare-and-expire, acquire-or-take-over, counter.
_CAD = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_EXTEND = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
           "end return 0")
_ACQUIRE = ("local cur = redis.call('GET', KEYS[1]) "
            "if (not cur) or cur == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return '' end "
            "return cur")
_COUNT = ("local n = redis.call('INCR', KEYS[1]) redis.call('EXPIRE', KEYS[1], ARGV[2]) "
          "local every = tonumber(ARGV[1]) "
          "if every > 0 and n >= every then redis.call('SET', KEYS[1], 0, 'EX', ARGV[2]) return {n, 1} end "
          "return {n, 0}")


class ProjectLock:
    """One training at a time per project, across workers and machines: a Redis key holding the
    owner (one attempt of a job, see `attempt_owner`) with a lease (TTL) that a heartbeat thread
    renews. An owner that dies stops renewing and the lease expires; only the same owner may take
    it over before that."""

    def __init__(self, conn, project: str, owner: str, ttl: float = 30.0):
        self.conn, self.project, self.owner = conn, str(project), owner
        self.key = _key("train-lock", project)
        self.ttl_ms = int(ttl * 1000)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost = False

    def holder(self) -> Optional[str]:
        return _s(self.conn.get(self.key))

    def try_acquire(self) -> Optional[str]:
        """None if acquired, else the job id that holds it."""
        cur = self.conn.eval(_ACQUIRE, 1, self.key, self.owner, self.ttl_ms)
        cur = _s(cur)
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
                if not self.conn.eval(_EXTEND, 1, self.key, self.owner, self.ttl_ms):
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
            self.conn.eval(_CAD, 1, self.key, self.owner)
        except Exception as e:
            log.warning("could not release the training lock of project %s (it expires by itself): %s",
                        self.project, e)


def attempt_owner(job_id: str) -> str:
    """The lock owner of one attempt of a job: two attempts of the same job (a retry while an
    orphaned work-horse still runs) are two owners, so the second waits for the first."""
    return f"{job_id}/{uuid.uuid4().hex[:12]}"


def _waiting_for(holder: str, job_id: str, pid: str) -> str:
    holder_job = holder.split("/", 1)[0]
    if holder_job == job_id:
        return (f"an earlier attempt of this job still holds project {pid}'s training lock (a work-horse "
                f"that outlived its worker?); waiting until it finishes or its lease expires")
    return f"project {pid} is being trained by job {holder_job}"


# -- enqueueing ------------------------------------------------------------------------------------
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
    pending = _key("pending", pid)
    with conn.lock(_key("enqueue-lock", pid), timeout=10, blocking_timeout=5):
        cur = _s(conn.get(pending))
        if cur and _job_status(conn, cur) in LIVE:
            conn.incr(_key("folded", cur))
            conn.expire(_key("folded", cur), s.result_ttl)
            log.info("project %s: %s folded into pending job %s", pid, trigger, cur)
            return cur, False
        seq = conn.incr(_key("jobseq", pid))
        # Every key a webhook makes expires (an unauthenticated request must not grow Redis for good):
        # the sequence only makes ids readable (the suffix makes them unique), the pending pointer
        # and a job that no worker started go after TRAINING_RESULT_TTL.
        conn.expire(_key("jobseq", pid), s.result_ttl)
        # The suffix keeps ids unique if Redis is ever flushed (the registry keys reservations by job id).
        job_id = f"train-p{pid}-{seq}-{uuid.uuid4().hex[:6]}"
        Queue(s.queue, connection=conn).enqueue_call(
            func=run_training_job, args=(pid,), kwargs={"overrides": overrides or None, "export": export},
            timeout=s.job_timeout, result_ttl=s.result_ttl, failure_ttl=s.result_ttl, ttl=s.result_ttl, job_id=job_id,
            description=f"fine-tune project {pid} ({trigger})",
            meta={"project": pid, "stage": "queued", "percent": 0, "trigger": trigger,
                  "enqueued": time.time()})
        conn.set(pending, job_id, ex=s.result_ttl)
        log.info("project %s: %s enqueued job %s on %s", pid, trigger, job_id, s.queue)
        return job_id, True


def _has_mask_region(annotation: Any) -> bool:
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
    dkey = _key("delivery", hashlib.sha1(body).hexdigest())
    if not conn.set(dkey, "", nx=True, ex=max(1, s.dedup_seconds)):
        first = _s(conn.get(dkey)) or None
        return {"job": first, "training": "duplicate delivery: handled already"
                + (f" (job {first})" if first else "")}
    answer: Dict[str, Any]
    try:
        if event.action == "START_TRAINING":
            job_id, created = enqueue_training(conn, pid, settings=s, trigger="START_TRAINING")
            answer = {"job": job_id, "training": "enqueued" if created else "folded into the pending job"}
        elif not _has_mask_region(event.payload.get("annotation")):
            answer = {"job": None, "training": "not counted: cancelled or no mask region"}
        else:
            n, due = conn.eval(_COUNT, 1, _key("annotations", pid), s.train_every, s.result_ttl)
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


# -- the job ---------------------------------------------------------------------------------------
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


class JobNotFound(RuntimeError):
    """No job with that id (unknown, or expired after TRAINING_RESULT_TTL)."""


class JobConflict(RuntimeError):
    """The job is in a state the operation does not apply to (cancel a finished job, retry a
    running one)."""


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
            self.conn.set(_key("alive", self.job_id), str(os.getpid()), ex=max(1, int(round(self.ttl))))
            who = self.conn.get(_key("cancel", self.job_id))
        except Exception as e:       # Redis briefly away: the heartbeat lapses, the job goes on
            log.warning("job %s: heartbeat failed: %s", self.job_id, e)
            return None
        if who is None:
            return None
        self.cancelled = True
        return f"cancelled by {_s(who)}"

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        try:
            self.conn.delete(_key("alive", self.job_id))
        except Exception:
            pass


def _forking_worker_pid(conn, job) -> Optional[int]:
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


def run_training_job(project: Any, overrides: Optional[dict] = None, export: Optional[str] = None) -> dict:
    """The RQ job: take the project's training lock, fine-tune, release. See backend.finetune."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = cast(Job, get_current_job())        # run by an RQ worker: there is a current job
    conn = job.connection
    s = JobSettings.from_env()
    guard = JobGuard(conn, job.id, s.heartbeat_ttl, _forking_worker_pid(conn, job))
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
    lock.acquire(on_wait=lambda holder: meta.update(stage="waiting", detail=_waiting_for(holder, job.id, pid)))
    try:
        meta.update(lock_acquired=time.time(), detail="")
        conn.eval(_CAD, 1, _key("pending", pid), job.id)   # later triggers queue the next job
        rates_key = _key("rates", socket.gethostname())
        result = run_finetune(pid, job.id, settings, progress=meta.progress, export=export,
                              before_register=lock.check, rates=_load_rates(conn, rates_key))
        _save_rates(conn, rates_key, result.get("rates"))
        return result
    finally:
        meta.update(lock_released=time.time())
        lock.release()


def _load_rates(conn, key: str) -> dict:
    """Speeds measured by this host's previous job (seconds per training step, per evaluation click):
    the ETA's guess before the job has measured its own."""
    try:
        return {_s(k): float(v) for k, v in conn.hgetall(key).items()}
    except Exception:
        return {}


def _save_rates(conn, key: str, rates: Optional[dict]) -> None:
    if rates:
        try:
            conn.hset(key, mapping={k: v for k, v in rates.items() if v})
        except Exception as e:
            log.warning("could not save the measured speeds: %s", e)


# -- status ----------------------------------------------------------------------------------------
def _existing_job_info(conn, job_id: str) -> dict:
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
         "description": job.description, "folded_triggers": int(conn.get(_key("folded", job.id)) or 0),
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
    if conn.exists(_key("alive", job.id)):
        return False
    started = job.started_at
    if started is None:
        return False

    ttl = job.meta.get("heartbeat_ttl") or _heartbeat_ttl()
    return (rq_now() - started).total_seconds() > float(ttl)


def _fail_abandoned(conn, job, why: str) -> None:
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


def retry_job(conn, job_id: str) -> str:
    """Requeue a failed (or stopped) job with the same id, on the queue it came from: it resumes
    from its saved state."""
    job = Job.fetch(job_id, connection=conn)
    status = _existing_job_info(conn, job_id)["status"]
    if status == "abandoned":
        _fail_abandoned(conn, job, "abandoned: no heartbeat (retried)")
    elif str(job.get_status().value) == "canceled":
        raise JobConflict(f"job {job_id} was cancelled before it started: enqueue a new one")
    elif status not in ("failed", "stopped", "canceled"):
        raise JobConflict(f"job {job_id} is {status}; only failed, stopped, canceled or abandoned jobs are retried")
    conn.delete(_key("cancel", job_id))
    pid = job.meta.get("project")
    job.meta["stage"], job.meta["percent"], job.meta["detail"], job.meta["canceled"] = "queued", 0, "retry", None
    job.save_meta()
    job.requeue()
    if pid is not None:
        with conn.lock(_key("enqueue-lock", pid), timeout=10, blocking_timeout=5):
            if not conn.get(_key("pending", pid)):
                conn.set(_key("pending", pid), job_id)
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
    status = _existing_job_info(conn, job_id)["status"]
    pid = job.meta.get("project")
    if status in ("queued", "deferred", "scheduled"):
        job.cancel()
        if pid is not None:
            conn.eval(_CAD, 1, _key("pending", pid), job_id)     # the next trigger queues a new job
        return {"job": job_id, "status": "canceled", "detail": f"cancelled by {actor} before it started"}
    if status == "abandoned":
        _fail_abandoned(conn, job, f"abandoned; cancelled by {actor}")
        job.meta["canceled"] = f"cancelled by {actor}"
        job.save_meta()
        return {"job": job_id, "status": "canceled", "detail": f"abandoned; cancelled by {actor}"}
    if status != "started":
        raise JobConflict(f"job {job_id} is {status}: nothing to cancel")
    conn.set(_key("cancel", job_id), actor, ex=JobSettings.from_env().result_ttl)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and _existing_job_info(conn, job_id)["status"] == "started":
        time.sleep(0.2)
    info = _existing_job_info(conn, job_id)
    if info["status"] == "started":
        return {"job": job_id, "status": "cancelling",
                "detail": f"cancelled by {actor}; the job ends within seconds (`status {job_id}`)"}
    return {"job": job_id, "status": info["status"], "detail": info.get("error") or info.get("detail")}


# -- CLI -------------------------------------------------------------------------------------------
def preload() -> None:
    """Import what a job needs once, in the worker process: every job's forked work-horse then starts
    warm (about 10 s less per job on a small CPU). Imports only: no torch op runs before the fork."""
    # inside the function on purpose: the worker loads these, the enqueue and status commands do not
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (training.train plots the loss)
    import timm  # noqa: F401
    import torchvision  # noqa: F401
    from label_studio_sdk.client import LabelStudio  # noqa: F401

    import backend.labelstudio.masks  # noqa: F401
    import backend.labelstudio.pull  # noqa: F401
    import model.predictor  # noqa: F401
    import training.data  # noqa: F401
    import training.evaluation.history  # noqa: F401
    import training.evaluation.runner  # noqa: F401
    import training.train  # noqa: F401


def _conn(args):
    s = JobSettings.from_env(redis_url=args.redis_url, queue=args.queue)
    return connect(s.redis_url), s


def _stopping(cls):
    """An RQ worker class whose stop (SIGTERM, SIGINT: docker stop, systemd, Ctrl+C) also ends the
    job it is running, instead of RQ's warm shutdown that waits for the job to finish (a training
    takes many minutes, the supervisor SIGKILLs the worker before, and its work-horse would go on
    alone). The job's SIGTERM handler (`interruptible`) ends it cleanly, failed with the reason;
    `retry` resumes it from its last saved state."""

    class StoppingWorker(cls):
        def request_stop(self, signum, frame):
            horse = getattr(self, "horse_pid", 0)
            if horse:
                self.log.warning("Worker %s: stopping; ending the running job (work-horse %s)", self.name, horse)
                try:
                    os.kill(horse, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            super().request_stop(signum, frame)

    StoppingWorker.__name__ = StoppingWorker.__qualname__ = f"Stopping{cls.__name__}"
    return StoppingWorker


def cmd_worker(args) -> int:
    conn, s = _conn(args)
    conn.ping()
    if not args.no_preload:
        preload()
    cls = SimpleWorker if args.simple else _stopping(Worker)
    worker = cls([Queue(s.queue, connection=conn)], connection=conn, name=args.name)
    worker.work(burst=args.burst, logging_level=args.log_level, with_scheduler=False)
    return 0


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
        return
    if isinstance(obj, dict):
        obj = [obj]
    for d in obj:
        line = f"{d['id']}  {d['status']:<9} project {d['project']}  {d.get('stage') or '':<18} {d.get('percent') or 0:>3}%"
        if d.get("detail"):
            line += f"  {d['detail']}"
        if d.get("eta_s") is not None:
            line += f"  ETA {d['eta_s'] // 60:.0f} min {d['eta_s'] % 60:02.0f} s"
        if d.get("timings"):
            line += "  [" + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s"
                                      for k, v in d["timings"].items()) + "]"
        if d.get("error"):
            line += f"  error: {d['error']}"
        if d["status"] == "skipped":
            line += f"  skipped: {d.get('reason')}"
        elif d.get("result"):
            r = d["result"]
            line += f"  -> {r.get('version')} {r.get('status')}: {r.get('reason')}"
        print(line)


def cmd_status(args) -> int:
    conn, s = _conn(args)
    clean_registries(Queue(s.queue, connection=conn))    # abandoned jobs -> failed
    if args.job:
        info = job_info(conn, args.job)
        if info is None:
            print(f"no job {args.job}", file=sys.stderr)
            return 1
        _print(info, args.json)
        return 0
    jobs = list_jobs(conn, s.queue, args.project, args.limit)
    if not jobs and not args.json:
        print("no jobs")
    else:
        _print(jobs, args.json)
    return 0


def cmd_enqueue(args) -> int:
    conn, s = _conn(args)
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "crop_size": args.crop_size,
                                   "bench_limit": args.bench_limit, "bench_datasets": args.bench_datasets,
                                   "eval_coarse_size": args.eval_coarse_size}.items() if v is not None}
    export = os.path.abspath(args.export) if args.export else None
    job_id, created = enqueue_training(conn, args.project, settings=s, trigger="cli", overrides=overrides,
                                       export=export)
    print(json.dumps({"job": job_id, "created": created}) if args.json
          else f"{job_id} ({'enqueued' if created else 'folded into the pending job'})")
    return 0


def _registry(args):
    return ProjectRegistry(args.registry or default_root(), args.project)


def cmd_versions(args) -> int:
    reg = _registry(args)
    d = reg.describe()
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    if not d["versions"]:
        print(f"project {reg.project}: no versions in {reg.dir}")
        return 0
    for v in d["versions"]:
        mark = "*" if v["promoted"] else " "
        h = (v["metrics"] or {}).get("holdout") or {}
        noc = (f"holdout NoC@90 {h['parent']['noc90']:.2f} -> {h['candidate']['noc90']:.2f}" if h else "")
        dec = v["decision"].get("reason", "") if v["decision"] else ""
        print(f"{mark} {v['name']:<22} {v['kind']:<9} parent {v['parent'] or '-':<22} job {v['job_id'] or '-'}  "
              f"{noc}  {dec}")
    return 0


def cmd_rollback(args) -> int:
    reg = _registry(args)
    v = reg.rollback(args.to, reason=args.reason or "", actor=f"cli {os.environ.get('USER', '')}".strip())
    print(f"project {reg.project}: now serving {v.name}")
    return 0


def cmd_retry(args) -> int:
    conn, _ = _conn(args)
    print(retry_job(conn, args.job))
    return 0


def cmd_cancel(args) -> int:
    conn, _ = _conn(args)
    out = cancel_job(conn, args.job, f"cli {os.environ.get('USER', '')}".strip(), wait=args.wait)
    print(json.dumps(out) if args.json else f"{out['job']}  {out['status']}  {out['detail'] or ''}")
    return 0


def resync_counter(conn, project: Any, settings: Optional[JobSettings] = None, registry_root=None) -> dict:
    """Re-derive the annotation counter from Label Studio: annotations updated after the newest one
    the project's latest version was trained on; enqueue if that reaches TRAIN_EVERY_N_ANNOTATIONS."""
    from .labelstudio import pull  # imports torch (model.checkpoint): enqueue and status stay light

    s = settings or JobSettings.from_env()
    pid = project_key(project)
    reg = ProjectRegistry(registry_root or default_root(), pid)
    trained = [v.info.get("data", {}).get("latest_annotation") for v in reg.versions()]
    cutoff = max((t for t in trained if t), default="")
    cfg = Config.from_env()
    _, tasks = pull.fetch_tasks(pull.ls_client(cfg.label_studio_url, cfg.label_studio_api_key), int(pid))
    n = sum(1 for t in tasks for a in t.get("annotations") or []
            if _has_mask_region(a) and str(a.get("updated_at") or a.get("created_at") or "") > cutoff)
    conn.set(_key("annotations", pid), n)
    out = {"project": pid, "annotations_since_last_training": n, "cutoff": cutoff or None, "job": None}
    if s.train_every > 0 and n >= s.train_every:
        out["job"], _ = enqueue_training(conn, pid, settings=s, trigger="resync")
        conn.set(_key("annotations", pid), 0)
    return out


def cmd_resync(args) -> int:
    conn, s = _conn(args)
    print(json.dumps(resync_counter(conn, args.project, s, args.registry)))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m backend.jobs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--help-env", action="store_true",
                    help="print every environment variable SimClick reads (backend, worker, paths) and exit")
    sub = ap.add_subparsers(dest="command")

    def common(p, registry=False):
        p.add_argument("--redis-url", default=None, help="default $REDIS_URL")
        p.add_argument("--queue", default=None, help="default $TRAINING_QUEUE or simclick-training")
        if registry:
            p.add_argument("--registry", default=None, help="default $MODEL_REGISTRY or $DATA_DIR/registry")

    p = sub.add_parser("worker", help="run an RQ worker on the training queue")
    common(p)
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--simple", action="store_true", help="run jobs in the worker process (no fork)")
    p.add_argument("--name", default=None)
    p.add_argument("--no-preload", action="store_true", help="do not import torch before forking jobs")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("status", help="jobs and their stage/percent (or one job)")
    common(p)
    p.add_argument("job", nargs="?")
    p.add_argument("--project", default=None)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("enqueue", help="enqueue a fine-tuning job (folds into a pending one)")
    common(p)
    p.add_argument("--project", required=True)
    p.add_argument("--export", default=None, help="a Label Studio JSON export instead of the Label Studio API")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--crop-size", type=int)
    p.add_argument("--bench-limit", type=int)
    p.add_argument("--bench-datasets")
    p.add_argument("--eval-coarse-size", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_enqueue)

    p = sub.add_parser("versions", help="the project's registry versions (* = promoted)")
    common(p, registry=True)
    p.add_argument("--project", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_versions)

    p = sub.add_parser("rollback", help="serve the previously promoted version (or --to VERSION)")
    common(p, registry=True)
    p.add_argument("--project", required=True)
    p.add_argument("--to", default=None)
    p.add_argument("--reason", default=None)
    p.set_defaults(fn=cmd_rollback)

    p = sub.add_parser("retry", help="requeue a failed job (resumes from its saved state)")
    common(p)
    p.add_argument("job")
    p.set_defaults(fn=cmd_retry)

    p = sub.add_parser("cancel", help="cancel a job: queued (never runs), running (ended, resumable) or abandoned")
    common(p)
    p.add_argument("job")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a running job to end")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_cancel)

    p = sub.add_parser("resync", help="re-derive the annotation counter from Label Studio")
    common(p, registry=True)
    p.add_argument("--project", required=True)
    p.set_defaults(fn=cmd_resync)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.help_env:
        print(help_text())
        return 0
    if not getattr(args, "fn", None):
        parser().print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except Exception as e:
        if isinstance(e, (RegistryError, RuntimeError)) or type(e).__module__.startswith(("redis", "rq")):
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
