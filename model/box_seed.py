"""A box prompt for a click-only network: OpenCV's GrabCut seeds the mask, the network refines it.

A network trained without box prompts cannot read a box. Cropping the image to the box and
clicking its centre (what the backend did before) gave a mean IoU of about 0.4 with tight boxes;
GrabCut's colour models, initialised from the box (outside = background), give about 0.74 on
Berkeley. The seed then becomes the network's previous-mask input with one positive click at its
deepest inside point, so the later clicks refine it instead of starting over.
"""
from __future__ import annotations

import cv2
import numpy as np

SEED_SIDE = 400        # GrabCut runs on a copy with this long side: ~0.3 s; 640 px costs 2x for +0.02 IoU
SEED_ITERATIONS = 5
SEED_MARGIN = 0.25    # GrabCut sees the box grown by a quarter of its long side (+ 8 px) each way


def grabcut_seed(image: np.ndarray, box: tuple[float, float, float, float],
                 side: int = SEED_SIDE, iterations: int = SEED_ITERATIONS, margin: float = SEED_MARGIN) -> np.ndarray:
    """Foreground mask (h, w) bool of an RGB uint8 image for a box (y0, x0, y1, x1) in its pixels.

    GrabCut runs on the box grown by `margin` x its long side (+ 8 px) on each side, not on the whole
    image: its background model then learns the object's surroundings, and a small box keeps its
    pixels within the `side` budget (TrainVal box-only mean IoU after the network 0.684 -> 0.695)."""
    h, w = image.shape[:2]
    y0, x0, y1, x1 = box
    m = margin * max(y1 - y0, x1 - x0) + 8
    cy0, cx0 = int(max(0, y0 - m)), int(max(0, x0 - m))
    cy1, cx1 = int(min(h, np.ceil(y1 + m))), int(min(w, np.ceil(x1 + m)))
    out = np.zeros((h, w), bool)
    out[cy0:cy1, cx0:cx1] = _grabcut(image[cy0:cy1, cx0:cx1], (y0 - cy0, x0 - cx0, y1 - cy0, x1 - cx0),
                                     side, iterations)
    return out


def _grabcut(image: np.ndarray, box: tuple[float, float, float, float], side: int, iterations: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(1.0, side / max(h, w))
    small = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA) if s < 1 else image
    sh, sw = small.shape[:2]
    y0, x0, y1, x1 = box
    rx0, ry0 = min(sw - 1, max(0, int(x0 * s))), min(sh - 1, max(0, int(y0 * s)))
    rx1, ry1 = min(sw, max(rx0 + 1, int(np.ceil(x1 * s)))), min(sh, max(ry0 + 1, int(np.ceil(y1 * s))))
    if rx1 - rx0 < 3 or ry1 - ry0 < 3 or (rx1 - rx0) * (ry1 - ry0) >= 0.98 * sw * sh:
        # GrabCut needs background outside the box to learn from, and a few pixels inside it.
        return _box_mask(h, w, box)
    mask = np.zeros((sh, sw), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)   # GrabCut's k-means initialisation: the same box gives the same mask
    cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), mask, (rx0, ry0, rx1 - rx0, ry1 - ry0),
                bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.float32)
    if not fg.any():
        return _box_mask(h, w, box)
    return cv2.resize(fg, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5 if s < 1 else fg > 0.5


def deepest_point(mask: np.ndarray) -> tuple[int, int]:
    """(y, x) of the pixel of a non-empty mask farthest from its boundary (the image edge counts as
    boundary): where a user would click to say "this object"."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(y), int(x)


def _box_mask(h: int, w: int, box: tuple[float, float, float, float]) -> np.ndarray:
    y0, x0, y1, x1 = box
    m = np.zeros((h, w), bool)
    m[max(0, int(y0)):max(int(y0) + 1, int(np.ceil(y1))), max(0, int(x0)):max(int(x0) + 1, int(np.ceil(x1)))] = True
    return m
