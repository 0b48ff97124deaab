"""Speed and memory of the predictor: ms per click (coarse, refine, total), peak memory, parameters,
for PyTorch and the optimised CPU inference runtime side by side (model/runtime.py).

    python -m training.bench [--backbones efficientnet-lite2,resnet50] [--sizes 0.5,1,12] [--clicks 20]
                             [--runtimes torch,auto] [--json]
    python -m training.bench --agreement Berkeley [--limit 100] [--runtime auto]

For each backbone, device present (CPU; CUDA when available), image size in megapixels and
runtime, an image gets a warm-up of 3 clicks and then `--clicks` timed clicks; the median is
reported. Each configuration runs in a fresh process so the peak resident memory is its own, and
the runtimes of one size run back to back: "speedup" ("x torch") is the first runtime's (PyTorch's)
median total over this one's, the ratio that means something on a machine whose speed varies from day to day (absolute ms do not).
The image is a real photo (the first Berkeley benchmark image, resized) when the data sets are
present. A runtime other than torch applies on CPU only (CUDA rows are PyTorch's).

--agreement: the robot user of the evaluation protocol clicks 20 times on each instance of a data
set with the PyTorch path (the shipped checkpoint and its card's settings), and the runtime's session
gets the same clicks; prints the mean IoU between the two masks (threshold 0.49) over all clicks,
the lowest instance's, and how many masks were identical.
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

from model.checkpoint import DEFAULT_CHECKPOINT, build_model, file_sha256
from model.config import ModelConfig
from model.images import load_image
from model.network import InteractiveSegNet
from model.predictor import Predictor
from model.runtime import choose, default_cache
from training.evaluation.clicker import RobotClicker
from training.evaluation.datasets import default_data_root, load_dataset


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
    backbone, device, mp_size, clicks, checkpoint, threads, runtime = args
    if threads:
        torch.set_num_threads(threads)
    if checkpoint and backbone == "efficientnet-lite2" and Path(checkpoint).exists():
        net, info = build_model(checkpoint)
        info = dict(info, checkpoint_sha256=file_sha256(checkpoint))    # the runtime's cache key
    else:  # timing does not depend on the weights' values
        torch.manual_seed(0)
        net, info = InteractiveSegNet(ModelConfig(backbone=backbone)), {"version": f"random-{backbone}"}
    t_load = time.perf_counter()
    predictor = Predictor(net, info, device=device, runtime=runtime, cache=default_cache())
    load_s = time.perf_counter() - t_load
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
        "runtime": predictor.runtime, "load_s": round(load_s, 2),
        "megapixels": round(h * w / 1e6, 2), "image": f"{w}x{h}", "clicks": len(totals),
        "open_ms": round(open_ms, 1),
        "coarse_ms": round(statistics.median(coarse), 1), "refine_ms": round(statistics.median(refine), 1),
        "total_ms": round(statistics.median(totals), 1), "p90_ms": round(float(np.percentile(totals, 90)), 1),
        "mean_refine_passes": round(float(np.mean(passes)), 2),
        "peak_memory_mib": round(peak, 1), "memory_kind": "cuda allocated" if device == "cuda" else "process RSS",
        "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        "torch_threads": torch.get_num_threads(), "model_version": predictor.version,
    }


def agreement(dataset: str, limit: int | None, runtime: str, clicks: int = 20, threshold: float = 0.49) -> dict:
    """Masks of the PyTorch path and of `runtime` on the robot user's clicks (see the module doc)."""
    ref = Predictor.load("default", device="cpu", runtime="torch")
    other = Predictor.load("default", device="cpu", runtime=runtime)
    ious, lowest, t_ref, t_other = [], [], 0.0, 0.0
    for sample in load_dataset(dataset, limit=limit):
        s = sample.load()
        robot = RobotClicker(s.gt, s.ignore)
        a, b = ref.open(s.image), other.open(s.image)
        pred = np.zeros(s.gt.shape, bool)
        mine = []
        for _ in range(clicks):
            c = robot.next_click(pred)
            t = time.perf_counter()
            pred = a.add_click(c.x, c.y, c.positive) > threshold
            t_ref += time.perf_counter() - t
            t = time.perf_counter()
            theirs = b.add_click(c.x, c.y, c.positive) > threshold
            t_other += time.perf_counter() - t
            union = np.count_nonzero(pred | theirs)
            mine.append(np.count_nonzero(pred & theirs) / union if union else 1.0)
        ious += mine
        lowest.append(min(mine))
    n = len(ious)
    return {"dataset": dataset, "instances": len(lowest), "clicks": n, "runtime": other.runtime,
            "mean_iou": round(float(np.mean(ious)), 5), "lowest_instance_min_iou": round(float(min(lowest)), 4),
            "identical_masks": sum(v == 1.0 for v in ious),
            "ms_per_click": {"torch": round(1000 * t_ref / n, 1), other.runtime: round(1000 * t_other / n, 1)},
            "ratio": round(t_ref / t_other, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="efficientnet-lite2,resnet50,resnet101")
    ap.add_argument("--sizes", default="0.5,1,12", help="image sizes in megapixels")
    ap.add_argument("--clicks", type=int, default=20, help="timed clicks per configuration (after 3 warm-up)")
    ap.add_argument("--devices", default="auto", help="cpu,cuda or auto (every device present)")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="weights for lite2 (else random)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads, and the runtime's (0 = default)")
    ap.add_argument("--runtimes", default="torch,auto",
                    help="inference runtimes to compare (torch, openvino, onnxruntime, auto = INFERENCE_RUNTIME's "
                         "choice); the first is the reference of the ratio")
    ap.add_argument("--agreement", metavar="DATASET", help="compare the masks of torch and --runtime instead")
    ap.add_argument("--runtime", default="auto", help="the runtime --agreement compares with torch")
    ap.add_argument("--limit", type=int, default=None, help="--agreement: first N instances")
    ap.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.agreement:
        result = agreement(args.agreement, args.limit, args.runtime)
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if args.devices == "auto" \
        else args.devices.split(",")
    runtimes = [choose(r) for r in args.runtimes.split(",")]
    jobs = [[(b, d, float(s), args.clicks, args.checkpoint, args.threads, r) for r in (runtimes if d == "cpu" else ["torch"])]
            for d in devices for b in args.backbones.split(",") for s in args.sizes.split(",")]
    ctx = mp.get_context("spawn")
    rows = []
    for group in jobs:
        first = None
        for job in group:
            with ctx.Pool(1) as pool:  # a fresh process per configuration: clean peak memory
                row = pool.apply(_run_one, (job,))
            first = first or row
            row["speedup"] = round(first["total_ms"] / row["total_ms"], 2)
            rows.append(row)
            if not args.json:
                if len(rows) == 1:
                    print(f"{'backbone':<20}{'device':<10}{'runtime':<13}{'image':>11}{'coarse':>9}{'refine':>9}"
                          f"{'total':>9}{'p90':>8}{'passes':>8}{'peak MiB':>10}{'params M':>10}{'x ' + runtimes[0]:>9}")
                print(f"{row['backbone']:<20}{row['device'][:9]:<10}{row['runtime']:<13}{row['image']:>11}"
                      f"{row['coarse_ms']:>9}{row['refine_ms']:>9}{row['total_ms']:>9}{row['p90_ms']:>8}"
                      f"{row['mean_refine_passes']:>8}{row['peak_memory_mib']:>10}{row['parameters_m']:>10}"
                      f"{row['speedup']:>9}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
