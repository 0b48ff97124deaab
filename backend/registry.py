"""Model registry: per Label Studio project, immutable model versions and an atomic "promoted" pointer.

Layout (root = $MODEL_REGISTRY, default $DATA_DIR/registry, DATA_DIR default <repo>/data)::

    <root>/<project>/
        versions/<name>/model.safetensors   weights + model card (one file, model.checkpoint format)
        versions/<name>/version.json        parent, training job id, train config, metrics, decision
        promoted.json                       the pointer: {"version", "checkpoint", "stack", ...}
        events.jsonl                        audit log: registered / promoted / rolled back
        reservations.json                   training job id -> version name (a retried job keeps its name)
        .lock                               flock for writers (workers, CLI, the backend's admin route)

A version directory is written under a temporary name and renamed into place in one step, and
never changed afterwards: the checkpoint is copied (never hard-linked, so neither the version nor
its source changes with the other), its sha256 recorded, and both files made read-only. The
backend serves a version only through `verified_checkpoint`: a regular file inside the project's
versions folder whose sha256 is the recorded one.
The pointer is replaced atomically (temp file, fsync, rename), so a reader sees the old or the
new pointer, never a torn one; the backend compares the pointer's (inode, mtime, size) every few
seconds and loads the new version when it changed.

Version names are ``p<project>-v<NNN>`` (fine-tuned) and ``p<project>-base-<sha8>`` (the checkpoint
a project started from), unique across projects so they can be model versions in the evaluation
history. Promotion keeps a stack of promoted versions: rollback pops it (back to the version
promoted before), or promotes a named version.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional

from model.files import REPO_ROOT, atomic_write_bytes, file_sha256, read_info
from model.settings import DATA_DIR, MODEL_REGISTRY

POINTER = "promoted.json"
CHECKPOINT = "model.safetensors"
INFO = "version.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PROJECT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RegistryError(ValueError):
    """A registry operation cannot be done (unknown version, bad name, version already exists...)."""


class VersionNotFound(RegistryError):
    """The project has no such version (or no versions at all; a string that is not a version name
    names none)."""


class RollbackConflict(RegistryError):
    """A rollback without a target has nothing to go back to (no promoted version, or the promoted
    one is the first)."""


def _from_repo(value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def data_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """$DATA_DIR (relative paths are taken from the repository root), default <repo>/data."""
    return _from_repo(DATA_DIR.read(env))


def registry_folder(model_registry: str, data: str) -> Path:
    """The registry folder given MODEL_REGISTRY's and DATA_DIR's values: `model_registry`, else
    `data`/registry (relative paths from the repository root)."""
    return _from_repo(model_registry) if model_registry else _from_repo(data) / "registry"


def default_root(env: Optional[Mapping[str, str]] = None) -> Path:
    """$MODEL_REGISTRY, else $DATA_DIR/registry."""
    return registry_folder(MODEL_REGISTRY.read(env), DATA_DIR.read(env))


def project_key(project: Any) -> str:
    """Label Studio's project reference -> the registry's folder name: 3, "3", "3.1795584533" -> "3"."""
    key = str(project).strip()
    if "." in key and key.split(".", 1)[0].isdigit():
        key = key.split(".", 1)[0]
    if not _PROJECT.match(key):
        raise RegistryError(f"not a project id: {project!r}")
    return key


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


@dataclass(frozen=True)
class Version:
    name: str
    path: Path          # the version's directory
    info: dict          # version.json

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def parent(self) -> Optional[str]:
        return self.info.get("parent")

    @property
    def job_id(self) -> Optional[str]:
        return self.info.get("job_id")

    @property
    def decision(self) -> dict:
        return self.info.get("decision") or {}

    def summary(self, promoted: Optional[str] = None) -> dict:
        d = {k: self.info.get(k) for k in ("name", "kind", "parent", "job_id", "created_at", "sha256")}
        d["decision"] = self.decision
        d["metrics"] = self.info.get("metrics") or {}
        d["promoted"] = self.name == promoted
        return d


class ProjectRegistry:
    """The versions of one project. Readers need no lock; writers take an flock on <dir>/.lock."""

    def __init__(self, root: os.PathLike | str, project: Any):
        self.project = project_key(project)
        self.root = Path(root)
        self.dir = self.root / self.project
        self.versions_dir = self.dir / "versions"
        self.pointer_path = self.dir / POINTER

    def __repr__(self) -> str:
        return f"ProjectRegistry({str(self.dir)!r})"

    # -- locking -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _event(self, **fields) -> None:
        with open(self.dir / "events.jsonl", "a") as f:
            f.write(json.dumps({"at": now_iso(), **fields}, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def events(self) -> List[dict]:
        p = self.dir / "events.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    # -- reading -----------------------------------------------------------------------------------
    def get(self, name: str) -> Version:
        if not isinstance(name, str) or not _NAME.match(name):
            raise VersionNotFound(f"not a version name: {name!r}")
        path = self.versions_dir / name
        try:
            info = json.loads((path / INFO).read_text())
        except FileNotFoundError:
            raise VersionNotFound(f"project {self.project} has no version {name!r}") from None
        return Version(name, path, info)

    def exists(self, name: str) -> bool:
        return (self.versions_dir / name / INFO).is_file()

    def versions(self) -> List[Version]:
        """Every complete version, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        out = []
        for p in self.versions_dir.iterdir():
            if p.name.startswith(".") or not (p / INFO).is_file():
                continue
            out.append(Version(p.name, p, json.loads((p / INFO).read_text())))
        return sorted(out, key=lambda v: (v.info.get("created_at", ""), v.name))

    def pointer(self) -> Optional[dict]:
        try:
            return json.loads(self.pointer_path.read_text())
        except FileNotFoundError:
            return None

    def pointer_stamp(self) -> Optional[tuple]:
        """(inode, mtime_ns, size) of the pointer file, None without one: a cheap change check."""
        try:
            st = os.stat(self.pointer_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def promoted(self) -> Optional[Version]:
        p = self.pointer()
        return self.get(p["version"]) if p else None

    def verified_checkpoint(self, name: str) -> tuple[Path, str]:
        """(path, sha256) of version `name`'s checkpoint if it can be served: a regular file in
        this project's versions folder (no symlink leading out) whose sha256 is the one recorded at
        registration. RegistryError with the reason otherwise."""
        v = self.get(name)
        versions = self.versions_dir.resolve()
        try:
            real = v.checkpoint.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            raise RegistryError(f"{name}: checkpoint unreadable ({type(e).__name__})") from None
        if v.path.resolve() != versions / name or real != versions / name / CHECKPOINT:
            raise RegistryError(f"{name}: its checkpoint is a link out of {self.versions_dir}")
        if not real.is_file():
            raise RegistryError(f"{name}: its checkpoint is not a regular file")
        expected = v.info.get("sha256")
        if not expected:
            raise RegistryError(f"{name}: version.json records no sha256")
        actual = file_sha256(real)
        if actual != expected:
            raise RegistryError(f"{name}: checkpoint sha256 {actual[:12]} differs from the recorded "
                                f"{str(expected)[:12]} (the file was changed after registration)")
        return real, actual

    # -- writing -----------------------------------------------------------------------------------
    def reserve(self, job_id: str) -> str:
        """The version name a training job will register (the same name for every attempt of a job)."""
        with self.locked():
            path = self.dir / "reservations.json"
            res = json.loads(path.read_text()) if path.exists() else {}
            if job_id in res:
                return res[job_id]
            taken = [v for v in res.values()] + [p.name for p in self.versions_dir.iterdir()]
            nums = [int(m.group(1)) for n in taken if (m := re.match(rf"^p{re.escape(self.project)}-v(\d+)$", n))]
            name = f"p{self.project}-v{max(nums, default=0) + 1:03d}"
            res[job_id] = name
            _write_json(path, res)
            return name

    def add(self, name: str, checkpoint: os.PathLike | str, *, kind: str = "finetuned",
            parent: Optional[str] = None, job_id: Optional[str] = None, **info: Any) -> Version:
        """Register a version: copy the checkpoint and write version.json in a temp directory, then
        rename it into place. Refuses a name that exists (versions are immutable)."""
        if not _NAME.match(name):
            raise RegistryError(f"not a version name: {name!r}")
        checkpoint = Path(checkpoint)
        card = read_info(checkpoint)          # refuses anything that is not a SimClick checkpoint
        source_sha = file_sha256(checkpoint)
        with self.locked():
            final = self.versions_dir / name
            if final.exists():
                raise RegistryError(f"version {name} already exists in project {self.project}")
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.versions_dir))
            try:
                dest = tmp / CHECKPOINT
                # A copy, not a hard link: a link shares the file, so the chmod below would make
                # the source read-only and a write to the source would change this version.
                shutil.copyfile(checkpoint, dest)
                with open(dest, "rb") as f:
                    os.fsync(f.fileno())
                sha = file_sha256(dest)
                if sha != source_sha:
                    raise RegistryError(f"{checkpoint} changed while it was being registered; register it again")
                meta = {"name": name, "project": self.project, "kind": kind, "parent": parent,
                        "job_id": job_id, "created_at": now_iso(), "sha256": sha,
                        "model_version": card.get("version"), "model": card.get("model"), **info}
                (tmp / INFO).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
                with open(tmp / INFO, "rb") as f:
                    os.fsync(f.fileno())
                for p in (dest, tmp / INFO):
                    os.chmod(p, 0o444)
                os.rename(tmp, final)
                _fsync_dir(self.versions_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._event(event="registered", version=name, parent=parent, job_id=job_id, kind=kind)
        return self.get(name)

    def ensure_base(self, checkpoint: os.PathLike | str) -> Version:
        """Register the checkpoint a project starts from (once per distinct file content)."""
        sha = file_sha256(checkpoint)
        name = f"p{self.project}-base-{sha[:8]}"
        if self.exists(name):
            return self.get(name)
        try:
            return self.add(name, checkpoint, kind="base", source=str(checkpoint))
        except RegistryError:
            if self.exists(name):          # registered by a concurrent caller
                return self.get(name)
            raise

    def promote(self, name: str, reason: str = "", actor: str = "", served_before: Optional[str] = None) -> Version:
        """Point the project at `name`. `served_before`: the version that was being served when no
        pointer existed yet (the project's base), so that a rollback can return to it."""
        with self.locked():
            stack = None
            if self.pointer() is None and served_before and served_before != name:
                self.get(served_before)
                stack = [served_before, name]
            return self._promote(name, reason, actor, rollback=False, stack=stack)

    def _promote(self, name: str, reason: str, actor: str, rollback: bool,
                 stack: Optional[List[str]] = None) -> Version:
        v = self.get(name)
        old = self.pointer()
        if stack is None:
            stack = list(old.get("stack", [])) if old else []
            if not stack and old:
                stack = [old["version"]]
            stack.append(name)
        pointer = {"version": name, "checkpoint": str(Path("versions") / name / CHECKPOINT),
                   "sha256": v.info.get("sha256"), "promoted_at": now_iso(), "reason": reason,
                   "actor": actor, "previous": old["version"] if old else None, "stack": stack[-50:],
                   "nonce": uuid.uuid4().hex}
        _write_json(self.pointer_path, pointer)
        self._event(event="rolled back" if rollback else "promoted", version=name,
                    previous=pointer["previous"], reason=reason, actor=actor)
        return v

    def rollback(self, to: Optional[str] = None, reason: str = "", actor: str = "") -> Version:
        """Serve the version promoted before the current one (or `to`, any registered version)."""
        if to is not None and not isinstance(to, str):
            raise VersionNotFound(f"not a version name: {to!r}")
        if not self.versions_dir.is_dir():      # checked first: a stranger's project gets no folder
            raise VersionNotFound(f"project {self.project} has no versions")
        with self.locked():
            p = self.pointer()
            if to is not None:
                self.get(to)
                return self._promote(to, reason or f"rollback to {to}", actor, rollback=True)
            if p is None:
                raise RollbackConflict(f"project {self.project} has no promoted version to roll back")
            stack = list(p.get("stack") or [p["version"]])
            while stack and stack[-1] == p["version"]:
                stack.pop()
            if not stack:
                raise RollbackConflict(f"project {self.project}: {p['version']} is the first promoted "
                                       f"version; name the version to roll back to")
            target = stack[-1]
            return self._promote(target, reason or f"rollback from {p['version']}", actor,
                                 rollback=True, stack=stack)

    def describe(self) -> dict:
        p = self.pointer()
        promoted = p["version"] if p else None
        return {"project": self.project, "promoted": promoted, "pointer": p,
                "versions": [v.summary(promoted) for v in self.versions()]}


def projects(root: os.PathLike | str) -> List[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and _PROJECT.match(p.name)),
                  key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
