"""The Flask app Label Studio talks to.

Routes (what Label Studio 1.23 calls, plus some for operators):
  GET  /health          liveness, base model version, each project's served and promoted version
  POST /setup           project connect: checks the label config, remembers hostname/token
  GET  /versions        model versions (?project=N: that project's registry versions)
  POST /predict         interactive masks (params.context) or batch (context null)
  POST /webhook         project events (validated, recorded, training events enqueued)
  GET  /webhook/events  the last webhook events received by this worker (no annotation data)
  GET  /jobs/<id>       a fine-tuning job: status, stage, percent, result or error
  GET  /jobs?project=N  recent fine-tuning jobs
  POST /admin/rollback  {"project": N, "to": optional version}: serve another registry version
  POST /admin/jobs/<id>/cancel  cancel a fine-tuning job (queued, running or abandoned)

Each project is served by its promoted registry version (backend/model_router.py), reloaded within
MODEL_RELOAD_INTERVAL seconds of a promotion or rollback, without a restart.

Access (README, Security): with BASIC_AUTH_USER/PASS every route but GET /health needs them.
/admin/* change the served model: they need ADMIN_TOKEN as a Bearer token, or basic auth when no
ADMIN_TOKEN is set, and are off (403) with neither.

The routes are a Blueprint (backend/routes.py) over the service object, `Backend` here;
`create_app` builds both. Error statuses: backend/errors.py.
"""
from __future__ import annotations

import functools
import logging
import re
import time
import uuid
import weakref
from typing import Any

import cv2
import numpy as np
from flask import Flask

from model.interface import ClickPredictor
from model.predictor import Predictor
from .registry import ProjectRegistry, RegistryError, projects
from training.redisconn import connect

from .bytecache import ByteCache
from .config import DEFAULT_ENQUEUE, Config
from .engine import Deadline, PredictTimeout, Segmenter, SharedPrompts
from .errors import ApiError, api_error, error_response
from .jobs import cancel_job as cancel_training_job, job_info, list_jobs
from .labelstudio.fetch import ImageFetcher, SetupInfo
from .labelstudio.labelconfig import LabelConfigError, parse_label_config
from .labelstudio.masks import mask_to_polygons, mask_to_rle
from .labelstudio.urls import UrlError, parse_http_url
from .model_router import ModelRouter, Served
from .payload import PayloadError, decode_brushes, parse_predict, parse_prompts, scale_prompt
from .projects import KnownProjects
from .routes import bp
from .webhook import WebhookHandler, load_enqueue

log = logging.getLogger("backend")

MODEL_CLASS = "SimClick"
MB = 2 ** 20
MAX_JOBS_LIMIT = 1000
BATCH_OFF = ("batch predictions are off for SimClick: it answers clicks and boxes only (turn on Interactive "
             "preannotations and Auto-Annotation, see docs/annotators.md)")
# /setup is unauthenticated (without basic auth): what it may make the backend keep is bounded.
# Label Studio sends "3.1795584533", a URL and a token of a few hundred characters.
SETUP_FIELD_CHARS = {"project": 100, "hostname": 2048, "access_token": 8192}
SETUPS_BYTES = 4 * MB
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")         # what RQ accepts (ours: train-p5-12-a1b2c3)
__all__ = ["ApiError", "Backend", "create_app", "error_response", "make_enqueue", "make_shared_prompts",
           "result_items"]


class RedactingFilter(logging.Filter):
    """Replaces every known secret (API keys, exchanged access tokens, /setup tokens) by ***."""

    def __init__(self):
        super().__init__()
        self.backends = weakref.WeakSet()

    def secrets(self) -> set[str]:
        out: set[str] = set()
        for b in list(self.backends):
            out.update(s for s in b.secrets() if s and len(s) >= 6)
        return out

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self.secrets()
        if not secrets:
            return True
        msg = record.getMessage()
        exc = record.exc_text
        for s in secrets:
            msg = msg.replace(s, "***")
            if exc:
                exc = exc.replace(s, "***")
        record.msg, record.args, record.exc_text = msg, None, exc
        return True


