"""Fine-tuning jobs on an RQ queue (Redis): enqueueing from webhooks, the job function, the CLI.

    python -m backend.jobs worker [--burst]             # = make worker; or: rq worker -u $REDIS_URL simclick-training
    python -m backend.jobs status [JOB] [--project P] [--json]
    python -m backend.jobs enqueue --project P [--export FILE] [--steps N] [--bench-limit N] ...
    python -m backend.jobs versions --project P [--json]
    python -m backend.jobs rollback --project P [--to VERSION]
    python -m backend.jobs retry JOB                    # failed, stopped, canceled or abandoned: resumes
    python -m backend.jobs cancel JOB [--wait 30]       # queued: never runs; running: ended (resumable)
    python -m backend.jobs resync --project P           # re-derive the annotation counter from Label Studio

Enqueueing (the backend's /webhook calls `enqueue_webhook`; it only talks to Redis, a few ms): the
triggers, the one pending job per project and the dedup of repeated deliveries are described in
backend/jobs/enqueue.py.
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

Modules: `settings` (JobSettings), `keys` (Redis key names, Lua scripts), `lock` (ProjectLock),
`enqueue` (webhook and CLI triggers, the annotation counter), `run` (the RQ job function), `guard`
(heartbeat, cancel, SIGTERM -> JobInterrupted), `status` (job_info, list_jobs), `control` (retry,
cancel), `cli` (`python -m backend.jobs`). The names below are the package's interface: the backend
(`backend.jobs:enqueue_webhook`, /jobs), RQ (`backend.jobs.run_training_job`) and the tests use them.
"""
from __future__ import annotations

from .cli import main, parser, preload
from .control import JobConflict, JobNotFound, cancel_job, retry_job
from .enqueue import enqueue_training, enqueue_webhook, resync_counter
from .guard import JobGuard, JobInterrupted, interruptible
from .lock import ProjectLock, attempt_owner
from .run import run_training_job
from .settings import JobSettings
from .status import job_info, list_jobs

__all__ = ["JobConflict", "JobGuard", "JobInterrupted", "JobNotFound", "JobSettings", "ProjectLock", "attempt_owner",
           "cancel_job", "enqueue_training", "enqueue_webhook", "interruptible", "job_info", "list_jobs", "main",
           "parser", "preload", "resync_counter", "retry_job", "run_training_job"]
