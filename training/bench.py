"""Speed and memory of the predictor: ms per click (coarse, refine, total), peak memory, parameters.

    python -m training.bench [--backbones efficientnet-lite2,resnet50] [--sizes 0.5,1,12] [--clicks 20] [--json]

For each backbone and each device present (CPU; CUDA when available), an image of each size in
megapixels gets a warm-up of 3 clicks and then `--clicks` timed clicks; the median is reported.
Each configuration runs in a fresh process so the peak resident memory is its own. The image is a
real photo (the first Berkeley benchmark image, resized) when the data sets are present.
Goals (issue 2): lite2 on a 2-core CPU <= 250 ms per click at 1 MP; on an H100 <= 15 ms (resnet50)
and <= 10 ms (lite2).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from model.checkpoint import DEFAULT_CHECKPOINT, build_model
from model.config import ModelConfig
from model.images import load_image
from model.network import InteractiveSegNet
from model.predictor import Predictor
from training.evaluation.datasets import default_data_root


def _test_image(megapixels: float) -> np.ndarray:
    src = sorted((default_data_root() / "Berkeley" / "images").glob("*.jpg"))
    base = load_image(src[0]) if src else np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)
    h, w = base.shape[:2]
    s = (megapixels * 1e6 / (h * w)) ** 0.5
    return cv2.resize(base, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)


def _click_sequence(h: int, w: int, n: int) -> list:
    """Deterministic clicks: positives near the centre, negatives towards the borders."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append((float(rng.uniform(0.02, 0.2) * w), float(rng.uniform(0.02, 0.98) * h), False))
        else:
            out.append((float(rng.uniform(0.35, 0.65) * w), float(rng.uniform(0.35, 0.65) * h), True))
    return out


def _run_one(args: tuple) -> dict:
    backbone, device, mp_size, clicks, checkpoint, threads = args
    if threads:
        torch.set_num_threads(threads)
    if checkpoint and backbone == "efficientnet-lite2" and Path(checkpoint).exists():
        net, info = build_model(checkpoint)
    else:  # timing does not depend on the weights' values
        torch.manual_seed(0)
        net, info = InteractiveSegNet(ModelConfig(backbone=backbone)), {"version": f"random-{backbone}"}
    predictor = Predictor(net, info, device=device)
    image = _test_image(mp_size)
    h, w = image.shape[:2]
    seq = _click_sequence(h, w, clicks + 3)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_open = time.perf_counter()
    session = predictor.open(image)
    open_ms = (time.perf_counter() - t_open) * 1000
    totals, coarse, refine, passes = [], [], [], []
    for i, (x, y, pos) in enumerate(seq):
        if i and i % 8 == 0:
            session.reset()  # keep click counts realistic (annotators rarely go past 8)
        t = time.perf_counter()
        session.add_click(x, y, pos)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) * 1000
        if i >= 3:
            totals.append(dt)
            coarse.append(session.last_timing["coarse_ms"])
            refine.append(session.last_timing["refine_ms"])
            passes.append(session.last_timing["refine_passes"])
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "backbone": backbone, "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "megapixels": round(h * w / 1e6, 2), "image": f"{w}x{h}", "clicks": len(totals),
        "open_ms": round(open_ms, 1),
        "coarse_ms": round(statistics.median(coarse), 1), "refine_ms": round(statistics.median(refine), 1),
        "total_ms": round(statistics.median(totals), 1), "p90_ms": round(float(np.percentile(totals, 90)), 1),
        "mean_refine_passes": round(float(np.mean(passes)), 2),
        "peak_memory_mib": round(peak, 1), "memory_kind": "cuda allocated" if device == "cuda" else "process RSS",
        "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        "torch_threads": torch.get_num_threads(), "model_version": predictor.version,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="efficientnet-lite2,resnet50,resnet101")
    ap.add_argument("--sizes", default="0.5,1,12", help="image sizes in megapixels")
    ap.add_argument("--clicks", type=int, default=20, help="timed clicks per configuration (after 3 warm-up)")
    ap.add_argument("--devices", default="auto", help="cpu,cuda or auto (every device present)")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="weights for lite2 (else random)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    args = ap.parse_args(argv)
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if args.devices == "auto" \
        else args.devices.split(",")
    jobs = [(b, d, float(s), args.clicks, args.checkpoint, args.threads)
            for d in devices for b in args.backbones.split(",") for s in args.sizes.split(",")]
    ctx = mp.get_context("spawn")
    rows = []
    for job in jobs:
        with ctx.Pool(1) as pool:  # a fresh process per configuration: clean peak memory
            row = pool.apply(_run_one, (job,))
        rows.append(row)
        if not args.json:
            if len(rows) == 1:
                print(f"{'backbone':<20}{'device':<26}{'image':>11}{'coarse':>9}{'refine':>9}{'total':>9}"
                      f"{'p90':>8}{'passes':>8}{'peak MiB':>10}{'params M':>10}")
            print(f"{row['backbone']:<20}{row['device'][:25]:<26}{row['image']:>11}{row['coarse_ms']:>9}"
                  f"{row['refine_ms']:>9}{row['total_ms']:>9}{row['p90_ms']:>8}{row['mean_refine_passes']:>8}"
                  f"{row['peak_memory_mib']:>10}{row['parameters_m']:>10}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
