"""The Flask app Label Studio talks to.

Routes (what Label Studio 1.23 calls, plus some for operators):
  GET  /health          liveness + model version
  POST /setup           project connect: checks the label config, remembers hostname/token
  GET  /versions        model versions (?project=N: that project's registry versions)
  POST /predict         interactive masks (params.context) or batch (context null)
  POST /webhook         project events (validated, recorded, training events enqueued)
  GET  /webhook/events  the last webhook events received by this worker (no annotation data)
  GET  /jobs/<id>       a fine-tuning job: status, stage, percent, result or error
  GET  /jobs?project=N  recent fine-tuning jobs
  POST /admin/rollback  {"project": N, "to": optional version}: serve another registry version

Each project is served by its promoted registry version (backend/models.py), reloaded within
MODEL_RELOAD_INTERVAL seconds of a promotion or rollback, without a restart.
"""
from __future__ import annotations

import base64
import hmac
import logging
import time
import uuid
import weakref

import cv2
import numpy as np
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from .config import DEFAULT_ENQUEUE, Config
from .engine import Segmenter, TTLCache
from .fetch import FetchError, ImageFetcher, SetupInfo
from .labelconfig import LabelConfigError, parse_label_config
from .masks import mask_to_polygons, mask_to_rle
from .models import ModelRouter, Served
from .payload import PayloadError, parse_predict, parse_prompts, scale_prompt
from .webhook import WebhookError, WebhookHandler, load_enqueue

log = logging.getLogger("backend")

MODEL_CLASS = "SimClick"


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _reason(message: str) -> str:
    """A one-line ASCII form of the message for the HTTP reason phrase: Label Studio shows only
    `str(requests.HTTPError)`, which holds the status line, never the body."""
    text = " ".join(str(message).split()).encode("ascii", "replace").decode("ascii")
    return text[:300]


def error_response(message: str, status: int):
    resp = jsonify({"error": message, "status": status})
    resp.status = f"{status} {_reason(message)}"
    return resp