REDACTOR = RedactingFilter()


class Backend:
    """The service behind the routes (backend/routes.py): everything one worker holds, i.e. the
    settings, models per project, caches, image fetcher, setups, webhooks and the training queue."""

    def __init__(self, config: Config, predictor: ClickPredictor):
        self.cfg = config
        self.fetcher = ImageFetcher(config)
        # One byte budget for the images, one for the click sessions of every model.
        self.images = ByteCache(config.image_cache_mb * MB, config.cache_ttl)
        self.sessions = ByteCache(config.session_cache_mb * MB, config.cache_ttl)
        self.shared_prompts = make_shared_prompts(config)
        base = Served(version=str(predictor.version), predictor=predictor,
                      segmenter=self.make_segmenter(predictor))
        self.models = ModelRouter(base, config.registry_root(), config.model_reload_interval,
                                  config.project_models, load=self.load_predictor,
                                  make_segmenter=self.make_segmenter,
                                  retire=lambda served: served.segmenter.forget())
        self.models.watch()          # a promotion is loaded when it happens, in the background
        self.known = KnownProjects(config.redis_url, config.redis_timeout, config.registry_root())
        self.webhooks = WebhookHandler(make_enqueue(config), config.webhook_history, known=self.known.knows)
        # /setup records by project string (unauthenticated: bounded per field and in all)
        self.setups = ByteCache(SETUPS_BYTES)
        if config.label_studio_api_key and not config.label_studio_url:
            log.warning("LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: the key is only ever "
                        "sent to LABEL_STUDIO_URL, so it is not used")

    def make_segmenter(self, predictor: ClickPredictor) -> Segmenter:
        return Segmenter(predictor, self.sessions, self.cfg.box_margin, self.cfg.mask_threshold,
                         shared=self.shared_prompts)

    def load_predictor(self, path) -> ClickPredictor:
        return Predictor.load(str(path), device=self.cfg.device or None, runtime=self.cfg.inference_runtime)

    # The base model (MODEL_CHECKPOINT): what projects without a promoted version get.
    @property
    def predictor(self) -> ClickPredictor:
        return self.models.base.predictor

    @property
    def segmenter(self) -> Segmenter:
        return self.models.base.segmenter

    @property
    def version(self) -> str:
        return self.models.base.version

    def health(self) -> dict:
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": self.version,
                "device": str(getattr(self.predictor, "device", "")),
                "runtime": str(getattr(self.predictor, "runtime", "torch")), "sessions": len(self.sessions),
                "projects": self.models.overview(),
                "caches": {"sessions": self.sessions.stats(), "images": self.images.stats()}}

    def secrets(self) -> list[str]:
        return (self.cfg.secrets() + self.fetcher.secrets()
                + [s.access_token for s in self.setups.values() if s.access_token])

    # -- /setup ----------------------------------------------------------------------------------
    def setup(self, body) -> dict:
        if not isinstance(body, dict):
            raise ApiError("the /setup body must be a JSON object")
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            raise ApiError("/setup needs 'schema' (the project's label config)")
        try:
            lc = parse_label_config(schema)
        except LabelConfigError as e:
            raise ApiError(str(e)) from None
        if not any(c.tag in ("BrushLabels", "PolygonLabels") for c in lc.controls):
            raise ApiError("the label config has no <BrushLabels> (or <PolygonLabels>) control for "
                           "the masks: add one with the same labels as the smart KeyPointLabels")
        hostname = body.get("hostname") or ""
        token = body.get("access_token") or ""
        if not isinstance(hostname, str) or not isinstance(token, str):
            raise ApiError("hostname and access_token must be strings")
        project = str(body.get("project") or "")
        for name, value in (("project", project), ("hostname", hostname), ("access_token", token)):
            if len(value) > SETUP_FIELD_CHARS[name]:
                raise ApiError(f"/setup {name} is {len(value)} characters, over {SETUP_FIELD_CHARS[name]}")
        if hostname:
            try:
                parse_http_url(hostname)
            except UrlError as e:
                raise ApiError(f"hostname refused: {e}") from None
        self.setups.put(project, SetupInfo(hostname, token), len(project) + len(hostname) + len(token) + 256)
        self.known.add(project)              # its training webhooks may reach the queue now
        return {"model_version": self.models.for_project(project).version}

    # -- /predict --------------------------------------------------------------------------------
    def predict(self, body) -> dict:
        t0 = time.perf_counter()
        deadline = Deadline(self.cfg.predict_timeout)     # one for all the labels of the request
        try:
            req = parse_predict(body)
        except PayloadError as e:
            raise ApiError(str(e), e.status) from None
        served = self.models.for_project(req.project)
        if not req.interactive:
            # Batch ("Retrieve predictions", or a task being opened): off. A click model has
            # nothing to say before the first click. One empty prediction list per task makes
            # Label Studio store nothing and log no error; an empty stored prediction would mark
            # the task as predicted and hide the model from it. Label Studio shows no message of
            # a backend's, so the answer's "detail" is for whoever reads the API or this log.
            log.info("predict batch: %d task(s): %s", len(req.tasks), BATCH_OFF)
            return {"results": [[] for _ in req.tasks], "model_version": served.version, "detail": BATCH_OFF}
        try:
            prompts = parse_prompts(req.context or [], self.cfg.max_image_pixels, self.cfg.max_clicks,
                                    self.cfg.max_brush_pixels, req.label_config.negative_controls)
        except PayloadError as e:
            raise ApiError(str(e), e.status) from None
        task = req.tasks[0]
        # Every prompt's output control and image first: a config problem costs no model run, and
        # no brush stroke is decoded for a request that is refused anyway.
        try:
            targets = [(p, *req.label_config.output_for(p.label, p.to_name, self.cfg.output_format),
                        req.label_config.image_key(p.to_name)) for p in prompts]
            decode_brushes(prompts)
        except LabelConfigError as e:
            raise ApiError(str(e)) from None
        except PayloadError as e:
            raise ApiError(str(e), e.status) from None
        items, scores, stats = [], [], []
        setup = self.setups.get(req.project)
        for prompt, control, label, data_key in targets:
            url = task["data"].get(data_key)
            key = self.fetcher.cache_key(url, setup, req.project)
            image = self.image(key, url, setup)
            height, width = image.shape[:2]
            try:
                outcome = served.segmenter.segment(key, image, scale_prompt(prompt, width, height), deadline)
            except PayloadError as e:
                raise ApiError(str(e), e.status) from None
            except PredictTimeout as e:
                raise ApiError(f"the model ran {e.done} of {e.total} steps (clicks, strokes) of label "
                               f"{label!r} within PREDICT_TIMEOUT={self.cfg.predict_timeout:g} s; they are "
                               f"kept: send the request again to continue, or raise PREDICT_TIMEOUT", 503) from None
            mask = outcome.full_mask(height, width)
            # "3c/1run": 3 clicks, one network run; "+box": the box was a prompt of its own.
            stats.append(f"{label}:{outcome.clicks}c{'+box' if outcome.box else ''}/{outcome.ran}run")
            if not mask.any():
                log.info("task %s label %r: empty mask, no region returned", task.get("id"), label)
                continue
            score = outcome.score
            # Answer in the size the editor drew on (it equals the image unless EXIF disagrees).
            ow, oh = prompt.size or (width, height)
            if (ow, oh) != (width, height):
                mask = cv2.resize(mask.astype(np.uint8), (ow, oh), interpolation=cv2.INTER_NEAREST) > 0
            items += result_items(control, label, prompt.to_name, mask, score, self.cfg.polygon_tolerance,
                                  self.cfg.mask_alpha)
            scores.append(score)
        log.info("predict task=%s %s %.0f ms", task.get("id"), " ".join(stats) or "no prompts",
                 (time.perf_counter() - t0) * 1000)
        score = float(np.mean(scores)) if scores else 0.0
        return {"results": [{"result": items, "score": score, "model_version": served.version}],
                "model_version": served.version}

    def image(self, key: str, url, setup) -> np.ndarray:
        """The decoded image, cached under `key` (ImageFetcher.cache_key: what decides its bytes)."""
        img = self.images.get(key)
        if img is None:
            img = self.fetcher.fetch(url, setup)
            self.images.put(key, img, img.nbytes)
        return img

    # -- registry and jobs -------------------------------------------------------------------------
    def registry(self, project):
        root = self.cfg.registry_root()
        if root is None:
            raise ApiError("the model registry is off (MODEL_REGISTRY=off)", 404)
        try:
            return ProjectRegistry(root, project)
        except RegistryError as e:   # not a project id: 400
            raise api_error(e, 400) from None

    def versions(self, project=None) -> dict:
        root = self.cfg.registry_root()
        out: dict[str, Any] = {"model_version": self.version, "versions": [self.version]}
        if root is None:
            return out
        if project not in (None, ""):
            d = self.registry(project).describe()
            served = self.models.for_project(project)
            names = [v["name"] for v in d["versions"]]
            out = {"model_version": served.version, "project": d["project"], "promoted": d["promoted"],
                   "versions": ([self.version] if self.version not in names else []) + names,
                   "details": d["versions"]}
            note = self.models.note(project)
            if note:
                out["fallback"] = note
            return out
        per_project = {}
        for pid in projects(root):
            d = self.registry(pid).describe()
            per_project[pid] = {"promoted": d["promoted"], "versions": [v["name"] for v in d["versions"]]}
            out["versions"] += [n for n in per_project[pid]["versions"] if n not in out["versions"]]
        if per_project:
            out["projects"] = per_project
        return out

    def rollback(self, data, remote_addr: str | None) -> dict:
        """POST /admin/rollback: serve another registry version of a project."""
        usage = "the body must be {\"project\": N} (and optionally \"to\": a version name)"
        if not isinstance(data, dict) or isinstance(data.get("project"), bool) \
                or not isinstance(data.get("project"), (int, str)) or data.get("project") == "":
            raise ApiError(usage)
        if not isinstance(data.get("to"), (str, type(None))) or not isinstance(data.get("reason"), (str, type(None))):
            raise ApiError(usage + "; \"to\" and \"reason\" are strings")
        reg = self.registry(data["project"])
        try:
            v = reg.rollback(data.get("to"), reason=data.get("reason") or "", actor=f"http {remote_addr}")
        except RegistryError as e:   # VersionNotFound 404, RollbackConflict 409 (errors.ERROR_STATUS)
            raise api_error(e, 404) from None
        log.warning("project %s rolled back to %s by %s", reg.project, v.name, remote_addr)
        return {"project": reg.project, "promoted": v.name, "reload_within_s": self.cfg.model_reload_interval}

    # -- the training queue ------------------------------------------------------------------------
    def redis(self):
        if not self.cfg.redis_url:
            raise ApiError("no training queue: set REDIS_URL", 404)
        return connect(self.cfg.redis_url, timeout=self.cfg.redis_timeout)

    def jobs(self, project: str | None, limit_text: str) -> dict:
        """GET /jobs: the recent fine-tuning jobs (of one project)."""
        try:
            limit = int(limit_text)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_JOBS_LIMIT:
            raise ApiError(f"limit must be an integer from 1 to {MAX_JOBS_LIMIT}")
        try:
            found = list_jobs(self.redis(), self.cfg.training_queue, project, limit)
        except ApiError:
            raise
        except Exception as e:
            raise _unreachable(e) from None
        return {"jobs": found}

    def job(self, job_id: str) -> dict:
        """GET /jobs/<id>."""
        _check_job_id(job_id)
        try:
            info = job_info(self.redis(), job_id)
        except ApiError:
            raise
        except Exception as e:
            raise _unreachable(e) from None
        if info is None:
            raise ApiError(f"no job {job_id} (unknown, or expired after TRAINING_RESULT_TTL)", 404)
        return info

    def cancel_job(self, job_id: str, remote_addr: str | None) -> dict:
        """POST /admin/jobs/<id>/cancel."""
        _check_job_id(job_id)
        try:
            out = cancel_training_job(self.redis(), job_id, f"http {remote_addr}")
        except ApiError:
            raise
        except RuntimeError as e:   # JobNotFound 404, JobConflict 409 (errors.ERROR_STATUS)
            raise api_error(e, 409) from None
        except Exception as e:
            raise _unreachable(e) from None
        log.warning("job %s: %s by %s", job_id, out["status"], remote_addr)
        return out


