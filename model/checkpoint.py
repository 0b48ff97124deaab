"""Inference checkpoints: one .safetensors file whose header carries the JSON config.

Why one file: safetensors' header is JSON and holds string metadata, so the weights and their
config (architecture, backbone, input size, version, training data, metrics) travel together and
one atomic rename publishes both; a loader can never pair weights with the wrong config.
`python -m model.checkpoint info FILE` prints the JSON.

Loading never unpickles: only safetensors is accepted, and a pickle or torch.save zip is refused
with a clear error before any byte of it is interpreted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .config import ModelConfig
from .network import InteractiveSegNet
from .settings import SIMCLICK_CHECKPOINT

FORMAT = "simclick-checkpoint/1"
META_KEY = "simclick"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "simclick-lite2.safetensors"
# A routed checkpoint (model.routing) also holds its fallback network, its tensors under this prefix
# and its config in the card's "routing"; the expert's tensors have no prefix.
FALLBACK = "fallback."


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


def save_checkpoint(path: str | os.PathLike, state_dict: dict, config: ModelConfig, info: dict | None = None,
                    half: bool = False) -> Path:
    """Atomically write weights + config: temp file in the same directory, fsync, rename.

    `info` holds the rest of the card: version, training data, metrics... (JSON-serialisable).
    `half` stores floating tensors as fp16 (the loader converts back to fp32).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    seen = set()
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        if v.data_ptr() in seen and v.numel():     # safetensors refuses shared memory (a routed
            v = v.clone()                          # checkpoint's two networks may share tensors)
        seen.add(v.data_ptr())
        if half and v.is_floating_point():
            v = v.half()
        tensors[k] = v
    # `config` wins over a "model" in `info` (e.g. the card of the checkpoint a grown net came from).
    meta = {**(info or {}), "format": FORMAT, "model": config.to_dict()}
    blob = safetensors_bytes(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(path, blob)
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


def _refuse_non_safetensors(path: Path) -> None:
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
    _refuse_non_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
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


def load_checkpoint(path: str | os.PathLike, fallback: bool = False) -> tuple[dict, ModelConfig, dict]:
    """-> (state_dict in fp32, ModelConfig, info) of the checkpoint's network, or with `fallback`
    of a routed checkpoint's fallback network (model.routing)."""
    path = Path(path)
    info = read_info(path)
    if fallback:
        model = ((info.get("routing") or {}).get("fallback") or {}).get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{path}: not a routed checkpoint (its card has no routing.fallback.model)")
    elif "model" not in info:
        raise CheckpointError(f"{path}: its card has no 'model' (the network's config)")
    else:
        model = info["model"]
    try:
        config = ModelConfig.from_dict(model)
    except ValueError as e:
        raise CheckpointError(f"{path}: bad model config in its card: {e}") from None
    state = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                if k.startswith(FALLBACK) != fallback:
                    continue
                t = f.get_tensor(k)
                state[k[len(FALLBACK):] if fallback else k] = t.float() if t.is_floating_point() else t
    except Exception as e:        # safetensors' own error types: a truncated or corrupt file
        raise CheckpointError(f"{path}: unreadable tensors: {e}") from None
    return state, config, info


def build_model(path: str | os.PathLike, fallback: bool = False):
    """Load a checkpoint (or a routed one's fallback) into a fresh InteractiveSegNet (strict: every
    tensor must match)."""
    state, config, info = load_checkpoint(path, fallback)
    try:
        net = InteractiveSegNet(config, pretrained=False)
    except (RuntimeError, ValueError) as e:      # a config the network cannot be built from
        raise CheckpointError(f"{path}: cannot build its network: {e}") from None
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:     # a tensor of another shape than the config's
        raise CheckpointError(f"{path}: weights do not match the config: {str(e).strip().splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return net, info


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.checkpoint", description="Inspect a SimClick checkpoint.")
    ap.add_argument("command", choices=["info"])
    ap.add_argument("path", nargs="?", default="default")
    args = ap.parse_args(argv)
    path = resolve(args.path)
    info = read_info(path)
    info["sha256"] = file_sha256(path)
    info["path"] = str(path)
    json.dump(info, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
