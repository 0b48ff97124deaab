"""POST /webhook: validate Label Studio's events, record them, hand training events to a queue.

Label Studio sends every project event to the ML backend's /webhook and waits about a second for
the answer, so nothing slow happens here: training events are passed to an *enqueue* function
(TRAINING_ENQUEUE="package.module:function", called with a WebhookEvent, returning a job id or
None, or a dict {"job": id or None, ...} merged into the answer) that must only put a job on a
queue. With REDIS_URL set, the default is backend.jobs:enqueue_webhook (RQ, see backend/jobs/enqueue.py). Without one, events are validated, recorded and
acknowledged.

Events and what they carry (Label Studio 1.23):
- ANNOTATION_CREATED / ANNOTATION_UPDATED: annotation, task, project;
- START_TRAINING (from POST /api/ml/{id}/train): only the project; the trainer pulls annotations;
- ANNOTATIONS_DELETED (plural), TASKS_CREATED, TASKS_DELETED, PROJECT_UPDATED, ...: acknowledged.
"""
from __future__ import annotations

import importlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

TRAINING_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "START_TRAINING"})
# What each action must carry (key -> required type) to be usable.
REQUIRED = {
    "ANNOTATION_CREATED": {"annotation": dict, "task": dict, "project": dict},
    "ANNOTATION_UPDATED": {"annotation": dict, "task": dict, "project": dict},
    "START_TRAINING": {"project": dict},
}


class WebhookError(ValueError):
    pass


@dataclass
class WebhookEvent:
    action: str
    project_id: Optional[int]
    task_id: Optional[int] = None
    annotation_id: Optional[int] = None
    payload: dict = field(default_factory=dict, repr=False)
    received_at: float = field(default_factory=time.time)

    def summary(self) -> dict:
        return {"action": self.action, "project": self.project_id, "task": self.task_id,
                "annotation": self.annotation_id, "received_at": self.received_at}


MAX_ID = 2 ** 63 - 1          # Label Studio's ids are database integers
MAX_ACTION_CHARS = 64         # its actions are names like ANNOTATIONS_DELETED


def _id(obj, what: str) -> Optional[int]:
    """The id of an object (or an id itself); None when absent; a WebhookError when it is not a
    positive integer a database could hold (a 100-digit project id must not reach the queue)."""
    if isinstance(obj, dict):
        obj = obj.get("id")
    if not isinstance(obj, int):
        return None
    if isinstance(obj, bool) or not 1 <= obj <= MAX_ID:
        raise WebhookError(f"the {what} id must be a positive integer, got {str(obj)[:30]}")
    return obj


def parse_event(body) -> WebhookEvent:
    if not isinstance(body, dict):
        raise WebhookError("the webhook body must be a JSON object with an 'action'")
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise WebhookError("the webhook body has no 'action' string")
    if len(action) > MAX_ACTION_CHARS:      # it is kept in the history (GET /webhook/events)
        raise WebhookError(f"the 'action' is {len(action)} characters: not a Label Studio event "
                           f"(at most {MAX_ACTION_CHARS})")
    for key, typ in REQUIRED.get(action, {}).items():
        if not isinstance(body.get(key), typ):
            raise WebhookError(f"{action} event without a '{key}' object")
    project_id = _id(body.get("project"), "project")
    if action in REQUIRED and project_id is None:
        raise WebhookError(f"{action} event without a project id")
    ann = body.get("annotation")
    if not isinstance(ann, dict):
        ann = {}
    task_id = _id(body.get("task"), "task") or _id(ann.get("task"), "task")
    if action.startswith("ANNOTATION_") and action in REQUIRED:
        if _id(ann, "annotation") is None or not isinstance(ann.get("result"), list):
            raise WebhookError(f"{action} event whose annotation has no id or result list")
    return WebhookEvent(action=action, project_id=project_id, task_id=task_id,
                        annotation_id=_id(ann, "annotation"), payload=body)


def load_enqueue(spec: str) -> Optional[Callable[..., Any]]:
    """'package.module:function' -> the function (ImportError/AttributeError if it is not there)."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"TRAINING_ENQUEUE {spec!r} is not callable")
    return fn


class WebhookHandler:
    def __init__(self, enqueue: Optional[Callable[[WebhookEvent], Any]] = None,
                 history: int = 100, known: Optional[Callable[[Any], bool]] = None):
        self.enqueue = enqueue
        # Whether a project may reach the queue (backend/projects.py); None: every project may.
        self.known = known
        self._recent: deque = deque(maxlen=history)
        self._lock = threading.Lock()

    def handle(self, body) -> tuple[dict, int]:
        event = parse_event(body)   # WebhookError -> 400 in the app
        record: dict[str, Any] = event.summary()
        answer = {"status": "ok", "action": event.action}
        status = 200
        if event.action in TRAINING_ACTIONS:
            if self.enqueue is None:
                answer["training"] = "no training queue configured (TRAINING_ENQUEUE)"
            else:
                try:
                    job: Any
                    if self.known is not None and not self.known(event.project_id):
                        job = {"job": None, "training": f"unknown project {event.project_id}: nothing counted or "
                                                        f"queued (Label Studio connects a project with /setup)"}
                    else:
                        job = self.enqueue(event)
                    if isinstance(job, dict):   # {"job": id or None, "training": what happened}
                        answer.update(job)
                        record["job"] = job.get("job")
                    else:
                        answer["job"] = record["job"] = job
                except Exception as e:  # a queue outage must not take the worker down
                    log.exception("enqueueing %s for project %s failed", event.action, event.project_id)
                    answer = {"status": "error", "action": event.action,
                              "error": f"could not enqueue the training job: {type(e).__name__}: {e}"}
                    record["error"] = answer["error"]
                    status = 503
        else:
            answer["status"] = "ignored"
        with self._lock:
            self._recent.append(record)
        log.info("webhook %s project=%s task=%s annotation=%s -> %s", event.action, event.project_id,
                 event.task_id, event.annotation_id, answer.get("job", answer["status"]))
        return answer, status

    def recent(self) -> list[dict]:
        with self._lock:
            return list(self._recent)
