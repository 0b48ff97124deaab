"""Which model answers a project: its promoted registry version, hot-reloaded without a restart.

Each project (Label Studio sends "3.1795584533" as the project of /setup and /predict) is served
by the version its registry pointer names (backend/registry.py: <registry>/<project>/promoted.json),
or by the base checkpoint (MODEL_CHECKPOINT) while it has none. A watcher thread stats every
project's pointer file every MODEL_RELOAD_INTERVAL seconds; when its (inode, mtime, size)
changed, the pointer is read and, if it names another version, that version is loaded in the
background and swapped in atomically (one attribute assignment) with a fresh Segmenter: the click
sessions of the old version are dropped, requests already running finish on the old one, and
requests meanwhile keep answering with the current model. So a promotion is loaded when it
happens, not at the project's next request, and GET /health lists each project's served and
promoted version. At start the watcher loads the most recently promoted projects. A request also
checks its project's pointer (at most every MODEL_RELOAD_INTERVAL seconds), so a project never
seen by the watcher is loaded on its first request. At most PROJECT_MODELS project models stay in
memory (least recently used first out; the base model is always there).

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
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, cast

from model.interface import ClickPredictor
from .registry import ProjectRegistry, RegistryError, project_key, projects

if TYPE_CHECKING:
    from .engine import Segmenter

log = logging.getLogger(__name__)

# The watcher never polls faster than this, even with MODEL_RELOAD_INTERVAL=0 (check at every request).
MIN_WATCH_INTERVAL = 0.5


def _read_pointer(reg):
    try:
        return reg.pointer()
    except (OSError, ValueError):
        return None


# An absolute path in a message: "/" after the start, a space, a quote or a bracket.
_ABSOLUTE_PATH = re.compile(r"(?<![^\s'\"(\[])/[^\s'\":;,)\]]+")


def _without_paths(text: str, reg) -> str:
    """A reason for GET /versions and /health, which any client reads: the registry's files named
    relative to the project's versions folder (p5-v002/model.safetensors), any other absolute path
    by its file name only. The log keeps the full reason."""
    for folder in dict.fromkeys([str(reg.versions_dir.resolve()), str(reg.versions_dir)]):
        text = text.replace(folder + "/", "").replace(folder, "versions/")
    return _ABSOLUTE_PATH.sub(lambda m: Path(m.group(0)).name, text)


@dataclass
class Served:
    version: str
    predictor: ClickPredictor
    segmenter: Segmenter
    source: str = "checkpoint"        # "checkpoint" (MODEL_CHECKPOINT) or "registry"


@dataclass
class _Slot:
    served: Served
    stamp: Optional[tuple] = None      # pointer (inode, mtime_ns, size) the slot reflects
    checked: float = 0.0               # monotonic time of the last pointer check
    note: str = ""                     # why the promoted version is not the one served
    ready: bool = False                # the pointer has been looked at once (served is what it says)
    loading: threading.Lock = field(default_factory=threading.Lock)


class ModelRouter:
    def __init__(self, base: Served, registry_root: Optional[Path], interval: float, capacity: int,
                 load: Callable[[Path], ClickPredictor], make_segmenter: Callable[[ClickPredictor], Segmenter],
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
        self._seen: dict = {}          # project -> pointer stamp at the watcher's last look
        self._promoted: dict = {}      # project -> the version its pointer names (watcher's last look)
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------------
    def project_of(self, project) -> Optional[str]:
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
        slot, due = self._slot(pid)
        if due or not slot.ready:      # not ready: the watcher is loading it now, wait for it
            self._refresh(pid, slot)
        return slot.served

    def _slot(self, pid: str) -> tuple[_Slot, bool]:
        """The project's slot (created, most recently used) and whether its pointer is due a check."""
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
        return slot, due

    # -- the watcher -------------------------------------------------------------------------------
    def watch(self) -> Optional[threading.Thread]:
        """Start the watcher thread (none without a registry). It holds the router weakly and ends
        when the router is gone."""
        if self.root is None:
            return None
        ref = weakref.ref(self)
        stop = self._stop

        def loop():
            while not stop.is_set():
                router = ref()
                if router is None:
                    return
                try:
                    router.scan()
                except Exception:            # a bad registry entry must not end the watching
                    log.exception("model registry scan failed")
                interval = max(router.interval, MIN_WATCH_INTERVAL)
                del router
                stop.wait(interval)

        t = threading.Thread(target=loop, name="model-watcher", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    def scan(self) -> None:
        """One look at every project's pointer: load what was promoted or rolled back since the last
        look (the first look: the most recently promoted projects, at most PROJECT_MODELS)."""
        root = cast(Path, self.root)     # the watcher runs only with a registry
        changed = []
        for pid in projects(root):
            reg = ProjectRegistry(root, pid)
            stamp = reg.pointer_stamp()
            if stamp == self._seen.get(pid):
                continue
            self._seen[pid] = stamp
            pointer = _read_pointer(reg) if stamp is not None else None
            self._promoted[pid] = pointer.get("version") if isinstance(pointer, dict) else None
            if stamp is not None:
                changed.append((stamp[1], pid))
        for _, pid in sorted(changed, reverse=True)[:self.capacity]:
            slot, _ = self._slot(pid)        # the change itself is the reason to look now
            self._refresh(pid, slot)

    def _refresh(self, pid: str, slot: _Slot) -> None:
        reg = ProjectRegistry(cast(Path, self.root), pid)
        stamp = reg.pointer_stamp()
        if stamp == slot.stamp and slot.ready:
            return
        # Another thread loads it: serve the current model meanwhile, unless there is none yet
        # (a project's first look, e.g. the watcher loading it at start): then wait for it.
        if not slot.loading.acquire(blocking=not slot.ready):
            return
        try:
            stamp = reg.pointer_stamp()
            if stamp == slot.stamp and slot.ready:
                return                               # loaded by the thread we waited for
            served, note = self._choose(pid, reg, slot.served)
            old = slot.served
            if served is not old:
                slot.served = served
                log.info("project %s: now serving %s (was %s); its click sessions start over",
                         pid, served.version, old.version)
                with self._lock:
                    self._retire(old)
            slot.stamp, slot.note, slot.ready = stamp, note, True
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
        stack = pointer.get("stack")
        if not isinstance(stack, list):
            stack = []
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
                    problems.append(f"{name}: {_without_paths(str(e), reg)}")
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

    def overview(self) -> dict:
        """Per project (registry projects and projects served this run): the version served (None
        when not loaded in memory now), the version promoted, and why they differ if they do."""
        with self._lock:
            slots = dict(self._slots)
        out = {}
        for pid in sorted(set(slots) | {p for p, v in self._promoted.items() if v},
                          key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)):
            slot = slots.get(pid)
            d = {"served": slot.served.version if slot else None, "promoted": self._promoted.get(pid)}
            if slot and slot.note:
                d["note"] = slot.note
            out[pid] = d
        return out
