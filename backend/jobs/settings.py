"""The job queue's settings (JobSettings): declared in model/settings.py, read from the environment."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from model.settings import (REDIS_URL, TRAIN_EVERY_N_ANNOTATIONS, TRAINING_HEARTBEAT_TTL, TRAINING_JOB_TIMEOUT,
                            TRAINING_LOCK_TTL, TRAINING_QUEUE, TRAINING_RESULT_TTL, WEBHOOK_DEDUP_SECONDS,
                            env_field, read_with_overrides)


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
        """From `env` (default os.environ); overrides that are not None win, unknown names raise
        (model.settings.read_with_overrides, FinetuneSettings' rule too)."""
        return cls(**read_with_overrides(cls, env, overrides, "job queue"))
