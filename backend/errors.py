"""HTTP errors of the app: ApiError, the JSON error answer, and the one table that maps the
exception types of the job service and the model registry to HTTP statuses."""
from __future__ import annotations

from flask import jsonify

from .registry import RegistryError, RollbackConflict, VersionNotFound

from .jobs import JobConflict, JobNotFound


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# Most specific type first: the first one the exception is an instance of gives its status.
ERROR_STATUS: list[tuple[type[Exception], int]] = [
    (JobNotFound, 404),
    (JobConflict, 409),
    (VersionNotFound, 404),
    (RollbackConflict, 409),
    (RegistryError, 400),
]


def status_for(error: Exception, default: int) -> int:
    """The HTTP status for `error` by its type (ERROR_STATUS); `default` for a type not listed."""
    for kind, status in ERROR_STATUS:
        if isinstance(error, kind):
            return status
    return default


def api_error(error: Exception, default: int) -> ApiError:
    """`error` as an ApiError with its message and the status of its type."""
    return ApiError(str(error), status_for(error, default))


def _reason(message: str) -> str:
    """A one-line ASCII form of the message for the HTTP reason phrase: Label Studio shows only
    `str(requests.HTTPError)`, which holds the status line, never the body."""
    text = " ".join(str(message).split()).encode("ascii", "replace").decode("ascii")
    return text[:300]


def error_response(message: str, status: int):
    resp = jsonify({"error": message, "status": status})
    resp.status = f"{status} {_reason(message)}"
    return resp
