"""Every setting of the backend (the serving side), read from environment variables in one place.

The job queue's and fine-tuning's settings (WEBHOOK_DEDUP_SECONDS, FINETUNE_*..., and again
REDIS_URL, TRAINING_QUEUE) are in backend/jobs.py and backend/finetune.py; backend/settings.py
gathers every table into one, which `python -m backend --help-env` prints. Names
shared with Label Studio's own ML backends (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY,
BASIC_AUTH_USER/PASS, LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) keep Label Studio's spelling.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from .labelstudio.urls import UrlError, parse_http_url


DEFAULT_ENQUEUE = "backend.jobs:enqueue_webhook"
# Variables of earlier versions that are not read any more, and what replaced them.
REPLACED = {"SESSION_CACHE_SIZE": "the session cache is sized by memory, see SESSION_CACHE_MB",
            "IMAGE_CACHE_SIZE": "the image cache is sized by memory, see IMAGE_CACHE_MB"}


class ConfigError(ValueError):
    """An environment variable has a value the backend cannot use."""


def _int(v: str) -> int:
    return int(v)


def _float(v: str) -> float:
    return float(v)


def _str(v: str) -> str:
    return v


def _choice(*allowed: str):
    def parse(v: str) -> str:
        v = v.strip().lower()
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return v
    parse.__name__ = "|".join(allowed)
    return parse


# (field, environment variable, default, parser, help). The default is the string form.
SETTINGS = [
    ("checkpoint", "MODEL_CHECKPOINT", "default", _str,
     "checkpoint path; 'default' = $SIMCLICK_CHECKPOINT or model/weights/simclick-lite2.safetensors"),
    ("device", "DEVICE", "", _str, "torch device (cuda, cuda:1, cpu); empty = cuda if available"),
    ("label_studio_url", "LABEL_STUDIO_URL", "", _str,
     "Label Studio base URL, used to download /data/upload/... and /data/local-files/... images"),
    ("label_studio_api_key", "LABEL_STUDIO_API_KEY", "", _str,
     "legacy token or personal access token (JWT refresh token) of a Label Studio user"),
    ("local_files_root", "LOCAL_FILES_ROOT", "", _str,
     "images under this directory are read from disk: /data/local-files/?d=<rel>, absolute paths "
     "and file:// URLs; default LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; empty = never read disk"),
    ("fetch_timeout", "FETCH_TIMEOUT", "15", _float,
     "seconds one image download may take in all: connect, redirects, token exchange and body"),
    ("max_image_bytes", "MAX_IMAGE_BYTES", str(64 * 2**20), _int, "largest image download, bytes"),
    ("max_image_pixels", "MAX_IMAGE_PIXELS", "50000000", _int, "largest image, width x height"),
    ("max_content_length", "MAX_CONTENT_LENGTH", str(32 * 2**20), _int,
     "largest request body, bytes (brush strokes of big images arrive as RLE)"),
    ("max_clicks", "MAX_CLICKS", "100", _int,
     "most smart regions (keypoints, rectangles, brush strokes) in one /predict; more is a 400"),
    ("predict_timeout", "PREDICT_TIMEOUT", "60", _float,
     "seconds of model time one /predict may use (checked between clicks); past it the answer is "
     "503 and the clicks already run stay cached, so the next request continues from them"),
    ("session_cache_mb", "SESSION_CACHE_MB", "2048", _int,
     "memory (MB) for the click sessions of all models together; least recently used go first"),
    ("image_cache_mb", "IMAGE_CACHE_MB", "1024", _int, "memory (MB) for decoded images"),
    ("cache_ttl", "CACHE_TTL", "1800", _float, "seconds an unused session or image stays cached"),
    ("mask_threshold", "MASK_THRESHOLD", "0.5", _float, "probability above which a pixel is object"),
    ("box_margin", "BOX_MARGIN", "0.15", _float,
     "later keypoints of a label keep refining its smart rectangle while they lie within this "
     "margin (fraction of the box size) around it"),
    ("output_format", "OUTPUT_FORMAT", "auto", _choice("auto", "brush", "polygon"),
     "auto: BrushLabels if the label config has the label, else PolygonLabels"),
    ("polygon_tolerance", "POLYGON_TOLERANCE", "1.5", _float,
     "polygon simplification tolerance in pixels (cv2.approxPolyDP epsilon)"),
    ("basic_auth_user", "BASIC_AUTH_USER", "", _str,
     "with BASIC_AUTH_PASS: require HTTP basic auth (all routes but GET /health)"),
    ("basic_auth_pass", "BASIC_AUTH_PASS", "", _str, "see BASIC_AUTH_USER"),
    ("admin_token", "ADMIN_TOKEN", "", _str,
     "POST /admin/* (rollback) need `Authorization: Bearer <ADMIN_TOKEN>` (16+ characters); empty = "
     "they need basic auth when BASIC_AUTH_USER is set, and are off (403) otherwise"),
    ("training_enqueue", "TRAINING_ENQUEUE", "", _str,
     "'module:function' called with each ANNOTATION_CREATED/UPDATED and START_TRAINING event; "
     f"empty = {DEFAULT_ENQUEUE} when REDIS_URL is set, else events are validated, recorded and "
     "acknowledged only; 'off' = never enqueue"),
    ("redis_url", "REDIS_URL", "", _str,
     "Redis of the fine-tuning queue (redis://host:6379/0); the worker uses the same variable"),
    ("redis_timeout", "REDIS_TIMEOUT", "0.5", _float,
     "seconds the backend waits for Redis per command (/webhook, /jobs); Label Studio waits ~1 s"),
    ("shared_prompts", "SHARED_PROMPTS", "auto", _choice("auto", "on", "off"),
     "several replicas: keep each session's smart rectangle in Redis (REDIS_URL) so a click on another "
     "replica applies it; auto = on when REDIS_URL is set"),
    ("shared_session_kb", "SHARED_SESSION_KB", "4096", _int,
     "with shared prompts on: also keep each session's steps and masks in Redis (compressed, up to this "
     "many KB; 0 = off) so a click on another replica continues without replaying the earlier clicks"),
    ("training_queue", "TRAINING_QUEUE", "simclick-training", _str, "RQ queue the fine-tuning jobs go to"),
    ("train_every", "TRAIN_EVERY_N_ANNOTATIONS", "0", _int,
     "enqueue fine-tuning after this many new/updated annotations with a mask; 0 = Train button only"),
    ("data_dir", "DATA_DIR", "data", _str,
     "backend and worker data (relative paths from the repository root): registry, job folders"),
    ("model_registry", "MODEL_REGISTRY", "", _str,
     "model registry folder (<project>/promoted.json, versions/); empty = $DATA_DIR/registry; "
     "'off' = always serve MODEL_CHECKPOINT"),
    ("model_reload_interval", "MODEL_RELOAD_INTERVAL", "2", _float,
     "seconds between two checks of a project's promoted-version pointer (hot reload)"),
    ("project_models", "PROJECT_MODELS", "4", _int, "promoted project models kept in memory (LRU)"),
    ("webhook_history", "WEBHOOK_HISTORY", "100", _int, "webhook events kept for GET /webhook/events"),
    ("log_level", "LOG_LEVEL", "INFO", _str, "DEBUG, INFO, WARNING, ERROR"),
]


@dataclass(frozen=True)
class Config:
    checkpoint: str
    device: str
    label_studio_url: str
    label_studio_api_key: str
    local_files_root: str
    fetch_timeout: float
    max_image_bytes: int
    max_image_pixels: int
    max_content_length: int
    max_clicks: int
    predict_timeout: float
    session_cache_mb: int
    image_cache_mb: int
    cache_ttl: float
    mask_threshold: float
    box_margin: float
    output_format: str
    polygon_tolerance: float
    basic_auth_user: str
    basic_auth_pass: str
    admin_token: str
    training_enqueue: str
    redis_url: str
    redis_timeout: float
    shared_prompts: str
    shared_session_kb: int
    training_queue: str
    train_every: int
    data_dir: str
    model_registry: str
    model_reload_interval: float
    project_models: int
    webhook_history: int
    log_level: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Config":
        env = os.environ if env is None else env
        for var, now in REPLACED.items():
            if env.get(var, "").strip():
                logging.getLogger("backend").warning("%s is no longer read: %s", var, now)
        values = {}
        for name, var, default, parse, _ in SETTINGS:
            raw = env.get(var, "")
            if var == "LOCAL_FILES_ROOT" and not raw:
                raw = env.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "")
            raw = raw.strip() if raw.strip() else default
            try:
                values[name] = parse(raw)
            except ValueError as e:
                raise ConfigError(f"{var}={raw!r}: {e}") from None
        values.update(overrides)
        enqueue = values["training_enqueue"].strip()
        if enqueue.lower() in ("off", "none", "no", "false", "0"):
            values["training_enqueue"] = ""
        elif not enqueue and values["redis_url"]:
            values["training_enqueue"] = DEFAULT_ENQUEUE
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        positive = ["fetch_timeout", "max_image_bytes", "max_image_pixels", "max_content_length",
                    "max_clicks", "predict_timeout", "session_cache_mb", "image_cache_mb", "cache_ttl",
                    "project_models", "redis_timeout"]
        env_name = {name: var for name, var, *_ in SETTINGS}
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{env_name[name]} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"MASK_THRESHOLD must be in (0, 1), got {self.mask_threshold}")
        if not 0.0 <= self.box_margin <= 2.0:
            raise ConfigError(f"BOX_MARGIN must be in [0, 2], got {self.box_margin}")
        if self.polygon_tolerance < 0:
            raise ConfigError("POLYGON_TOLERANCE must be >= 0")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ConfigError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.label_studio_url:
            if not self.label_studio_url.startswith(("http://", "https://")):
                raise ConfigError(f"LABEL_STUDIO_URL must start with http:// or https://, "
                                  f"got {self.label_studio_url!r}")
            try:
                parse_http_url(self.label_studio_url)
            except UrlError as e:
                raise ConfigError(f"LABEL_STUDIO_URL: {e}") from None
        if self.admin_token and len(self.admin_token) < 16:
            raise ConfigError("ADMIN_TOKEN must be at least 16 characters, e.g. the output of "
                              "python -c 'import secrets; print(secrets.token_urlsafe())'")
        if self.training_enqueue and ":" not in self.training_enqueue:
            raise ConfigError("TRAINING_ENQUEUE must look like 'package.module:function'")
        if self.shared_prompts == "on" and not self.redis_url:
            raise ConfigError("SHARED_PROMPTS=on needs REDIS_URL (the Redis the replicas share)")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        if self.train_every < 0:
            raise ConfigError("TRAIN_EVERY_N_ANNOTATIONS must be >= 0")
        if self.model_reload_interval < 0:
            raise ConfigError("MODEL_RELOAD_INTERVAL must be >= 0")

    def registry_root(self):
        """The model registry folder, or None when MODEL_REGISTRY=off."""
        value = self.model_registry.strip()
        if value.lower() in ("off", "none", "no", "false", "0"):
            return None
        repo = Path(__file__).resolve().parents[1]
        if value:
            p = Path(value).expanduser()
        else:
            p = Path(self.data_dir).expanduser() / "registry"
        return p if p.is_absolute() else repo / p

    def secrets(self) -> list[str]:
        redis_pass = urlsplit(self.redis_url).password if self.redis_url else None
        return [s for s in (self.label_studio_api_key, self.basic_auth_pass, self.admin_token, redis_pass) if s]


# Read by backend/gunicorn.conf.py only (production server), listed here to keep one table.
GUNICORN_SETTINGS = [
    ("GUNICORN_BIND", "$HOST:$PORT = 127.0.0.1:9090", "address gunicorn listens on"),
    ("GUNICORN_WORKERS", "1", "processes, each with its own model and caches (see gunicorn.conf.py)"),
    ("GUNICORN_THREADS", "4", "threads per worker"),
    ("GUNICORN_TIMEOUT", "120", "seconds before a silent worker is restarted"),
    ("GUNICORN_MAX_REQUESTS", "0", "recycle a worker after this many requests; 0 = never"),
]
