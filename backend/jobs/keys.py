"""The job service's Redis key names (all under simclick:) and its atomic Lua scripts."""
from __future__ import annotations

from typing import Any, Optional

PREFIX = "simclick:"
LIVE = ("queued", "deferred", "scheduled", "started")     # RQ statuses of a job that has not ended


def key(*parts: Any) -> str:
    return PREFIX + ":".join(str(p) for p in parts)


def text(v) -> Optional[str]:
    """A Redis answer (bytes or str) as str."""
    return v.decode() if isinstance(v, bytes) else v


# Atomic helpers (Lua): compare-and-delete, compare-and-expire, acquire-or-take-over, counter.
CAD = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
EXTEND = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
          "end return 0")
ACQUIRE = ("local cur = redis.call('GET', KEYS[1]) "
           "if (not cur) or cur == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return '' end "
           "return cur")
COUNT = ("local n = redis.call('INCR', KEYS[1]) redis.call('EXPIRE', KEYS[1], ARGV[2]) "
         "local every = tonumber(ARGV[1]) "
         "if every > 0 and n >= every then redis.call('SET', KEYS[1], 0, 'EX', ARGV[2]) return {n, 1} end "
         "return {n, 0}")

