"""A fine-tuning job's settings: FINETUNE_* environment variables (declared in model/settings.py,
printed by `python -m backend.jobs --help-env`), a job's own overrides winning."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional

from model.settings import (FINETUNE_BATCH_SIZE, FINETUNE_BENCH_DATASETS, FINETUNE_BENCH_LIMIT, FINETUNE_BENCH_MARGIN,
                            FINETUNE_BOX_MARGIN, FINETUNE_CHECKPOINT_EVERY, FINETUNE_CONFIDENT_HOLDOUT,
                            FINETUNE_CROP_SIZE, FINETUNE_DEVICE, FINETUNE_DISTILL, FINETUNE_EVAL_COARSE_SIZE, FINETUNE_EVAL_WORKERS,
                            FINETUNE_FOCUS_PROB,
                            FINETUNE_FREEZE_BN, FINETUNE_GPUS, FINETUNE_HOLDOUT_FRACTION, FINETUNE_INTERPOLATE, FINETUNE_KEEP_WORKDIR,
                            FINETUNE_L2SP, FINETUNE_LABELS, FINETUNE_LR, FINETUNE_MIN_AREA, FINETUNE_MIN_GAIN,
                            FINETUNE_MIN_HOLDOUT, FINETUNE_MIN_TRAIN, FINETUNE_REHEARSAL, FINETUNE_ROUTED_REHEARSAL, FINETUNE_ROUTE_MIN, FINETUNE_ROUTING, FINETUNE_SEED,
                            FINETUNE_SIM_ROUNDS, FINETUNE_STEPS, FINETUNE_THREADS, FINETUNE_WARMUP_STEPS, env_field,
                            read_with_overrides)


@dataclass
class FinetuneSettings:
    """A fine-tuning job's settings (FINETUNE_*, declared in model/settings.py)."""
    steps: int = env_field(FINETUNE_STEPS)
    batch_size: int = env_field(FINETUNE_BATCH_SIZE)
    crop_size: int = env_field(FINETUNE_CROP_SIZE)
    lr: float = env_field(FINETUNE_LR)
    warmup_steps: int = env_field(FINETUNE_WARMUP_STEPS)
    max_sim_rounds: int = env_field(FINETUNE_SIM_ROUNDS)
    focus_prob: float = env_field(FINETUNE_FOCUS_PROB)
    rehearsal: float = env_field(FINETUNE_REHEARSAL)
    routed_rehearsal: float = env_field(FINETUNE_ROUTED_REHEARSAL)
    freeze_bn: bool = env_field(FINETUNE_FREEZE_BN)
    distill: float = env_field(FINETUNE_DISTILL)
    routing: bool = env_field(FINETUNE_ROUTING)
    route_min: float = env_field(FINETUNE_ROUTE_MIN)
    interpolate: float = env_field(FINETUNE_INTERPOLATE)
    l2sp: float = env_field(FINETUNE_L2SP)
    checkpoint_every: int = env_field(FINETUNE_CHECKPOINT_EVERY)
    holdout_fraction: float = env_field(FINETUNE_HOLDOUT_FRACTION)
    min_holdout: int = env_field(FINETUNE_MIN_HOLDOUT)
    min_train: int = env_field(FINETUNE_MIN_TRAIN)
    min_area: int = env_field(FINETUNE_MIN_AREA)
    labels: str = env_field(FINETUNE_LABELS)
    bench_datasets: str = env_field(FINETUNE_BENCH_DATASETS)
    bench_limit: int = env_field(FINETUNE_BENCH_LIMIT)
    bench_margin: float = env_field(FINETUNE_BENCH_MARGIN)
    min_holdout_gain: float = env_field(FINETUNE_MIN_GAIN)
    box_margin: float = env_field(FINETUNE_BOX_MARGIN)
    confident_holdout: int = env_field(FINETUNE_CONFIDENT_HOLDOUT)
    eval_coarse_size: int = env_field(FINETUNE_EVAL_COARSE_SIZE)
    eval_workers: int = env_field(FINETUNE_EVAL_WORKERS)
    device: str = env_field(FINETUNE_DEVICE)
    threads: int = env_field(FINETUNE_THREADS)
    gpus: int = env_field(FINETUNE_GPUS)
    seed: int = env_field(FINETUNE_SEED)
    keep_workdir: bool = env_field(FINETUNE_KEEP_WORKDIR)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides) -> "FinetuneSettings":
        """From `env` (default os.environ); a job's overrides that are not None win."""
        s = cls(**read_with_overrides(cls, env, overrides, "fine-tuning"))
        if s.steps < 1 or s.batch_size < 1 or s.crop_size < 32:
            raise ValueError("FINETUNE_STEPS, FINETUNE_BATCH_SIZE must be >= 1, FINETUNE_CROP_SIZE >= 32")
        if s.gpus < 1 or s.batch_size % s.gpus:
            raise ValueError(f"FINETUNE_GPUS={s.gpus}: must be >= 1 and divide FINETUNE_BATCH_SIZE={s.batch_size} "
                             "(the global batch is split evenly over the processes)")
        shares = (s.rehearsal, s.routed_rehearsal, s.l2sp)
        if not all(0 <= x < 1 for x in shares) or not 0 <= s.focus_prob <= 1 or s.eval_workers < 0:
            raise ValueError("FINETUNE_REHEARSAL, FINETUNE_ROUTED_REHEARSAL and FINETUNE_L2SP must be in [0, 1), "
                             "FINETUNE_FOCUS_PROB in [0, 1], FINETUNE_EVAL_WORKERS >= 0")
        if not 0 < s.route_min <= 1:
            raise ValueError("FINETUNE_ROUTE_MIN must be in (0, 1]")
        if not 0 < s.interpolate <= 1 or s.distill < 0 or (s.distill > 0 and s.rehearsal <= 0):
            raise ValueError("FINETUNE_INTERPOLATE must be in (0, 1], FINETUNE_DISTILL >= 0; distillation teaches on "
                             "the rehearsal samples: FINETUNE_DISTILL > 0 needs FINETUNE_REHEARSAL > 0")
        return s

    def to_dict(self) -> dict:
        return asdict(self)
