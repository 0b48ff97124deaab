"""The HTTP routes (backend/app.py lists them): one Blueprint over the service object, the app's
`Backend` (app.extensions["simclick"]), which holds the settings, models, caches and the training
queue. The routes read the request and write the answer; the work is the service's."""
from __future__ import annotations

import base64
import binascii
import hmac
import logging
from typing import TYPE_CHECKING, cast

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from .config import Config
from .errors import ApiError, error_response
from .labelstudio.fetch import FetchError
from .webhook import WebhookError

if TYPE_CHECKING:
    from .app import Backend

log = logging.getLogger("backend")

# Label Studio's bodies are a few levels deep; a body nested deeper is refused before anything
# walks it (Python's recursion limit is about 1000).
MAX_JSON_DEPTH = 100

bp = Blueprint("simclick", __name__)


def service() -> Backend:
    return cast("Backend", current_app.extensions["simclick"])


def body():
    """The request's JSON body; ApiError when there is none or it nests too deep."""
    try:
        data = request.get_json(silent=True)
        too_deep = _deeper_than(data, MAX_JSON_DEPTH)
    except RecursionError:                   # deeper than the JSON parser itself goes
        too_deep = True
    if too_deep:
        raise ApiError(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
    if data is None:
        raise ApiError("the body must be JSON (Content-Type: application/json)")
    return data


@bp.before_app_request
def authorize():
    config = service().cfg
    if request.path.startswith("/admin/"):
        return _admin_denied(config)
    if not config.basic_auth_user or (request.path == "/health" and request.method == "GET"):
        return None
    return _basic_denied(config)


@bp.get("/health")
def health():
    return jsonify(service().health())


@bp.post("/setup")
def setup():
    return jsonify(service().setup(body()))


@bp.get("/versions")
def versions():
    return jsonify(service().versions(request.args.get("project")))


@bp.get("/jobs")
def jobs():
    return jsonify(service().jobs(request.args.get("project"), request.args.get("limit", "20")))


@bp.get("/jobs/<job_id>")
def job(job_id):
    return jsonify(service().job(job_id))


@bp.post("/admin/jobs/<job_id>/cancel")
def cancel_job(job_id):
    return jsonify(service().cancel_job(job_id, request.remote_addr))


@bp.post("/admin/rollback")
def rollback():
    return jsonify(service().rollback(body(), request.remote_addr))


@bp.post("/predict")
def predict():
    return jsonify(service().predict(body()))


@bp.post("/webhook")
def webhook():
    try:
        answer, status = service().webhooks.handle(body())
    except WebhookError as e:
        raise ApiError(str(e)) from None
    if status != 200:
        return error_response(answer["error"], status)
    return jsonify(answer)


@bp.get("/webhook/events")
def webhook_events():
    return jsonify({"events": service().webhooks.recent()})


# -- errors: for every route of the app, not only this blueprint's (a 404 for an unknown path too) --
# The message is logged, not the exception: a record that holds the exception holds its traceback,
# whose frames hold the request body, for as long as any handler keeps the record.
@bp.app_errorhandler(ApiError)
def api_error(e: ApiError):
    log.warning("%s %s -> %d: %s", request.method, request.path, e.status, str(e))
    return error_response(str(e), e.status)


@bp.app_errorhandler(FetchError)
def fetch_error(e: FetchError):
    log.warning("%s %s -> %d: %s", request.method, request.path, e.status, str(e))
    return error_response(str(e), e.status)


@bp.app_errorhandler(HTTPException)
def http_error(e: HTTPException):
    msg = e.description or e.name
    if e.code == 413:
        msg = (f"request body over MAX_CONTENT_LENGTH={service().cfg.max_content_length} bytes; "
               f"raise MAX_CONTENT_LENGTH for very large brush strokes")
    return error_response(msg, e.code or 500)


@bp.app_errorhandler(Exception)
def internal_error(e: Exception):
    log.exception("%s %s failed", request.method, request.path)
    return error_response(f"internal error: {type(e).__name__}: {e}", 500)


# -- helpers ---------------------------------------------------------------------------------------
def _deeper_than(data, limit: int) -> bool:
    """Whether JSON data nests deeper than `limit` (walked without recursion)."""
    level = [data]
    for _ in range(limit):
        level = [v for x in level if isinstance(x, (dict, list))
                 for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return False
    return any(isinstance(x, (dict, list)) for x in level)


def _unauthorized(message: str, scheme: str):
    resp = error_response(message, 401)
    resp.headers["WWW-Authenticate"] = f'{scheme} realm="simclick"'
    return resp


def _secret_matches(given: bytes, secret: str) -> bool:
    """Constant-time comparison of bytes: the secret as UTF-8, or as latin-1 (what Python requests,
    Label Studio's client, sends basic auth in)."""
    ok = hmac.compare_digest(given, secret.encode("utf-8"))
    try:
        ok |= hmac.compare_digest(given, secret.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return ok


def _basic_denied(config: Config):
    """None if the request carries BASIC_AUTH_USER/BASIC_AUTH_PASS, else the 401 answer."""
    kind, _, value = request.headers.get("Authorization", "").partition(" ")
    ok = False
    if kind.lower() == "basic":
        try:
            user, _, pw = base64.b64decode(value.strip().encode("ascii"), validate=True).partition(b":")
            ok = _secret_matches(user, config.basic_auth_user) & _secret_matches(pw, config.basic_auth_pass)
        except (ValueError, binascii.Error):      # not ASCII, not base64
            ok = False
    if ok:
        return None
    return _unauthorized("authentication required: set the ML backend's basic auth user and password "
                         "in Label Studio to BASIC_AUTH_USER/BASIC_AUTH_PASS", "Basic")


def _admin_denied(config: Config):
    """None if the request may change the served model, else the 401/403 answer."""
    if config.admin_token:
        kind, _, token = request.headers.get("Authorization", "").partition(" ")
        # The WSGI server decoded the header as latin-1: encoding it back gives the bytes sent.
        if kind.lower() == "bearer" and _secret_matches(token.strip().encode("latin-1", "replace"), config.admin_token):
            return None
        return _unauthorized("admin routes need the admin token: send Authorization: Bearer <ADMIN_TOKEN>",
                             "Bearer")
    if config.basic_auth_user:
        return _basic_denied(config)
    return error_response("admin routes are off: set ADMIN_TOKEN and send it as Authorization: Bearer "
                          "<ADMIN_TOKEN> (or protect the backend with BASIC_AUTH_USER/BASIC_AUTH_PASS)", 403)