def _check_job_id(job_id: str) -> None:
    """RQ refuses other characters with a ValueError, which must not read as an unreachable queue."""
    if not JOB_ID.fullmatch(job_id):
        raise ApiError(f"not a job id: {job_id[:40]!r} (letters, digits, '-' and '_', at most 128)")


def _unreachable(e: Exception) -> ApiError:
    return ApiError(f"the training queue is unreachable: {type(e).__name__}: {e}", 503)


def make_shared_prompts(config: Config) -> SharedPrompts | None:
    """SHARED_PROMPTS: the smart rectangles of the sessions in Redis, for several replicas."""
    if config.shared_prompts == "off" or not config.redis_url:   # "on" without REDIS_URL: refused by Config
        return None

    return SharedPrompts(connect(config.redis_url, timeout=config.redis_timeout), config.cache_ttl,
                         max_session_bytes=max(0, config.shared_session_kb) * 1024)


def make_enqueue(config: Config):
    """TRAINING_ENQUEUE -> the function; the default RQ enqueue gets this backend's settings."""
    fn = load_enqueue(config.training_enqueue)
    if fn is not None and config.training_enqueue == DEFAULT_ENQUEUE:
        fn = functools.partial(fn, redis_url=config.redis_url, queue=config.training_queue,
                               train_every=config.train_every, timeout=config.redis_timeout)
    return fn


