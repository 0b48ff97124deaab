"""Redis clients, one per (URL, timeout), shared by every RQ user: the sharded evaluation
(training.evaluation.sharded), the fine-tuning job service (backend.jobs) and the backend's
/webhook and /jobs routes (backend.app)."""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_CONNECTIONS: Dict[tuple, Any] = {}
_CONN_LOCK = threading.Lock()


def connect(url: str, timeout: Optional[float] = None):
    """A Redis client for `url` (cached). `timeout`: the backend's REDIS_TIMEOUT, per command and
    without retries (Label Studio waits ~1 s for /webhook); None: the worker's and the CLI's 5 s,
    with redis-py's retries."""
    if not url:
        raise RuntimeError("REDIS_URL is not set: no training queue")
    options: Dict[str, Any]
    if timeout is None:
        options = {"socket_connect_timeout": 1.0, "socket_timeout": 5.0}
    else:
        options = {"socket_connect_timeout": timeout, "socket_timeout": timeout, "retry": Retry(NoBackoff(), 0)}
    with _CONN_LOCK:
        if (url, timeout) not in _CONNECTIONS:
            _CONNECTIONS[url, timeout] = redis.Redis.from_url(url, health_check_interval=30, **options)
        return _CONNECTIONS[url, timeout]
