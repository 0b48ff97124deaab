"""Every environment variable SimClick reads, in one table: `python -m backend --help-env` and
`python -m backend.jobs --help-env` print it.

The variables are still parsed where they are used: the backend's in backend/config.py (Config),
the job queue's in backend/jobs.py (JobSettings), fine-tuning's in backend/finetune.py
(FinetuneSettings), the registry's folders in model/registry.py, gunicorn's in
backend/gunicorn.conf.py, and a few paths in the modules that need them. This module gathers those
declarations; a variable read in two places (REDIS_URL by the backend and the worker, say) is one
row that names both readers. tests/test_settings.py checks that every variable the code reads is
here, and that two declarations of one variable agree on its default.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.registry import DATA_DIR_ENV, REGISTRY_ENV
from training.evaluation.datasets import DATA_ROOT_ENV

from .config import GUNICORN_SETTINGS, SETTINGS
from .finetune import FINETUNE_SETTINGS
from .jobs import JOB_SETTINGS


@dataclass(frozen=True)
class Variable:
    name: str
    default: str          # as text; "" = none
    meaning: str
    read_by: tuple[str, ...]


def _text(default) -> str:
    return "" if default is None else str(default)


def declarations() -> list[tuple[str, str, str, str]]:
    """(variable, default as text, meaning, reader) of each place that declares a variable, in the
    order: backend, gunicorn, job queue, fine-tuning, paths. A variable may come more than once."""
    # these two modules import torch (seconds): `--help-env` stays fast without them
    from training.data.sources import ENV_TRAIN_ROOT
    from training.evaluation.history import DB_ENV

    out = [(var, _text(default), text, "backend") for _, var, default, _, text in SETTINGS]
    out += [("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "",
             "Label Studio's own variable, read as LOCAL_FILES_ROOT's default", "backend")]
    out += [("HOST", "127.0.0.1", "gunicorn's address when GUNICORN_BIND is not set", "gunicorn"),
            ("PORT", "9090", "gunicorn's port when GUNICORN_BIND is not set", "gunicorn")]
    out += [(var, _text(default), text, "gunicorn") for var, default, text in GUNICORN_SETTINGS]
    out += [("LOG_LEVEL", "INFO", "log level", "gunicorn")]
    out += [(var, _text(default), text, "worker") for _, var, default, text in JOB_SETTINGS + FINETUNE_SETTINGS]
    out += [("MODEL_CHECKPOINT", "default", "the base checkpoint a project's first fine-tuning starts from",
             "worker"),
            (DATA_DIR_ENV, "data", "backend and worker data: registry, job folders", "worker"),
            (REGISTRY_ENV, "", "model registry folder; empty = $DATA_DIR/registry", "worker"),
            ("SIMCLICK_CHECKPOINT", "model/weights/simclick-lite2.safetensors",
             "the checkpoint 'default' means (MODEL_CHECKPOINT, the CLIs)", "model"),
            (DB_ENV, "data/evaluation.sqlite", "evaluation history database: a SQLite path or a PostgreSQL URL",
             "evaluation"),
            (DATA_ROOT_ENV, "../shared/datasets", "the evaluation benchmarks' folder (GrabCut, Berkeley, DAVIS)",
             "evaluation"),
            (ENV_TRAIN_ROOT, "../shared/datasets/train", "the training data's folder", "training"),
            ("WORLD_SIZE", "1", "set by torchrun: the number of training processes", "training"),
            ("LOCAL_RANK", "0", "set by torchrun: this process's GPU on its machine", "training"),
            ("SIMCLICK_DIST_TIMEOUT_S", "3600",
             "how long a training process waits for the others (rank 0 validates meanwhile)", "training")]
    return out


def variables() -> list[Variable]:
    """Every variable once, with every reader; meaning and default from its first declaration."""
    rows: dict[str, Variable] = {}
    for name, default, meaning, reader in declarations():
        old = rows.get(name)
        if old is None:
            rows[name] = Variable(name, default, meaning, (reader,))
        elif reader not in old.read_by:
            rows[name] = Variable(name, old.default, old.meaning, old.read_by + (reader,))
    return list(rows.values())


def help_text() -> str:
    lines = ["| variable | default | read by | meaning |", "|---|---|---|---|"]
    for v in variables():
        default = f"`{v.default}`" if v.default else ""
        lines.append(f"| `{v.name}` | {default} | {', '.join(v.read_by)} | {v.meaning} |")
    return "\n".join(lines)