def result_items(control, label: str, to_name: str, mask: np.ndarray, score: float,
                 polygon_tolerance: float = 1.5, mask_alpha: int = 255) -> list:
    """Label Studio result regions for one object's mask: one brush region (its RLE's alpha
    `mask_alpha`, see MASK_ALPHA), or one polygon per connected piece when the output control is
    PolygonLabels."""
    h, w = mask.shape
    base = {"from_name": control.name, "to_name": to_name, "original_width": w,
            "original_height": h, "image_rotation": 0, "score": score, "readonly": False}
    if control.tag == "BrushLabels":
        return [dict(base, id=uuid.uuid4().hex[:10], type="brushlabels",
                     value={"format": "rle", "rle": mask_to_rle(mask, mask_alpha),
                                            "brushlabels": [label]})]
    return [dict(base, id=uuid.uuid4().hex[:10], type="polygonlabels",
                 value={"points": pts, "polygonlabels": [label], "closed": True})
            for pts in mask_to_polygons(mask, polygon_tolerance)]


def create_app(config: Config | None = None, predictor=None) -> Flask:
    """Build the app: the service (`Backend`) and the routes over it (backend/routes.py). Without a
    predictor, load MODEL_CHECKPOINT on DEVICE (in each worker: gunicorn must not --preload, CUDA
    does not survive fork)."""
    config = config or Config.from_env()
    if predictor is None:
        predictor = Predictor.load(config.checkpoint, device=config.device or None, runtime=config.inference_runtime)
    backend = Backend(config, predictor)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_content_length
    app.json.sort_keys = False  # type: ignore[attr-defined]  # DefaultJSONProvider's; typed as the base
    app.extensions["simclick"] = backend
    app.register_blueprint(bp)
    _install_redaction(backend)
    return app


def _install_redaction(backend: Backend) -> None:
    """Redact secrets on the root logger's handlers (where every record ends up) and at the source
    for our own and the servers' loggers, whatever handler they reach."""
    REDACTOR.backends.add(backend)
    for target in logging.getLogger().handlers + [logging.getLogger(n) for n in (
            "backend", "werkzeug", "gunicorn.error", "gunicorn.access")]:
        if REDACTOR not in target.filters:
            target.addFilter(REDACTOR)
