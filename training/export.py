"""Export an inference checkpoint from a training state (e.g. to ship a model mid-run).

    python -m training.export runs/cpu-lite2/state.safetensors model/weights/simclick-lite2.safetensors \
        [--half] [--version NAME] [--metrics metrics.json] [--predictor edge_radius=2,...] [--convert auto]
    python -m training.export model/weights/simclick-lite2.safetensors --convert auto

The inference file keeps only the network's weights (no optimizer, no PEM buffer) and a card built
from the state's header: config, steps, training hours, data. `--predictor` stores the inference
settings chosen for these weights (on the validation split); Predictor.load uses them as defaults.
Given an inference checkpoint instead of a state, it writes the same weights and card with the
version, metrics or settings given replaced.

--convert RUNTIME (openvino, onnxruntime, auto): also convert the written file (or, without OUT, the
given inference checkpoint) for that CPU inference runtime, into the cache Predictor.load reads
(INFERENCE_CACHE, model/runtime.py), so that the first load that serves it does not convert.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from safetensors import safe_open

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.predictor import Predictor
from training.evaluation.predictors import parse_options


def export(state_path: Path, out: Path, half: bool = False, version: str | None = None,
           metrics: dict | None = None, predictor: dict | None = None) -> Path:
    with safe_open(str(state_path), framework="pt") as f:
        meta = f.metadata() or {}
        header = json.loads(meta.get("state", "{}"))
        weights = {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
    if "config" not in header:
        if "state" not in meta:   # an inference checkpoint: same weights and card, new settings
            return _retag(state_path, out, half, version, metrics, predictor)
        raise ValueError(f"{state_path}: not a SimClick training state")
    cfg = header["config"]
    model_cfg = ModelConfig.from_dict(_architecture(header))
    step = header["step"]
    info = {
        "version": version or f"{Path(cfg['out_dir']).name}-s{step}",
        "training": {"config": cfg, "steps": step, "hours": round(header.get("elapsed", 0) / 3600, 3),
                     "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "metrics": metrics or {},
    }
    if predictor:
        info["predictor"] = dict(predictor)
    return save_checkpoint(out, weights, model_cfg, info, half=half)


def _retag(path: Path, out: Path, half: bool, version: str | None, metrics: dict | None,
           predictor: dict | None) -> Path:
    """An inference checkpoint again, with its card's version, metrics or inference settings
    replaced (e.g. settings chosen on the validation split after training)."""
    weights, model_cfg, info = load_checkpoint(path)
    info = {k: v for k, v in info.items() if k not in ("format", "model")}
    info.update({k: v for k, v in (("version", version), ("metrics", metrics), ("predictor", predictor)) if v})
    return save_checkpoint(out, weights, model_cfg, info, half=half)


def _architecture(header: dict) -> dict:
    """The network's config: recorded in the state; in states written before that, the init
    checkpoint's (a run that continues a checkpoint) or the training config's."""
    if header.get("model_config"):
        return header["model_config"]
    cfg = header["config"]
    if cfg.get("init_checkpoint"):
        return load_checkpoint(cfg["init_checkpoint"])[1].to_dict()
    return cfg["model"]


def convert(checkpoint: Path, runtime: str) -> str:
    """Convert an inference checkpoint for `runtime` into the cache; returns "runtime: cached file". Raises
    when the conversion fails (a server would fall back to PyTorch: here the user wants to know)."""
    predictor = Predictor.load(str(checkpoint), device="cpu", runtime=runtime)
    if predictor.compiled is None:
        raise RuntimeError(f"{checkpoint}: the conversion for {runtime} failed (the log above says why)")
    return f"{predictor.compiled.runtime}: {predictor.compiled.source}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("state", type=Path)
    ap.add_argument("out", type=Path, nargs="?", help="the inference file to write (optional with --convert)")
    ap.add_argument("--half", action="store_true", help="store weights as fp16 (half the size)")
    ap.add_argument("--version")
    ap.add_argument("--metrics", type=Path, help="JSON file of metrics to put in the card")
    ap.add_argument("--predictor", metavar="NAME=VALUE,...",
                    help="inference settings for these weights (model.predictor.PredictorOptions)")
    ap.add_argument("--convert", metavar="RUNTIME", choices=("openvino", "onnxruntime", "auto"),
                    help="also convert the inference file for this CPU runtime into the cache")
    args = ap.parse_args(argv)
    if args.out is None and not args.convert:
        ap.error("give OUT, or --convert to convert an inference checkpoint")
    path = args.state
    if args.out is not None:
        metrics = json.loads(args.metrics.read_text()) if args.metrics else None
        try:
            predictor = dict(parse_options(args.predictor))
        except ValueError as e:
            ap.error(str(e))
        path = export(args.state, args.out, args.half, args.version, metrics, predictor)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.convert:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        print(f"converted {path} for {convert(path, args.convert)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
