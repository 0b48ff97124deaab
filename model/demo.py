"""Segment an image from clicks on the command line and write a PNG overlay (and the mask).

    python -m model.demo IMAGE --click 120,80 --click 30,40,neg [--checkpoint default] [--out out.png]

Clicks are x,y in pixels of the image as displayed (EXIF orientation applied); add ",neg" for a
negative click. Writes OUT (overlay: mask in red, positive clicks green, negative clicks red) and
OUT with "-mask.png" (the binary mask).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from .images import load_image
from .predictor import Predictor


def parse_click(text: str) -> tuple[float, float, bool]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"click {text!r}: expected x,y or x,y,neg")
    try:
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"click {text!r}: x and y must be numbers") from None
    positive = True
    if len(parts) == 3:
        if parts[2] not in ("pos", "neg", "+", "-"):
            raise argparse.ArgumentTypeError(f"click {text!r}: the third field is pos or neg")
        positive = parts[2] in ("pos", "+")
    return x, y, positive


def overlay(image: np.ndarray, mask: np.ndarray, clicks) -> np.ndarray:
    out = image.astype(np.float32)
    red = np.array([255, 0, 0], np.float32)
    out[mask] = 0.5 * out[mask] + 0.5 * red
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, min(image.shape[:2]) // 300))
    r = max(3, min(image.shape[:2]) // 100)
    for x, y, pos in clicks:
        cv2.circle(out, (round(x), round(y)), r, (0, 255, 0) if pos else (255, 0, 0), -1)
        cv2.circle(out, (round(x), round(y)), r, (255, 255, 255), 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--click", action="append", type=parse_click, required=True, help="x,y[,neg]")
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--out", default="overlay.png")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    image = load_image(args.image)
    predictor = Predictor.load(args.checkpoint, device=args.device)
    session = predictor.open(image)
    for x, y, pos in args.click:
        t = time.perf_counter()
        try:
            session.add_click(x, y, pos)
        except ValueError as e:
            ap.error(str(e))
        print(f"click ({x:g}, {y:g}, {'pos' if pos else 'neg'}): {(time.perf_counter() - t) * 1000:.0f} ms")
    mask = session.mask()
    out = Path(args.out)
    cv2.imwrite(str(out), cv2.cvtColor(overlay(image, mask, args.click), cv2.COLOR_RGB2BGR))
    mask_path = out.with_name(out.stem + "-mask.png")
    cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)
    print(f"model {predictor.version}: mask {mask.mean() * 100:.1f}% of the image -> {out}, {mask_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