class RedactingFilter(logging.Filter):
    """Replaces every known secret (API keys, exchanged access tokens, /setup tokens) by ***."""

    def __init__(self):
        super().__init__()
        self.backends = weakref.WeakSet()

    def secrets(self) -> set[str]:
        out = set()
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
    """Everything one worker holds: models per project, caches, image fetcher, setups, webhooks."""

    def __init__(self, config: Config, predictor):
        self.cfg = config
        self.fetcher = ImageFetcher(config)
        self.images = TTLCache(config.image_cache_size, config.cache_ttl)   # shared by every model
        base = Served(version=str(predictor.version), predictor=predictor,
                      segmenter=self.make_segmenter(predictor))
        self.models = ModelRouter(base, config.registry_root(), config.model_reload_interval,
                                  config.project_models, load=self.load_predictor,
                                  make_segmenter=self.make_segmenter)
        self.webhooks = WebhookHandler(make_enqueue(config), config.webhook_history)
        self.setups: dict[str, SetupInfo] = {}

    def make_segmenter(self, predictor) -> Segmenter:
        seg = Segmenter(predictor, self.cfg.session_cache_size, self.cfg.image_cache_size,
                        self.cfg.cache_ttl, self.cfg.box_margin)
        seg.images = self.images
        return seg

    def load_predictor(self, path):
        from model.predictor import Predictor
        return Predictor.load(str(path), device=self.cfg.device or None)

    # The base model (MODEL_CHECKPOINT): what projects without a promoted version get.
    @property
    def predictor(self):
        return self.models.base.predictor

    @property
    def segmenter(self) -> Segmenter:
        return self.models.base.segmenter

    @property
    def version(self) -> str:
        return self.models.base.version

    def secrets(self) -> list[str]:
        return (self.cfg.secrets() + self.fetcher.secrets()
                + [s.access_token for s in list(self.setups.values()) if s.access_token])

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
        self.setups[project] = SetupInfo(hostname, token)
        return {"model_version": self.models.for_project(project).version}

    # -- /predict --------------------------------------------------------------------------------
    def predict(self, body) -> dict:
        t0 = time.perf_counter()
        try:
            req = parse_predict(body)
        except PayloadError as e:
            raise ApiError(str(e)) from None
        served = self.models.for_project(req.project)
        if not req.interactive:
            # Batch ("Retrieve predictions", or a task being opened): a click model has nothing
            # to say before the first click. One empty prediction list per task makes Label
            # Studio store nothing and log no error; an empty stored prediction would mark the
            # task as predicted and hide the model from it.
            log.info("predict batch: %d task(s), no prediction before a click", len(req.tasks))
            return {"results": [[] for _ in req.tasks], "model_version": served.version}
        try:
            prompts = parse_prompts(req.context)
        except PayloadError as e:
            raise ApiError(str(e)) from None
        task = req.tasks[0]
        # Every prompt's output control and image first: a config problem costs no model run.
        try:
            targets = [(p, *req.label_config.output_for(p.label, p.to_name, self.cfg.output_format),
                        req.label_config.image_key(p.to_name)) for p in prompts]
        except LabelConfigError as e:
            raise ApiError(str(e)) from None
        items, scores, stats = [], [], []
        setup = self.setups.get(req.project)
        for prompt, control, label, data_key in targets:
            url = task["data"].get(data_key)
            image = self.image(url, setup)
            height, width = image.shape[:2]
            try:
                outcome = served.segmenter.segment(str(url), image, scale_prompt(prompt, width, height))
            except PayloadError as e:
                raise ApiError(str(e)) from None
            mask = outcome.full_mask(height, width, self.cfg.mask_threshold)
            stats.append(f"{label}:{outcome.clicks}c/{outcome.ran}run")
            if not mask.any():
                log.info("task %s label %r: empty mask, no region returned", task.get("id"), label)
                continue
            f = outcome.frame
            score = float(outcome.prob[mask[f.y0:f.y1, f.x0:f.x1]].mean())
            # Answer in the size the editor drew on (it equals the image unless EXIF disagrees).
            ow, oh = prompt.size or (width, height)
            if (ow, oh) != (width, height):
                mask = cv2.resize(mask.astype(np.uint8), (ow, oh), interpolation=cv2.INTER_NEAREST) > 0
            items += result_items(control, label, prompt.to_name, mask, score, self.cfg.polygon_tolerance)
            scores.append(score)
        log.info("predict task=%s %s %.0f ms", task.get("id"), " ".join(stats) or "no prompts",
                 (time.perf_counter() - t0) * 1000)
        score = float(np.mean(scores)) if scores else 0.0
        return {"results": [{"result": items, "score": score, "model_version": served.version}],
                "model_version": served.version}

    def image(self, url, setup) -> np.ndarray:
        key = str(url)
        img = self.images.get(key)
        if img is None:
            img = self.fetcher.fetch(url, setup)
            self.images.put(key, img)
        return img

    # -- registry and jobs -------------------------------------------------------------------------
    def registry(self, project):
        from training.registry import ProjectRegistry, RegistryError

        root = self.cfg.registry_root()
        if root is None:
            raise ApiError("the model registry is off (MODEL_REGISTRY=off)", 404)
        try:
            return ProjectRegistry(root, project)
        except RegistryError as e:
            raise ApiError(str(e)) from None

    def versions(self, project=None) -> dict:
        from training.registry import projects

        root = self.cfg.registry_root()
        out = {"model_version": self.version, "versions": [self.version]}
        if root is None:
            return out
        if project not in (None, ""):
            d = self.registry(project).describe()
            served = self.models.for_project(project)
            names = [v["name"] for v in d["versions"]]
            return {"model_version": served.version, "project": d["project"], "promoted": d["promoted"],
                    "versions": ([self.version] if self.version not in names else []) + names,
                    "details": d["versions"]}
        per_project = {}
        for pid in projects(root):
            d = self.registry(pid).describe()
            per_project[pid] = {"promoted": d["promoted"], "versions": [v["name"] for v in d["versions"]]}
            out["versions"] += [n for n in per_project[pid]["versions"] if n not in out["versions"]]
        if per_project:
            out["projects"] = per_project
        return out

    def redis(self):
        if not self.cfg.redis_url:
            raise ApiError("no training queue: set REDIS_URL", 404)
        from training.jobs import connect
        return connect(self.cfg.redis_url)


def make_enqueue(config: Config):
    """TRAINING_ENQUEUE -> the function; the default RQ enqueue gets this backend's settings."""
    fn = load_enqueue(config.training_enqueue)
    if fn is not None and config.training_enqueue == DEFAULT_ENQUEUE:
        import functools
        fn = functools.partial(fn, redis_url=config.redis_url, queue=config.training_queue,
                               train_every=config.train_every)
    return fn


