"""Resumable training state in one safetensors file (no pickle): weights, PEM buffer, optimizer
tensors, and a JSON header with the step, config and optimizer hyper-parameters.

Written atomically (model.checkpoint.atomic_write_bytes): a kill mid-write leaves the previous
state intact, so a resume loses at most one checkpoint interval.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from model.checkpoint import atomic_write_bytes

if TYPE_CHECKING:
    from model.network import InteractiveSegNet

FORMAT = "simclick-train-state/1"


def save_state(path: Path, net: InteractiveSegNet, pem: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
               meta: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if pem is not None:
        tensors.update({f"pem.{k}": v.detach().cpu().contiguous() for k, v in pem.state_dict().items()})
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"opt.{idx}.{name}"] = t.detach().cpu().contiguous()
    # The architecture as built: a run started from init_checkpoint has no "model" in its config.
    header = {"format": FORMAT, "param_groups": opt["param_groups"], "model_config": net.config.to_dict(), **meta}
    atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata={"state": json.dumps(header)}))


def load_state(path: Path, net: torch.nn.Module, pem: torch.nn.Module | None,
               optimizer: torch.optim.Optimizer) -> dict:
    """Restore in place; returns the JSON header (step, config, ...)."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get("state", "{}"))
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a SimClick training state")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    if pem is not None:
        pem.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("pem.")}, strict=True)
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    # The moments and step counts come from the file; the hyper-parameters (lr multipliers, weight
    # decay) from the optimizer built from the current config, so a config edit applies on resume.
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    for group, hyper in zip(optimizer.param_groups, current):
        group.update(hyper)
    return header
