"""Which Label Studio projects the backend knows: a training webhook for any other creates nothing.

/webhook is unauthenticated (Label Studio's webhook carries no credential of its own), so the ids
in its bodies are anyone's. Label Studio connects a project to the backend with POST /setup, when
the model is added and again whenever the project's model settings are opened; a project is known
- once this process has accepted its /setup;
- once any replica sharing REDIS_URL has: simclick:known:<project>, expiring KNOWN_TTL after the
  last /setup or training webhook of that project (a project in use stays known);
- when it has a folder in the model registry (it was fine-tuned here before).
Only the training webhooks of known projects reach the queue (backend/webhook.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .registry import RegistryError, project_key
from training.redisconn import connect

from .bytecache import ByteCache

log = logging.getLogger(__name__)

KEY = "simclick:known:"
KNOWN_TTL = 30 * 86400
LOCAL_BYTES = 2**20           # project ids, ~100 bytes each: some 10,000 projects per process


class KnownProjects:
    def __init__(self, redis_url: str, redis_timeout: float, registry_root: Optional[Path]):
        self.redis_url, self.redis_timeout, self.registry_root = redis_url, redis_timeout, registry_root
        self._local = ByteCache(LOCAL_BYTES)

    def add(self, project) -> None:
        """A /setup of `project` ("3.1795584533" or 3) was accepted. Redis failing is logged, not
        raised: this process knows the project anyway."""
        try:
            pid = project_key(project)
        except RegistryError:
            return                              # not a project id: nothing to know
        self._local.put(pid, True, len(pid) + 100)
        if self.redis_url:
            try:
                connect(self.redis_url, timeout=self.redis_timeout).set(KEY + pid, 1, ex=KNOWN_TTL)
            except Exception as e:              # redis-py's errors, socket errors
                log.warning("could not record project %s as set up in Redis: %s", pid, e)

    def knows(self, project) -> bool:
        """Whether `project` is known (see above), its Redis record renewed; raises when Redis
        fails (the webhook answers 503, as for the enqueue itself)."""
        try:
            pid = project_key(project)
        except RegistryError:
            return False
        here = self._local.get(pid) is not None or (
            self.registry_root is not None and (self.registry_root / pid).is_dir())
        if not self.redis_url:
            return here
        conn = connect(self.redis_url, timeout=self.redis_timeout)
        if conn.expire(KEY + pid, KNOWN_TTL):           # known to some replica: its TTL starts again
            return True
        if here:                                        # known here only (Redis flushed, or down at /setup)
            conn.set(KEY + pid, 1, ex=KNOWN_TTL)
        return here