def result_items(control, label: str, to_name: str, mask: np.ndarray, score: float,
                 polygon_tolerance: float = 1.5) -> list:
    """Label Studio result regions for one object's mask: one brush region, or one polygon per
    connected piece when the output control is PolygonLabels."""
    h, w = mask.shape
    base = {"from_name": control.name, "to_name": to_name, "original_width": w,
            "original_height": h, "image_rotation": 0, "score": score, "readonly": False}
    if control.tag == "BrushLabels":
        return [dict(base, id=uuid.uuid4().hex[:10], type="brushlabels",
                     value={"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]})]
    return [dict(base, id=uuid.uuid4().hex[:10], type="polygonlabels",
                 value={"points": pts, "polygonlabels": [label], "closed": True})
            for pts in mask_to_polygons(mask, polygon_tolerance)]


def create_app(config: Config | None = None, predictor=None) -> Flask:
    """Build the app. Without a predictor, load MODEL_CHECKPOINT on DEVICE (in each worker:
    gunicorn must not --preload, CUDA does not survive fork)."""
    config = config or Config.from_env()
    if predictor is None:
        from model.predictor import Predictor
        predictor = Predictor.load(config.checkpoint, device=config.device or None)
    backend = Backend(config, predictor)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_content_length
    app.json.sort_keys = False
    app.extensions["simclick"] = backend
    _install_redaction(backend)

    @app.before_request
    def basic_auth():
        if not config.basic_auth_user or (request.path == "/health" and request.method == "GET"):
            return None
        header = request.headers.get("Authorization", "")
        ok = False
        if header.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(header[6:]).decode("utf-8").partition(":")
                ok = (hmac.compare_digest(user, config.basic_auth_user)
                      & hmac.compare_digest(pw, config.basic_auth_pass))
            except (ValueError, UnicodeDecodeError):
                ok = False
        if not ok:
            resp = error_response("authentication required: set the ML backend's basic auth user "
                                  "and password in Label Studio to BASIC_AUTH_USER/BASIC_AUTH_PASS", 401)
            resp.headers["WWW-Authenticate"] = 'Basic realm="simclick"'
            return resp
        return None

    def body():
        data = request.get_json(silent=True)
        if data is None:
            raise ApiError("the body must be JSON (Content-Type: application/json)")
        return data

    @app.get("/health")
    def health():
        return jsonify({"status": "UP", "model_class": MODEL_CLASS, "model_version": backend.version,
                        "device": str(getattr(predictor, "device", "")), "sessions": len(backend.segmenter.sessions),
                        "projects": backend.models.loaded()})

    @app.post("/setup")
    def setup():
        return jsonify(backend.setup(body()))

    @app.get("/versions")
    def versions():
        return jsonify(backend.versions(request.args.get("project")))

    @app.get("/jobs")
    def jobs():
        from training.jobs import list_jobs
        try:
            limit = int(request.args.get("limit", "20"))
        except ValueError:
            raise ApiError("limit must be an integer") from None
        try:
            found = list_jobs(backend.redis(), config.training_queue, request.args.get("project"), limit)
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(f"the training queue is unreachable: {type(e).__name__}: {e}", 503) from None
        return jsonify({"jobs": found})

    @app.get("/jobs/<job_id>")
    def job(job_id):
        from training.jobs import job_info
        try:
            info = job_info(backend.redis(), job_id)
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(f"the training queue is unreachable: {type(e).__name__}: {e}", 503) from None
        if info is None:
            raise ApiError(f"no job {job_id} (unknown, or expired after TRAINING_RESULT_TTL)", 404)
        return jsonify(info)

    @app.post("/admin/rollback")
    def rollback():
        from training.registry import RegistryError
        data = body()
        if not isinstance(data, dict) or data.get("project") in (None, ""):
            raise ApiError("the body must be {\"project\": N} (and optionally \"to\": a version name)")
        reg = backend.registry(data["project"])
        try:
            v = reg.rollback(data.get("to"), reason=str(data.get("reason") or ""),
                             actor=f"http {request.remote_addr}")
        except RegistryError as e:
            raise ApiError(str(e), 409 if "roll back" in str(e) else 404) from None
        log.warning("project %s rolled back to %s by %s", reg.project, v.name, request.remote_addr)
        return jsonify({"project": reg.project, "promoted": v.name,
                        "reload_within_s": config.model_reload_interval})

    @app.post("/predict")
    def predict():
        return jsonify(backend.predict(body()))

    @app.post("/webhook")
    def webhook():
        try:
            answer, status = backend.webhooks.handle(body())
        except WebhookError as e:
            raise ApiError(str(e)) from None
        if status != 200:
            resp = error_response(answer["error"], status)
            return resp
        return jsonify(answer)

    @app.get("/webhook/events")
    def webhook_events():
        return jsonify({"events": backend.webhooks.recent()})

    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        log.warning("%s %s -> %d: %s", request.method, request.path, e.status, e)
        return error_response(str(e), e.status)

    @app.errorhandler(FetchError)
    def fetch_error(e: FetchError):
        log.warning("%s %s -> %d: %s", request.method, request.path, e.status, e)
        return error_response(str(e), e.status)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        msg = e.description or e.name
        if e.code == 413:
            msg = (f"request body over MAX_CONTENT_LENGTH={config.max_content_length} bytes; "
                   f"raise MAX_CONTENT_LENGTH for very large brush strokes")
        return error_response(msg, e.code or 500)

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return error_response(f"internal error: {type(e).__name__}: {e}", 500)

    return app


def _install_redaction(backend: Backend) -> None:
    """Redact secrets on the root logger's handlers (where every record ends up) and at the source
    for our own and the servers' loggers, whatever handler they reach."""
    REDACTOR.backends.add(backend)
    for target in logging.getLogger().handlers + [logging.getLogger(n) for n in (
            "backend", "werkzeug", "gunicorn.error", "gunicorn.access")]:
        if REDACTOR not in target.filters:
            target.addFilter(REDACTOR)
