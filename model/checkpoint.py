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
import json
import os
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .config import ModelConfig
# The torch-free part (the registry and the job service read cards and hash files without torch);
# these names are also this module's interface.
from .files import (DEFAULT_CHECKPOINT, FORMAT, META_KEY, CheckpointError, atomic_write_bytes,  # noqa: F401
                    file_sha256, read_info, refuse_non_safetensors, resolve)
from .network import InteractiveSegNet

# A routed checkpoint (model.routing) also holds its fallback network, its tensors under this prefix
# and its config in the card's "routing"; the expert's tensors have no prefix.
FALLBACK = "fallback."


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
