"""Which model answers a project: its promoted registry version, hot-reloaded without a restart.

Each project (Label Studio sends "3.1795584533" as the project of /setup and /predict) is served
by the version its registry pointer names (training/registry.py: <registry>/<project>/promoted.json),
or by the base checkpoint (MODEL_CHECKPOINT) while it has none. At most every
MODEL_RELOAD_INTERVAL seconds per project, a request stats the pointer file; when its
(inode, mtime, size) changed, the pointer is read and, if it names another version, that version
is loaded and swapped in atomically (one attribute assignment) with a fresh Segmenter: the click
sessions of the old version are dropped, requests already running finish on the old one. One
thread loads; the others keep answering with the current model meanwhile. A version that fails to
load is logged and skipped until the pointer changes again. At most PROJECT_MODELS project models
stay in memory (least recently used first out; the base model is always there).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)


@dataclass
class Served:
    version: str
    predictor: object
    segmenter: object
    source: str = "checkpoint"        # "checkpoint" (MODEL_CHECKPOINT) or "registry"
    loaded_at: float = field(default_factory=time.time)


@dataclass
class _Slot:
    served: Served
    stamp: Optional[tuple] = None      # pointer (inode, mtime_ns, size) the slot reflects
    checked: float = 0.0               # monotonic time of the last pointer check
    failed_stamp: Optional[tuple] = None
    loading: threading.Lock = field(default_factory=threading.Lock)


class ModelRouter:
    def __init__(self, base: Served, registry_root: Optional[Path], interval: float, capacity: int,
                 load: Callable[[Path], object], make_segmenter: Callable[[object], object],
                 clock: Callable[[], float] = time.monotonic):
        self.base = base
        self.root = Path(registry_root) if registry_root else None
        self.interval = interval
        self.capacity = max(1, capacity)
        self.load = load
        self.make_segmenter = make_segmenter
        self.clock = clock
        self._slots: "OrderedDict[str, _Slot]" = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------
    def project_of(self, project) -> Optional[str]:
        from training.registry import RegistryError, project_key

        if project in (None, ""):
            return None
        try:
            return project_key(project)
        except RegistryError:
            return None

    def for_project(self, project) -> Served:
        pid = self.project_of(project)
        if self.root is None or pid is None:
            return self.base
        with self._lock:
            slot = self._slots.get(pid)
            if slot is None:
                slot = self._slots[pid] = _Slot(self.base, stamp=None, checked=-1e18)
            self._slots.move_to_end(pid)
            while len(self._slots) > self.capacity:
                self._slots.popitem(last=False)
            due = self.clock() - slot.checked >= self.interval
            if due:
                slot.checked = self.clock()
        if due:
            self._refresh(pid, slot)
        return slot.served

    def _refresh(self, pid: str, slot: _Slot) -> None:
        from training.registry import ProjectRegistry

        reg = ProjectRegistry(self.root, pid)
        stamp = reg.pointer_stamp()
        if stamp == slot.stamp or stamp == slot.failed_stamp:
            return
        if not slot.loading.acquire(blocking=False):
            return                                   # another thread loads it; serve the current model
        try:
            try:
                pointer = reg.pointer()
            except (OSError, ValueError) as e:
                log.error("project %s: unreadable registry pointer %s: %s", pid, reg.pointer_path, e)
                slot.failed_stamp = stamp
                return
            if pointer is None:
                if slot.served is not self.base:
                    log.info("project %s: no promoted version any more; serving the base model %s",
                             pid, self.base.version)
                slot.served, slot.stamp = self.base, stamp
                return
            name = pointer["version"]
            if slot.served.source == "registry" and slot.served.version == name:
                slot.stamp = stamp
                return
            path = reg.dir / pointer["checkpoint"]
            t0 = time.perf_counter()
            try:
                predictor = self.load(path)
            except Exception as e:
                log.error("project %s: cannot load promoted version %s (%s): %s; still serving %s",
                          pid, name, path, e, slot.served.version)
                slot.failed_stamp = stamp
                return
            old = slot.served.version
            slot.served = Served(version=name, predictor=predictor, segmenter=self.make_segmenter(predictor),
                                 source="registry")
            slot.stamp, slot.failed_stamp = stamp, None
            log.info("project %s: now serving %s (was %s), loaded in %.0f ms; its click sessions start over",
                     pid, name, old, (time.perf_counter() - t0) * 1000)
        finally:
            slot.loading.release()

    def loaded(self) -> dict:
        with self._lock:
            return {pid: s.served.version for pid, s in self._slots.items()}
