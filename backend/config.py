"""The backend's settings (the serving side) as one typed object, `Config`, with the checks that
involve a variable's range or several variables.

Each field is an environment variable declared in model/settings.py, where every variable SimClick
reads is declared once and parsed (`python -m backend --help-env` prints them all).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlsplit

from .registry import registry_folder
from model.settings import (ADMIN_TOKEN, BASIC_AUTH_PASS, BASIC_AUTH_USER, BOX_MARGIN, CACHE_TTL, DATA_DIR, DEVICE,
                            FETCH_TIMEOUT, IMAGE_CACHE_MB, INFERENCE_RUNTIME, LABEL_STUDIO_API_KEY, LABEL_STUDIO_URL,
                            LOCAL_FILES_ROOT, LOG_LEVEL, MASK_ALPHA, MASK_THRESHOLD, MAX_BRUSH_PIXELS, MAX_CLICKS,
                            MAX_CONTENT_LENGTH, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MODEL_CHECKPOINT, MODEL_REGISTRY,
                            MODEL_RELOAD_INTERVAL,
                            OUTPUT_FORMAT, POLYGON_TOLERANCE, PREDICT_TIMEOUT, PROJECT_MODELS, REDIS_TIMEOUT,
                            REDIS_URL, SESSION_CACHE_MB, SHARED_PROMPTS, SHARED_SESSION_KB,
                            TRAIN_EVERY_N_ANNOTATIONS, TRAINING_ENQUEUE, TRAINING_QUEUE, WEBHOOK_HISTORY,
                            SettingError, env_field, read_with_overrides, retired, variable)

from .labelstudio.urls import UrlError, parse_http_url

DEFAULT_ENQUEUE = "backend.jobs:enqueue_webhook"    # TRAINING_ENQUEUE when REDIS_URL is set (its meaning says so)
OFF = ("off", "none", "no", "false", "0")


@dataclass(frozen=True)
class Config:
    checkpoint: str = env_field(MODEL_CHECKPOINT)
    device: str = env_field(DEVICE)
    inference_runtime: str = env_field(INFERENCE_RUNTIME)
    label_studio_url: str = env_field(LABEL_STUDIO_URL)
    label_studio_api_key: str = env_field(LABEL_STUDIO_API_KEY)
    local_files_root: str = env_field(LOCAL_FILES_ROOT)
    fetch_timeout: float = env_field(FETCH_TIMEOUT)
    max_image_bytes: int = env_field(MAX_IMAGE_BYTES)
    max_image_pixels: int = env_field(MAX_IMAGE_PIXELS)
    max_brush_pixels: int = env_field(MAX_BRUSH_PIXELS)
    max_content_length: int = env_field(MAX_CONTENT_LENGTH)
    max_clicks: int = env_field(MAX_CLICKS)
    predict_timeout: float = env_field(PREDICT_TIMEOUT)
    session_cache_mb: int = env_field(SESSION_CACHE_MB)
    image_cache_mb: int = env_field(IMAGE_CACHE_MB)
    cache_ttl: float = env_field(CACHE_TTL)
    mask_threshold: float = env_field(MASK_THRESHOLD)
    box_margin: float = env_field(BOX_MARGIN)
    output_format: str = env_field(OUTPUT_FORMAT)
    polygon_tolerance: float = env_field(POLYGON_TOLERANCE)
    mask_alpha: int = env_field(MASK_ALPHA)
    basic_auth_user: str = env_field(BASIC_AUTH_USER)
    basic_auth_pass: str = env_field(BASIC_AUTH_PASS)
    admin_token: str = env_field(ADMIN_TOKEN)
    training_enqueue: str = env_field(TRAINING_ENQUEUE)
    redis_url: str = env_field(REDIS_URL)
    redis_timeout: float = env_field(REDIS_TIMEOUT)
    shared_prompts: str = env_field(SHARED_PROMPTS)
    shared_session_kb: int = env_field(SHARED_SESSION_KB)
    training_queue: str = env_field(TRAINING_QUEUE)
    train_every: int = env_field(TRAIN_EVERY_N_ANNOTATIONS)
    data_dir: str = env_field(DATA_DIR)
    model_registry: str = env_field(MODEL_REGISTRY)
    model_reload_interval: float = env_field(MODEL_RELOAD_INTERVAL)
    project_models: int = env_field(PROJECT_MODELS)
    webhook_history: int = env_field(WEBHOOK_HISTORY)
    log_level: str = env_field(LOG_LEVEL)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Config":
        """The backend's variables from `env` (default os.environ); `overrides` (field=value) by the
        settings objects' one rule (model.settings.read_with_overrides)."""
        for warning in retired(env):
            logging.getLogger("backend").warning("%s", warning)
        values = read_with_overrides(cls, env, overrides, "backend")
        enqueue = values["training_enqueue"].strip()
        if enqueue.lower() in OFF:
            values["training_enqueue"] = ""
        elif not enqueue and values["redis_url"]:
            values["training_enqueue"] = DEFAULT_ENQUEUE
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        positive = ["fetch_timeout", "max_image_bytes", "max_image_pixels", "max_brush_pixels", "max_content_length",
                    "max_clicks", "predict_timeout", "session_cache_mb", "image_cache_mb", "cache_ttl",
                    "project_models", "redis_timeout"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingError(f"{variable(Config, name)} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise SettingError(f"MASK_THRESHOLD must be in (0, 1), got {self.mask_threshold}")
        if not 0.0 <= self.box_margin <= 2.0:
            raise SettingError(f"BOX_MARGIN must be in [0, 2], got {self.box_margin}")
        if self.polygon_tolerance < 0:
            raise SettingError("POLYGON_TOLERANCE must be >= 0")
        if not 128 <= self.mask_alpha <= 255:     # readers threshold at > 127 (training/data/sources.py)
            raise SettingError(f"MASK_ALPHA must be in 128..255, got {self.mask_alpha}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.label_studio_url:
            if not self.label_studio_url.startswith(("http://", "https://")):
                raise SettingError(f"LABEL_STUDIO_URL must start with http:// or https://, "
                                   f"got {self.label_studio_url!r}")
            try:
                parse_http_url(self.label_studio_url)
            except UrlError as e:
                raise SettingError(f"LABEL_STUDIO_URL: {e}") from None
        if self.admin_token and len(self.admin_token) < 16:
            raise SettingError("ADMIN_TOKEN must be at least 16 characters, e.g. the output of "
                               "python -c 'import secrets; print(secrets.token_urlsafe())'")
        if self.training_enqueue and ":" not in self.training_enqueue:
            raise SettingError("TRAINING_ENQUEUE must look like 'package.module:function'")
        if self.shared_prompts == "on" and not self.redis_url:
            raise SettingError("SHARED_PROMPTS=on needs REDIS_URL (the Redis the replicas share)")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        if self.train_every < 0:
            raise SettingError("TRAIN_EVERY_N_ANNOTATIONS must be >= 0")
        if self.model_reload_interval < 0:
            raise SettingError("MODEL_RELOAD_INTERVAL must be >= 0")

    def registry_root(self) -> Optional[Path]:
        """The model registry folder, or None when MODEL_REGISTRY=off."""
        if self.model_registry.lower() in OFF:
            return None
        return registry_folder(self.model_registry, self.data_dir)

    def secrets(self) -> list[str]:
        redis_pass = urlsplit(self.redis_url).password if self.redis_url else None
        return [s for s in (self.label_studio_api_key, self.basic_auth_pass, self.admin_token, redis_pass) if s]

