"""Memory of the backend with big images: RSS while annotators open sessions on distinct images.

    python -m backend.membench [--images 20] [--megapixels 49] [--checkpoint default] [--json]
                               [--env SESSION_CACHE_MB=2048 --env IMAGE_CACHE_MB=1024 ...]

Builds the real app in this process (no HTTP server: what is measured is the backend, not a
client), then sends one interactive /predict with one keypoint per distinct synthetic JPEG of the
given size, as many annotators opening as many photos would. Prints the RSS after each request,
the peak, and the caches' own accounting (GET /health). Run it on two versions to compare them.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.predictor import Predictor

from .app import create_app
from .bench import keypoint, predict_body
from .config import Config


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KB on Linux


def photo(width: int, height: int, seed: int) -> bytes:
    """A smooth synthetic photo with one object (JPEG): distinct per seed, cheap to make."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                       Image.Resampling.BILINEAR)
    ImageDraw.Draw(small).ellipse([width // 3, height // 3, 2 * width // 3, 2 * height // 3],
                                  fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.membench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--megapixels", type=float, default=49.0)
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--predictor-options", default="", help="e.g. coarse_size=64,refine=false")
    ap.add_argument("--env", action="append", default=[], help="VAR=VALUE backend setting (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    options = {}
    for item in filter(None, args.predictor_options.split(",")):
        k, v = item.split("=", 1)
        options[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
    env = dict(e.split("=", 1) for e in args.env)
    width = int(round((args.megapixels * 1e6 * 4 / 3) ** 0.5))
    height = int(round(width * 3 / 4))
    env.setdefault("MAX_CONTENT_LENGTH", str(256 * 2**20))
    app = create_app(Config.from_env(env), Predictor.load(args.checkpoint, **options))
    client = app.test_client()
    start = rss_mb()
    rows = []
    for i in range(args.images):
        uri = "data:image/jpeg;base64," + base64.b64encode(photo(width, height, i)).decode()
        t0 = time.perf_counter()
        r = client.post("/predict", json=predict_body(i + 1, uri, [keypoint(width // 2, height // 2, width, height)]))
        rows.append({"image": i + 1, "status": r.status_code, "ms": round((time.perf_counter() - t0) * 1000),
                     "rss_mb": round(rss_mb())})
        if not args.json:
            print(f"image {i + 1:>3}  {r.status_code}  {rows[-1]['ms']:>6} ms  RSS {rows[-1]['rss_mb']:>6} MB",
                  file=sys.stderr)
    health = client.get("/health").get_json()
    out = {"images": args.images, "size": f"{width}x{height}", "rss_start_mb": round(start),
           "rss_end_mb": round(rss_mb()), "rss_peak_mb": round(peak_mb()), "caches": health.get("caches"),
           "sessions": health.get("sessions"), "requests": rows}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.images} images of {width}x{height}: RSS {out['rss_start_mb']} MB after loading, "
              f"{out['rss_end_mb']} MB at the end, peak {out['rss_peak_mb']} MB; sessions {out['sessions']}; "
              f"caches {json.dumps(out['caches'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
