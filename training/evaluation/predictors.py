"""Turn `--checkpoint PATH|default|oracle|grabcut` into a picklable predictor factory, and hash it."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from model.predictor import Predictor, PredictorOptions

from .reference import GrabCutPredictor, OraclePredictor

REFERENCE = ("oracle", "grabcut")


@dataclass(frozen=True)
class PredictorSpec:
    """Zero-argument factory: each worker process calls it to build its own predictor."""

    checkpoint: str = "default"
    device: Optional[str] = None
    options: tuple = ()  # PredictorOptions overrides as (name, value) pairs, for ablations


    def __call__(self) -> Any:
        if self.checkpoint == "oracle":
            return OraclePredictor()
        if self.checkpoint == "grabcut":
            return GrabCutPredictor()
        predictor = Predictor.load(self.checkpoint, device=self.device, **dict(self.options))
        if self.options:  # an ablation is another "version" in the history and the plots
            predictor.version += "[" + ",".join(f"{k}={v}" for k, v in self.options) + "]"
        return predictor

    @property
    def is_reference(self) -> bool:
        return self.checkpoint in REFERENCE


def parse_options(text: Optional[str]) -> tuple:
    """'refine=false,focus_passes=1' -> (('refine', False), ('focus_passes', 1)), checked against
    model.predictor.PredictorOptions so a typo is an error, not a silently ignored option."""
    if not text:
        return ()

    types = {f.name: type(getattr(PredictorOptions(), f.name)) for f in fields(PredictorOptions)}
    out = []
    for part in text.split(","):
        name, _, raw = part.partition("=")
        name = name.strip()
        if name not in types or not raw:
            raise ValueError(f"predictor option {part!r}: expected name=value with name one of {', '.join(types)}")
        kind = types[name]
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "on", "off"):
                raise ValueError(f"predictor option {name}: {raw!r} is not true/false")
            value = raw.lower() in ("true", "1", "on")
        else:
            value = kind(raw)
        out.append((name, value))
    return tuple(out)


def sha256_path(path: Path) -> str:
    """sha256 of a checkpoint file (of every file's relative name and bytes for a directory)."""
    h = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_hash(spec: PredictorSpec, loaded_path: Optional[str], version: str,
                    reported_sha256: Optional[str] = None) -> str:
    """Reference predictors get a fixed name; a network gets the sha256 of its checkpoint file."""
    if spec.is_reference:
        return f"reference:{version}"
    if reported_sha256:
        return reported_sha256
    for candidate in (spec.checkpoint, loaded_path):
        if candidate and candidate != "default" and Path(candidate).exists():
            return sha256_path(Path(candidate))
    return f"unhashed:{spec.checkpoint}:{version}"
