"""Which model answers a project: its promoted registry version, hot-reloaded without a restart.

Each project (Label Studio sends "3.1795584533" as the project of /setup and /predict) is served
by the version its registry pointer names (training/registry.py: <registry>/<project>/promoted.json),
or by the base checkpoint (MODEL_CHECKPOINT) while it has none. At most every
MODEL_RELOAD_INTERVAL seconds per project, a request stats the pointer file; when its
(inode, mtime, size) changed, the pointer is read and, if it names another version, that version
is loaded and swapped in atomically (one attribute assignment) with a fresh Segmenter: the click
sessions of the old version are dropped, requests already running finish on the old one. One
thread loads; the others keep answering with the current model meanwhile. At most PROJECT_MODELS
project models stay in memory (least recently used first out; the base model is always there).

Only the pointer's version *name* is used: the file is the registry's own
versions/<name>/model.safetensors, served only when it is a regular file inside the registry whose
sha256 is the one recorded at registration (ProjectRegistry.verified_checkpoint). A version that
cannot be served is logged with the reason, and the project gets the newest loadable version
instead: the versions promoted before it (the pointer's stack, newest first), else the model it
was served, else the base model. GET /versions says so ("fallback"). The pointer is read again
only when it changes.
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
    note: str = ""                     # why the promoted version is not the one served
    loading: threading.Lock = field(default_factory=threading.Lock)


class ModelRouter:
    def __init__(self, base: Served, registry_root: Optional[Path], interval: float, capacity: int,
                 load: Callable[[Path], object], make_segmenter: Callable[[object], object],
                 clock: Callable[[], float] = time.monotonic,
                 retire: Callable[[Served], None] = lambda served: None):
        self.base = base
        self.retire = retire           # called with a registry model that is no longer served
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
                self._retire(self._slots.popitem(last=False)[1].served)
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
        if stamp == slot.stamp:
            return
        if not slot.loading.acquire(blocking=False):
            return                                   # another thread loads it; serve the current model
        try:
            served, note = self._choose(pid, reg, slot.served)
            old = slot.served
            if served is not old:
                slot.served = served
                log.info("project %s: now serving %s (was %s); its click sessions start over",
                         pid, served.version, old.version)
                with self._lock:
                    self._retire(old)
            slot.stamp, slot.note = stamp, note
        finally:
            slot.loading.release()

    def _choose(self, pid: str, reg, current: Served) -> tuple[Served, str]:
        """The model to serve for the pointer now on disk, and why it is not the promoted one."""
        try:
            pointer = reg.pointer()
            if pointer is not None and not isinstance(pointer, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            note = f"unreadable {reg.pointer_path.name} ({type(e).__name__}); still serving {current.version}"
            log.error("project %s: cannot serve the promoted version: %s", pid, note)
            return current, note
        if pointer is None:
            if current is not self.base:
                log.info("project %s: no promoted version any more; serving the base model %s",
                         pid, self.base.version)
            return self.base, ""
        wanted = pointer.get("version")
        stack = pointer.get("stack") if isinstance(pointer.get("stack"), list) else []
        stack = [v for v in stack if isinstance(v, str)]
        problems = []
        for name in [wanted] + [v for v in reversed(stack) if v != wanted]:
            if current.source == "registry" and current.version == name:
                served = current                   # already loaded and verified
            else:
                try:
                    served = self._load_version(reg, name, pointer.get("sha256") if name == wanted else None)
                except Exception as e:
                    log.error("project %s: cannot serve version %r: %s", pid, name, e)
                    problems.append(f"{name}: {e}")
                    continue
            return served, self._note(wanted, served, problems)
        return current, self._note(wanted, current, problems)

    @staticmethod
    def _note(wanted, served: Served, problems: list) -> str:
        if not problems:
            return ""
        return (f"promoted version {wanted!r} cannot be served ({problems[0]}); serving "
                f"{served.version}, the newest loadable version")

    def _load_version(self, reg, name, pointer_sha: Optional[str]) -> Served:
        from training.registry import RegistryError

        if not isinstance(name, str):
            raise RegistryError(f"{reg.pointer_path.name} names no version")
        path, sha = reg.verified_checkpoint(name)
        if pointer_sha is not None and pointer_sha != sha:
            raise RegistryError(f"{reg.pointer_path.name} records another sha256 than the version")
        t0 = time.perf_counter()
        predictor = self.load(path)
        loaded_sha = (getattr(predictor, "info", None) or {}).get("checkpoint_sha256", sha)
        if loaded_sha != sha:
            raise RegistryError("the checkpoint changed while it was being loaded")
        log.info("project %s: loaded %s in %.0f ms", reg.project, name, (time.perf_counter() - t0) * 1000)
        return Served(version=name, predictor=predictor, segmenter=self.make_segmenter(predictor),
                      source="registry")

    def _retire(self, served: Served) -> None:
        """A registry model no slot serves any more: drop its click sessions. Holds self._lock."""
        if served is self.base or any(s.served is served for s in self._slots.values()):
            return
        self.retire(served)

    def note(self, project) -> str:
        pid = self.project_of(project)
        slot = self._slots.get(pid) if pid is not None else None
        return slot.note if slot else ""

    def loaded(self) -> dict:
        with self._lock:
            return {pid: s.served.version for pid, s in self._slots.items()}
