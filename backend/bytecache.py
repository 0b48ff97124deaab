"""ByteCache: an LRU map bounded by the bytes it holds, and by an idle time-to-live.

Every cache of the backend is one (README, Security: "Limits"): decoded images, click sessions,
parsed label configs, /setup records, Label Studio credentials. A count alone does not bound
memory (64 label configs of 32 MB each is 2 GB), so each entry is put with its size in bytes,
keys included; keys that come from a request are hashes, never the request's own strings.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict


class ByteCache:
    """An LRU map bounded by the bytes its entries hold (the caller says how many) and by an idle
    time-to-live; thread-safe."""

    def __init__(self, max_bytes: int, ttl: float = math.inf, clock=time.monotonic):
        self.max_bytes, self.ttl, self.clock = max_bytes, ttl, clock
        self._d: OrderedDict = OrderedDict()       # key -> (last use, bytes, value)
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            item = self._d.get(key)
            if item is None:
                return None
            stamp, size, value = item
            if self.clock() - stamp > self.ttl:
                self._drop(key)
                return None
            self._d[key] = (self.clock(), size, value)
            self._d.move_to_end(key)
            return value

    def put(self, key, value, nbytes: int) -> bool:
        """Keep `value` (or update its size); False when it alone is over the budget (not kept)."""
        with self._lock:
            self._drop(key)
            if nbytes > self.max_bytes:
                return False
            now = self.clock()
            self._d[key] = (now, nbytes, value)
            self._bytes += nbytes
            for k in [k for k, (s, _, _) in self._d.items() if now - s > self.ttl]:
                self._drop(k)
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._d)))
            return True

    def pop(self, key) -> None:
        with self._lock:
            self._drop(key)

    def discard(self, match) -> None:
        """Drop every entry whose key satisfies match(key)."""
        with self._lock:
            for k in [k for k in self._d if match(k)]:
                self._drop(k)

    def _drop(self, key) -> None:
        item = self._d.pop(key, None)
        if item is not None:
            self._bytes -= item[1]

    def values(self) -> list:
        with self._lock:
            return [v for _, _, v in self._d.values()]

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._d), "bytes": self._bytes, "max_bytes": self.max_bytes}

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)
