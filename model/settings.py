"""Every environment variable SimClick reads, each declared once (name, type, default, meaning, the
parts that read it) and parsed by one parser, `Setting.read`. `python -m backend --help-env` and
`python -m backend.jobs --help-env` print `help_text()`.

    from model.settings import REDIS_URL
    url = REDIS_URL.read()                  # os.environ; or REDIS_URL.read({"REDIS_URL": ...})

A dataclass can take its fields from here: `field: int = env_field(FINETUNE_STEPS)` declares the
field with the variable's default, and `read_fields(cls, env)` reads them all
(backend.config.Config, backend.jobs.JobSettings, backend.finetune.FinetuneSettings). Checks that
involve several variables, or one variable's range, stay with those classes.

Why this module is in `model`, the bottom package: all three packages read the environment (model:
the default checkpoint and the registry's folders; training: torchrun's variables, the data and
evaluation paths, the evaluation queue's REDIS_URL; backend: the rest), and the layering (backend
-> training -> model, tests/test_import_layers.py) lets every package import `model` and no other.
One table per package would declare a shared variable (REDIS_URL: backend, worker, evaluation;
DATA_DIR and MODEL_REGISTRY: backend, worker, backend/registry.py) in two places, or put it in the
lowest package that happens to read it, where it would move whenever a new reader appears. The
table holds names, types, defaults and text only, and imports nothing: it knows no more of the
backend than the names of the variables it reads.

tests/test_settings.py checks that the code reads the environment only through this module, and
that every variable declared here is read somewhere. Names shared with Label Studio's own ML
backends (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, BASIC_AUTH_USER/PASS,
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) keep Label Studio's spelling.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

Kind = Union[type, tuple[str, ...]]      # str, int, float, bool, or the allowed words (lower case)


class SettingError(ValueError):
    """An environment variable has a value SimClick cannot use (the message names the variable)."""


@dataclass(frozen=True)
class Setting:
    """One environment variable: its declaration, and `read` / `parse`, the one parser."""
    name: str
    kind: Kind
    default: str              # as it would be set: text; "" = empty
    meaning: str
    read_by: tuple[str, ...]
    fallback: str = ""        # the variable read when this one is unset or blank
    keep_empty: bool = False  # set but blank is the value "" (e.g. "no benchmarks"), not the default

    def read(self, env: Optional[Mapping[str, str]] = None) -> Any:
        """The value in `env` (default os.environ), stripped and parsed; unset or blank = the default."""
        env = os.environ if env is None else env
        raw = (env.get(self.name) or "").strip()
        if not raw and self.fallback:
            raw = (env.get(self.fallback) or "").strip()
        if not raw and not (self.keep_empty and self.name in env):
            raw = self.default
        return self.parse(raw)

    def parse(self, raw: str) -> Any:
        if self.kind is bool:
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(self.kind, tuple):
            if raw.lower() not in self.kind:
                raise SettingError(f"{self.name}={raw!r}: must be one of {', '.join(self.kind)}")
            return raw.lower()
        try:
            return self.kind(raw)
        except ValueError:
            raise SettingError(f"{self.name}={raw!r}: expected {self.kind.__name__}") from None

    def kind_text(self) -> str:
        if isinstance(self.kind, tuple):
            return "/".join(self.kind)             # not "|": help_text() is a Markdown table
        return {bool: "yes/no", str: "text"}.get(self.kind, self.kind.__name__)


ALL: list[Setting] = []


def _declare(name: str, kind: Kind, default: str, read_by: tuple[str, ...], meaning: str, **options) -> Setting:
    setting = Setting(name, kind, default, meaning, read_by, **options)
    ALL.append(setting)
    return setting


def env_field(setting: Setting) -> Any:
    """A dataclass field that `read_fields` fills from `setting`; its default is the setting's."""
    return field(default=setting.read({}), metadata={"setting": setting})


