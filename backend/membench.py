"""Memory of the backend with big and hostile images: RSS per /predict.

    python -m backend.membench [--images 20] [--megapixels 49] [--checkpoint default] [--json]
                               [--env SESSION_CACHE_MB=2048 --env IMAGE_CACHE_MB=1024 ...]
    python -m backend.membench --cases all [--json]       # or --cases ico,png16,...

Builds the real app in this process (no HTTP server: what is measured is the backend, not a
client). Without --cases: one interactive /predict with one keypoint per distinct synthetic JPEG of
the given size, as many annotators opening as many photos would; prints the RSS after each request,
the peak, and the caches' own accounting (GET /health). Run it on two versions to compare them.

--cases: one request per case, each the worst a single request can do within the default limits
(legitimate big inputs) or an attack found against the backend (issue 22). The body is built first,
then the peak RSS is reset (/proc/self/clear_refs) and the request sent: "peak" is the growth of the
peak RSS during that one request over the RSS just before it.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import resource
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

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


def hwm_mb() -> float:
    """The peak RSS since the last reset_peak() (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux: 5 > /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


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


# -- hostile inputs, built without ever holding them decoded (also used by tests/test_security_*) ---
def rle_runs(num_pixels: int, runs) -> list[int]:
    """A Label Studio brush RLE (RGBA, 4 values a pixel) of `num_pixels` pixels from (pixels,
    painted) runs in order; the pixels after the last run are unpainted. Every run is written as
    series of at most 65536 values, the editor's longest, so a 7000 x 7000 empty mask is ~10 KB."""
    bits = [f"{num_pixels * 4:032b}", f"{8 - 1:05b}", "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))]
    done = 0
    for pixels, painted in list(runs) + [(num_pixels - sum(n for n, _ in runs), False)]:
        values, done = pixels * 4, done + pixels
        while values > 0:
            n = min(values, 65536)
            bits.append(f"111{n - 1:016b}{255 if painted else 0:08b}")
            values -= n
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return list(int(text[i:i + 8], 2) for i in range(0, len(text), 8))


def brush(width: int, height: int, rle: list, label: str = "Object") -> dict:
    """A smart brush region as Label Studio sends it."""
    return {"original_width": width, "original_height": height, "image_rotation": 0, "type": "brushlabels",
            "from_name": "tag", "to_name": "image",
            "value": {"format": "rle", "rle": rle, "brushlabels": [label]}}


def disk_rle(width: int, height: int, cx: int, cy: int, r: int) -> list[int]:
    """The RLE of a painted disk, built row by row (never a width x height array)."""
    runs, at = [], 0
    for y in range(max(0, cy - r), min(height, cy + r + 1)):
        half = int((r * r - (y - cy) ** 2) ** 0.5)
        x0, x1 = max(0, cx - half), min(width, cx + half + 1)
        start = y * width + x0
        runs += [(start - at, False), (x1 - x0, True)]
        at = y * width + x1
    return rle_runs(width * height, runs)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width: int, height: int) -> bytes:
    """A black RGB PNG of any size, compressed row by row (a 19000 x 19000 one is ~1 MB)."""
    z = zlib.compressobj(9)
    row = bytes(1 + 3 * width)                        # filter byte 0, then black pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def ico_bomb(side: int = 19000) -> bytes:
    """An ICO whose directory says 256 x 256 and whose one image is a side x side PNG."""
    png = blank_png(side, side)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)      # 0 = 256 px
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def gray16_png(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG (a horizontal ramp over the full 16-bit range)."""
    ramp = np.linspace(0, 65535, width).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp, (height, width)).copy()).save(buf, format="PNG")
    return buf.getvalue()


def float32_tiff(width: int, height: int) -> bytes:
    """A 32-bit float greyscale TIFF, deflate-compressed (a ramp from 0 to 1)."""
    ramp = np.linspace(0, 1, width, dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp, (height, width)).copy(), "F").save(
        buf, format="TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _size(megapixels: float) -> tuple[int, int]:
    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    return width, int(round(width * 3 / 4))


def cases(megapixels: float) -> dict[str, tuple[str, Callable[[], dict]]]:
    """name -> (what it is, a function building its /predict body)."""
    w, h = _size(megapixels)

    def on_image(uri: str, width: int, height: int, regions=None) -> dict:
        return predict_body(1, uri, regions or [keypoint(width // 2, height // 2, width, height)])

    def photo_uri():
        return data_uri(photo(w, h, 0), "image/jpeg")

    def small_uri():
        return data_uri(photo(128, 96, 1), "image/jpeg")

    return {
        "photo": (f"one keypoint on a {w}x{h} JPEG", lambda: on_image(photo_uri(), w, h)),
        "brush": (f"one brush stroke (a disk) on a {w}x{h} JPEG",
                  lambda: on_image(photo_uri(), w, h, [brush(w, h, disk_rle(w, h, w // 2, h // 2, h // 4))])),
        "brush-full": (f"one brush stroke painting the whole {w}x{h} JPEG",
                       lambda: on_image(photo_uri(), w, h, [brush(w, h, rle_runs(w * h, [(w * h, True)]))])),
        "brush-regions": ("16 brush regions of 7000x7000, empty RLE, 16 unknown labels (issue 22, 1)",
                          lambda: on_image(small_uri(), 128, 96, [brush(7000, 7000, rle_runs(7000 * 7000, []), f"L{i}")
                                                                  for i in range(16)])),
        "brush-regions-label": ("16 brush regions of 7000x7000, empty RLE, one valid label",
                                lambda: on_image(small_uri(), 128, 96, [brush(7000, 7000, rle_runs(7000 * 7000, []))
                                                                        for _ in range(16)])),
        "rle-tail": ("a 128x96 brush stroke whose RLE has 1 MB of bytes after its end",
                     lambda: on_image(small_uri(), 128, 96,
                                      [brush(128, 96, disk_rle(128, 96, 64, 48, 20) + [170] * 2**20)])),
        "ico": ("ICO whose directory says 256x256, holding a 19000x19000 PNG (issue 22, 2)",
                lambda: on_image(data_uri(ico_bomb(19000), "image/x-icon"), 256, 256)),
        "png16": ("16-bit greyscale PNG, 4000x4000 (issue 22, 3)",
                  lambda: on_image(data_uri(gray16_png(4000, 4000), "image/png"), 4000, 4000)),
        "png16-max": (f"16-bit greyscale PNG, {w}x{h}",
                      lambda: on_image(data_uri(gray16_png(w, h), "image/png"), w, h)),
        "tiff32": ("32-bit float TIFF, 4000x4000 (issue 22, 3)",
                   lambda: on_image(data_uri(float32_tiff(4000, 4000), "image/tiff"), 4000, 4000)),
    }


def run_cases(client, names: list[str], megapixels: float, quiet: bool) -> list[dict]:
    table = cases(megapixels)
    rows = []
    for name in names:
        what, build = table[name]
        body = build()
        reset_peak()
        before = rss_mb()
        t0 = time.perf_counter()
        r = client.post("/predict", json=body)
        ms = round((time.perf_counter() - t0) * 1000)
        del body
        row = {"case": name, "what": what, "status": r.status_code, "ms": ms,
               "peak_growth_mb": round(hwm_mb() - before), "kept_mb": round(rss_mb() - before)}
        if r.status_code >= 400:
            row["error"] = (r.get_json(silent=True) or {}).get("error", "")[:160]
        rows.append(row)
        if not quiet:
            print(f"{name:<20} {r.status_code}  {ms:>6} ms  peak +{row['peak_growth_mb']:>5} MB  "
                  f"kept +{row['kept_mb']:>5} MB  {what}", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.membench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--megapixels", type=float, default=49.0)
    ap.add_argument("--cases", default="", help=f"'all' or some of: {', '.join(cases(49.0))}")
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--predictor-options", default="", help="e.g. coarse_size=64,refine=false")
    ap.add_argument("--env", action="append", default=[], help="VAR=VALUE backend setting (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    options: dict[str, Any] = {}
    for item in filter(None, args.predictor_options.split(",")):
        k, v = item.split("=", 1)
        options[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
    env = dict(e.split("=", 1) for e in args.env)
    width, height = _size(args.megapixels)
    if not args.cases:
        env.setdefault("MAX_CONTENT_LENGTH", str(256 * 2**20))
    config = Config.from_env(env)          # --env INFERENCE_RUNTIME=torch measures the PyTorch path
    app = create_app(config, Predictor.load(args.checkpoint, runtime=config.inference_runtime, **options))
    client = app.test_client()
    start = rss_mb()
    if args.cases:
        names = list(cases(args.megapixels)) if args.cases == "all" else args.cases.split(",")
        rows = run_cases(client, names, args.megapixels, args.json)
        print(json.dumps({"rss_start_mb": round(start), "cases": rows}, indent=2) if args.json else
              "\n".join(f"{r['case']:<20} {r['status']}  peak +{r['peak_growth_mb']} MB" for r in rows))
        return 0
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
