"""Torch-free file helpers of checkpoints and the registry: which file a checkpoint name means
(`resolve`), the atomic write (temp file, fsync, rename), a file's sha256, and reading a checkpoint's card (its JSON in the safetensors header,
without loading a tensor). Here, not in model/checkpoint.py, because that module imports torch
(the network): the registry, the webhook's enqueueing and the job commands read cards and hash
files without it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from safetensors import safe_open

from .settings import SIMCLICK_CHECKPOINT

FORMAT = "simclick-checkpoint/1"
META_KEY = "simclick"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "simclick-lite2.safetensors"
# Relative paths in settings (DATA_DIR, MODEL_REGISTRY, INFERENCE_CACHE) are taken from here.
REPO_ROOT = Path(__file__).resolve().parents[1]


class CheckpointError(ValueError):
    """The file is not a loadable SimClick checkpoint (wrong format, pickle, corrupt, mismatched)."""


def resolve(checkpoint: str | os.PathLike | None) -> Path:
    """'default' / None -> $SIMCLICK_CHECKPOINT or the shipped default; anything else is a path."""
    if checkpoint in (None, "default"):
        checkpoint = SIMCLICK_CHECKPOINT.read() or DEFAULT_CHECKPOINT
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """A crash at any point leaves either the old file or the new one, never a torn file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; weights are read by other users (a container's service user)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def refuse_non_safetensors(path: Path) -> None:
    """Look at the first bytes before handing the file to any parser. The safetensors layout is
    checked first: its header length is a little-endian u64, whose first byte may well be 0x80, the
    same byte a pickle starts with, so the pickle test alone would refuse good files."""
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if 0 < header_len <= 100_000_000 and head[8:9] == b"{":
        return
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(
            f"{path} is a pickle / torch.save file; SimClick loads only .safetensors checkpoints "
            "(pickles can run arbitrary code). Convert it with model.checkpoint.save_checkpoint.")
    raise CheckpointError(f"{path} is not a safetensors file (bad or truncated header)")


def read_info(path: str | os.PathLike) -> dict:
    """The checkpoint's JSON card (format, model config, version, training, metrics)."""
    path = Path(path)
    refuse_non_safetensors(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e
    if META_KEY not in meta:
        raise CheckpointError(f"{path}: safetensors file without a SimClick config (metadata key {META_KEY!r})")
    try:
        info = json.loads(meta[META_KEY])
    except ValueError as e:
        raise CheckpointError(f"{path}: its card is not JSON ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: its card is a JSON {type(info).__name__}, not an object")
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {info.get('format')!r}")
    return info