def read_fields(cls: type, env: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """{field name: value} of every field of the dataclass `cls` declared with `env_field`."""
    return {f.name: f.metadata["setting"].read(env) for f in fields(cls) if "setting" in f.metadata}


def read_with_overrides(cls: type, env: Optional[Mapping[str, str]], overrides: Mapping[str, Any],
                        what: str) -> dict[str, Any]:
    """read_fields(cls, env) with `overrides` applied by the one rule of the settings objects: an
    override that is not None wins (None means "not given": the variable's value stays); a name
    that is not a field raises ValueError (a misspelt override must not pass unseen). `what`
    names the settings in that message."""
    values = read_fields(cls, env)
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"unknown {what} settings {sorted(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def variable(cls: type, field_name: str) -> str:
    """The environment variable behind a field of `cls` (for error messages)."""
    return next(f.metadata["setting"].name for f in fields(cls) if f.name == field_name)


_BACKEND, _WORKER, _GUNICORN = ("backend",), ("worker",), ("gunicorn",)
# The worker reads the backend's Label Studio settings (pull, resync), the backend the job queue's
# (it enqueues and shows the jobs the worker runs).
_BOTH = ("backend", "worker")

# -- the backend (backend.config.Config) ----------------------------------------------------------
MODEL_CHECKPOINT = _declare(
    "MODEL_CHECKPOINT", str, "default", _BOTH,
    "checkpoint path: the backend's model without a promoted version, and the start of a project's first "
    "fine-tuning; 'default' = $SIMCLICK_CHECKPOINT or model/weights/simclick-lite2.safetensors")
DEVICE = _declare("DEVICE", str, "", _BACKEND, "torch device (cuda, cuda:1, cpu); empty = cuda if available")
LABEL_STUDIO_URL = _declare(
    "LABEL_STUDIO_URL", str, "", _BOTH,
    "Label Studio base URL, used to download /data/upload/... and /data/local-files/... images")
LABEL_STUDIO_API_KEY = _declare(
    "LABEL_STUDIO_API_KEY", str, "", _BOTH,
    "legacy token or personal access token (JWT refresh token) of a Label Studio user")
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT = _declare(
    "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str, "", _BOTH,
    "Label Studio's own variable, read as LOCAL_FILES_ROOT's default")
LOCAL_FILES_ROOT = _declare(
    "LOCAL_FILES_ROOT", str, "", _BOTH,
    "images under this directory are read from disk: /data/local-files/?d=<rel>, absolute paths "
    "and file:// URLs; default LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; empty = never read disk",
    fallback=LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT.name)
FETCH_TIMEOUT = _declare(
    "FETCH_TIMEOUT", float, "15", _BOTH,
    "seconds one image download may take in all: connect, redirects, token exchange and body")
MAX_IMAGE_BYTES = _declare("MAX_IMAGE_BYTES", int, str(64 * 2**20), _BOTH, "largest image download, bytes")
MAX_IMAGE_PIXELS = _declare("MAX_IMAGE_PIXELS", int, "50000000", _BOTH, "largest image, width x height")
MAX_BRUSH_PIXELS = _declare(
    "MAX_BRUSH_PIXELS", int, "100000000", _BACKEND,
    "most pixels the brush strokes of one /predict may declare in all (original_width x original_height "
    "of each: a stroke decodes to a mask of that size); more is a 413 before any is decoded")
MAX_CONTENT_LENGTH = _declare(
    "MAX_CONTENT_LENGTH", int, str(32 * 2**20), _BACKEND,
    "largest request body, bytes (brush strokes of big images arrive as RLE)")
MAX_CLICKS = _declare(
    "MAX_CLICKS", int, "100", _BACKEND,
    "most smart regions (keypoints, rectangles, brush strokes) in one /predict; more is a 400")
PREDICT_TIMEOUT = _declare(
    "PREDICT_TIMEOUT", float, "60", _BACKEND,
    "seconds of model time one /predict may use (checked between clicks); past it the answer is "
    "503 and the clicks already run stay cached, so the next request continues from them")
SESSION_CACHE_MB = _declare(
    "SESSION_CACHE_MB", int, "2048", _BACKEND,
    "memory (MB) for the click sessions of all models together; least recently used go first")
IMAGE_CACHE_MB = _declare("IMAGE_CACHE_MB", int, "1024", _BACKEND, "memory (MB) for decoded images")
CACHE_TTL = _declare("CACHE_TTL", float, "1800", _BACKEND, "seconds an unused session or image stays cached")
MASK_THRESHOLD = _declare("MASK_THRESHOLD", float, "0.5", _BACKEND, "probability above which a pixel is object")
BOX_MARGIN = _declare(
    "BOX_MARGIN", float, "0.15", _BACKEND,
    "later keypoints of a label keep refining its smart rectangle while they lie within this "
    "margin (fraction of the box size) around it")
OUTPUT_FORMAT = _declare(
    "OUTPUT_FORMAT", ("auto", "brush", "polygon"), "auto", _BACKEND,
    "auto: BrushLabels if the label config has the label, else PolygonLabels")
POLYGON_TOLERANCE = _declare(
    "POLYGON_TOLERANCE", float, "1.5", _BACKEND,
    "polygon simplification tolerance in pixels (cv2.approxPolyDP epsilon)")
MASK_ALPHA = _declare(
    "MASK_ALPHA", int, "128", _BACKEND,
    "128..255: the alpha the brush masks are written with. Label Studio 1.23 draws a mask with the RLE's "
    "alpha times 0.6 (the label colour's own alpha is ignored): 128 lets the image show through a "
    "suggestion; the stored mask keeps this value (a PNG export is 128 where the mask is; readers that "
    "threshold the alpha at > 127, as training/data/sources.py does, still see it); 255 = opaque")
BASIC_AUTH_USER = _declare(
    "BASIC_AUTH_USER", str, "", _BACKEND,
    "with BASIC_AUTH_PASS: require HTTP basic auth (all routes but GET /health)")
BASIC_AUTH_PASS = _declare("BASIC_AUTH_PASS", str, "", _BACKEND, "see BASIC_AUTH_USER")
ADMIN_TOKEN = _declare(
    "ADMIN_TOKEN", str, "", _BACKEND,
    "POST /admin/* (rollback) need `Authorization: Bearer <ADMIN_TOKEN>` (16+ characters); empty = "
    "they need basic auth when BASIC_AUTH_USER is set, and are off (403) otherwise")
TRAINING_ENQUEUE = _declare(
    "TRAINING_ENQUEUE", str, "", _BACKEND,
    "'module:function' called with each ANNOTATION_CREATED/UPDATED and START_TRAINING event; "
    "empty = backend.jobs:enqueue_webhook when REDIS_URL is set, else events are validated, recorded and "
    "acknowledged only; 'off' = never enqueue")
REDIS_URL = _declare(
    "REDIS_URL", str, "", ("backend", "worker", "evaluation"),
    "Redis of the fine-tuning queue (redis://host:6379/0; empty = no queue), and of "
    "`training.evaluate --queue`")
REDIS_TIMEOUT = _declare(
    "REDIS_TIMEOUT", float, "0.5", _BACKEND,
    "seconds the backend waits for Redis per command (/webhook, /jobs); Label Studio waits ~1 s")
SHARED_PROMPTS = _declare(
    "SHARED_PROMPTS", ("auto", "on", "off"), "auto", _BACKEND,
    "several replicas: keep each session's smart rectangle in Redis (REDIS_URL) so a click on another "
    "replica applies it; auto = on when REDIS_URL is set")
SHARED_SESSION_KB = _declare(
    "SHARED_SESSION_KB", int, "4096", _BACKEND,
    "with shared prompts on: also keep each session's steps and masks in Redis (compressed, up to this "
    "many KB; 0 = off) so a click on another replica continues without replaying the earlier clicks")
TRAINING_QUEUE = _declare("TRAINING_QUEUE", str, "simclick-training", _BOTH, "RQ queue the fine-tuning jobs go to")
TRAIN_EVERY_N_ANNOTATIONS = _declare(
    "TRAIN_EVERY_N_ANNOTATIONS", int, "0", _BOTH,
    "enqueue fine-tuning after this many new/updated annotations with a mask; 0 = Train button only")
DATA_DIR = _declare(
    "DATA_DIR", str, "data", ("backend", "worker", "model"),
    "backend and worker data (relative paths from the repository root): registry, job folders")
MODEL_REGISTRY = _declare(
    "MODEL_REGISTRY", str, "", ("backend", "worker", "model"),
    "model registry folder (<project>/promoted.json, versions/); empty = $DATA_DIR/registry; "
    "'off' = the backend always serves MODEL_CHECKPOINT")
MODEL_RELOAD_INTERVAL = _declare(
    "MODEL_RELOAD_INTERVAL", float, "2", _BACKEND,
    "seconds between two checks of a project's promoted-version pointer (hot reload)")
PROJECT_MODELS = _declare("PROJECT_MODELS", int, "4", _BACKEND, "promoted project models kept in memory (LRU)")
WEBHOOK_HISTORY = _declare("WEBHOOK_HISTORY", int, "100", _BACKEND, "webhook events kept for GET /webhook/events")
LOG_LEVEL = _declare("LOG_LEVEL", str, "INFO", ("backend", "gunicorn"), "DEBUG, INFO, WARNING, ERROR")

# -- gunicorn (backend/gunicorn.conf.py, the production server) ------------------------------------
HOST = _declare("HOST", str, "127.0.0.1", _GUNICORN, "gunicorn's address when GUNICORN_BIND is not set")
PORT = _declare("PORT", int, "9090", _GUNICORN, "gunicorn's port when GUNICORN_BIND is not set")
GUNICORN_BIND = _declare("GUNICORN_BIND", str, "", _GUNICORN, "address gunicorn listens on; empty = $HOST:$PORT")
GUNICORN_WORKERS = _declare(
    "GUNICORN_WORKERS", int, "1", _GUNICORN, "processes, each with its own model and caches (see gunicorn.conf.py)")
GUNICORN_THREADS = _declare("GUNICORN_THREADS", int, "4", _GUNICORN, "threads per worker")
GUNICORN_TIMEOUT = _declare("GUNICORN_TIMEOUT", int, "120", _GUNICORN, "seconds before a silent worker is restarted")
GUNICORN_MAX_REQUESTS = _declare(
    "GUNICORN_MAX_REQUESTS", int, "0", _GUNICORN, "recycle a worker after this many requests; 0 = never")

# -- the job queue (backend.jobs.JobSettings) -----------------------------------------------------
TRAINING_JOB_TIMEOUT = _declare("TRAINING_JOB_TIMEOUT", int, str(6 * 3600), _BOTH, "seconds before RQ stops a job")
TRAINING_LOCK_TTL = _declare(
    "TRAINING_LOCK_TTL", int, "30", _BOTH, "seconds the per-project training lock outlives a dead worker")
TRAINING_HEARTBEAT_TTL = _declare(
    "TRAINING_HEARTBEAT_TTL", int, "10", _BOTH,
    "a started job without a heartbeat for this many seconds (its worker and work-horse gone) is "
    "shown as abandoned, and retry/cancel accept it")
WEBHOOK_DEDUP_SECONDS = _declare(
    "WEBHOOK_DEDUP_SECONDS", int, "60", _BOTH, "an identical webhook body within this window is one delivery")
TRAINING_RESULT_TTL = _declare(
    "TRAINING_RESULT_TTL", int, str(7 * 86400), _BOTH, "seconds finished and failed jobs stay visible")

# -- fine-tuning (backend.finetune.FinetuneSettings) ----------------------------------------------
FINETUNE_STEPS = _declare("FINETUNE_STEPS", int, "150", _WORKER, "training steps of one fine-tuning job")
FINETUNE_BATCH_SIZE = _declare("FINETUNE_BATCH_SIZE", int, "4", _WORKER, "crops per step")
FINETUNE_CROP_SIZE = _declare("FINETUNE_CROP_SIZE", int, "256", _WORKER, "training crop side, px")
FINETUNE_LR = _declare("FINETUNE_LR", float, "2e-4", _WORKER, "peak learning rate (backbone gets 0.1x)")
FINETUNE_WARMUP_STEPS = _declare("FINETUNE_WARMUP_STEPS", int, "20", _WORKER, "linear warm-up steps")
FINETUNE_SIM_ROUNDS = _declare("FINETUNE_SIM_ROUNDS", int, "3", _WORKER, "iterative click-simulation rounds per step")
FINETUNE_FOCUS_PROB = _declare(
    "FINETUNE_FOCUS_PROB", float, "0.5", _WORKER, "share of steps that also train the focus view (a second pass)")
FINETUNE_REHEARSAL = _declare(
    "FINETUNE_REHEARSAL", float, "0.5", _WORKER,
    "share of each batch drawn from the base model's training data (SIMCLICK_TRAIN_ROOT), against forgetting, "
    "when the candidate cannot be routed (its weights then answer every image); 0 = the project's annotations only")
FINETUNE_ROUTED_REHEARSAL = _declare(
    "FINETUNE_ROUTED_REHEARSAL", float, "0", _WORKER,
    "the same share when the router tells the project's images apart (decided before training): the fine-tuned "
    "network then answers only images like the project's, and the parent keeps the rest")
FINETUNE_FREEZE_BN = _declare(
    "FINETUNE_FREEZE_BN", bool, "true", _WORKER,
    "every BatchNorm keeps the parent's statistics (the project's images would otherwise replace them)")
FINETUNE_DISTILL = _declare(
    "FINETUNE_DISTILL", float, "1.0", _WORKER,
    "weight of the parent's answers as a target on the rehearsal samples (distillation); 0 = off")
FINETUNE_ROUTING = _declare(
    "FINETUNE_ROUTING", bool, "true", _WORKER,
    "the candidate keeps the parent for images unlike the project's (a router on the image picks the network, "
    "model/routing.py); used when the router tells the holdout from held-out base images")
FINETUNE_ROUTE_MIN = _declare(
    "FINETUNE_ROUTE_MIN", float, "0.9", _WORKER,
    "the router is used when at least this share of the holdout images goes to the fine-tuned network and of "
    "held-out base training images to the parent")
FINETUNE_INTERPOLATE = _declare(
    "FINETUNE_INTERPOLATE", float, "0.5", _WORKER,
    "without routing, the candidate is parent + this x (trained - parent) (weight-space ensembling, WiSE-FT); "
    "1 = the trained weights")
FINETUNE_L2SP = _declare(
    "FINETUNE_L2SP", float, "0", _WORKER,
    "per step, this share of every weight's distance to the parent's is taken back (L2-SP); 0 = off")
FINETUNE_CHECKPOINT_EVERY = _declare(
    "FINETUNE_CHECKPOINT_EVERY", int, "25", _WORKER, "steps between resumable states (a retried job resumes)")
FINETUNE_HOLDOUT_FRACTION = _declare(
    "FINETUNE_HOLDOUT_FRACTION", float, "0.2", _WORKER, "share of annotated tasks held out for the promotion test")
FINETUNE_MIN_HOLDOUT = _declare("FINETUNE_MIN_HOLDOUT", int, "2", _WORKER, "at least this many holdout tasks")
FINETUNE_MIN_TRAIN = _declare("FINETUNE_MIN_TRAIN", int, "4", _WORKER, "no training with fewer usable training regions")
FINETUNE_MIN_AREA = _declare(
    "FINETUNE_MIN_AREA", int, "400", _WORKER, "regions smaller than this many pixels are skipped")
FINETUNE_LABELS = _declare(
    "FINETUNE_LABELS", str, "", _WORKER, "comma-separated labels to learn from; empty = all")
FINETUNE_BENCH_DATASETS = _declare(
    "FINETUNE_BENCH_DATASETS", str, "GrabCut,Berkeley", _WORKER,
    "benchmarks checked before a promotion; set but empty = none", keep_empty=True)
FINETUNE_BENCH_LIMIT = _declare(
    "FINETUNE_BENCH_LIMIT", int, "20", _WORKER,
    "first N instances of each benchmark whose image is not in the project; 0 = all")
FINETUNE_BENCH_MARGIN = _declare(
    "FINETUNE_BENCH_MARGIN", float, "0.1", _WORKER, "largest NoC@90 increase allowed on a benchmark")
FINETUNE_BOX_MARGIN = _declare(
    "FINETUNE_BOX_MARGIN", float, "0.02", _WORKER,
    "largest drop of the holdout's box-alone mean IoU allowed (a parent that reads boxes)")
FINETUNE_MIN_GAIN = _declare("FINETUNE_MIN_GAIN", float, "0.0", _WORKER, "holdout NoC@90 must drop by more than this")
FINETUNE_CONFIDENT_HOLDOUT = _declare(
    "FINETUNE_CONFIDENT_HOLDOUT", int, "10", _WORKER,
    "a decision on fewer holdout instances is marked low-confidence (in its reason and 'confidence')")
FINETUNE_EVAL_COARSE_SIZE = _declare(
    "FINETUNE_EVAL_COARSE_SIZE", int, "0", _WORKER, "coarse view of the evaluation predictor; 0 = predictor default")
FINETUNE_EVAL_WORKERS = _declare(
    "FINETUNE_EVAL_WORKERS", int, "0", _WORKER,
    "evaluation processes (one torch thread each); 0 = one per CPU core, 1 on a GPU")
FINETUNE_DEVICE = _declare("FINETUNE_DEVICE", str, "", _WORKER, "cpu or cuda; empty = cuda if available")
FINETUNE_THREADS = _declare("FINETUNE_THREADS", int, "0", _WORKER, "torch CPU threads; 0 = torch default")
FINETUNE_GPUS = _declare(
    "FINETUNE_GPUS", int, "1", _WORKER,
    "training processes: > 1 trains data-parallel with torchrun, one process per GPU (FINETUNE_BATCH_SIZE "
    "is the global batch, a multiple of it); evaluation stays on one device")
FINETUNE_SEED = _declare("FINETUNE_SEED", int, "0", _WORKER, "seed of the split and of training")
FINETUNE_KEEP_WORKDIR = _declare(
    "FINETUNE_KEEP_WORKDIR", bool, "false", _WORKER, "keep DATA_DIR/jobs/<job> after a finished job")

# -- the model, training and evaluation (paths, torchrun) -----------------------------------------
SIMCLICK_CHECKPOINT = _declare(
    "SIMCLICK_CHECKPOINT", str, "", ("model",),
    "the checkpoint 'default' means (MODEL_CHECKPOINT, the CLIs); empty = the shipped "
    "model/weights/simclick-lite2.safetensors")
INFERENCE_RUNTIME = _declare(
    "INFERENCE_RUNTIME", ("auto", "openvino", "onnxruntime", "torch"), "auto", ("backend", "worker", "evaluation"),
    "what runs the network on CPU (model/runtime.py): auto = OpenVINO if installed, else ONNX Runtime, else "
    "PyTorch; a conversion that fails is logged and PyTorch serves. GPUs and training always use PyTorch")
INFERENCE_CACHE = _declare(
    "INFERENCE_CACHE", str, "", ("backend", "worker", "evaluation"),
    "folder of the converted models, one per checkpoint hash and runtime; empty = $DATA_DIR/inference-cache")
INFERENCE_CACHE_KEEP = _declare(
    "INFERENCE_CACHE_KEEP", int, "8", ("backend", "worker", "evaluation"),
    "converted models kept in INFERENCE_CACHE, the most recently used; older ones are deleted when a new "
    "one is written (each is about the checkpoint's size); 0 = keep all")
INFERENCE_THREADS = _declare(
    "INFERENCE_THREADS", int, "0", ("backend", "worker", "evaluation"),
    "CPU threads of the OpenVINO / ONNX Runtime inference; 0 = as many as PyTorch uses (torch.get_num_threads)")
SIMCLICK_EVAL_DB = _declare(
    "SIMCLICK_EVAL_DB", str, "", ("evaluation",),
    "evaluation history database: a SQLite path or a PostgreSQL URL; empty = data/evaluation.sqlite in the "
    "repository")
SIMCLICK_DATA_ROOT = _declare(
    "SIMCLICK_DATA_ROOT", str, "", ("evaluation",),
    "the evaluation benchmarks' folder (GrabCut, Berkeley, DAVIS); empty = ../shared/datasets beside the "
    "repository")
SIMCLICK_TRAIN_ROOT = _declare(
    "SIMCLICK_TRAIN_ROOT", str, "", ("training",),
    "the training data's folder; empty = ../shared/datasets/train beside the repository")
WORLD_SIZE = _declare("WORLD_SIZE", int, "1", ("training",), "set by torchrun: the number of training processes")
LOCAL_RANK = _declare("LOCAL_RANK", int, "0", ("training",), "set by torchrun: this process's GPU on its machine")
SIMCLICK_DIST_TIMEOUT_S = _declare(
    "SIMCLICK_DIST_TIMEOUT_S", float, "3600", ("training",),
    "how long a training process waits for the others (rank 0 validates meanwhile)")

# Variables of earlier versions that are not read any more, and what replaced them.
RETIRED = {"SESSION_CACHE_SIZE": "the session cache is sized by memory, see SESSION_CACHE_MB",
           "IMAGE_CACHE_SIZE": "the image cache is sized by memory, see IMAGE_CACHE_MB"}


def retired(env: Optional[Mapping[str, str]] = None) -> list[str]:
    """A warning for each retired variable that is still set."""
    env = os.environ if env is None else env
    return [f"{name} is no longer read: {now}" for name, now in RETIRED.items() if (env.get(name) or "").strip()]


def help_text() -> str:
    lines = ["| variable | type | default | read by | meaning |", "|---|---|---|---|---|"]
    for s in ALL:
        default = f"`{s.default}`" if s.default else ""
        lines.append(f"| `{s.name}` | {s.kind_text()} | {default} | {', '.join(s.read_by)} | {s.meaning} |")
    return "\n".join(lines)
