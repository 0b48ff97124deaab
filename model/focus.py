"""IAM, the intention-driven focus view (method.md): where to look again, and how to paste back;
and the zoom-in view around the whole object (object_view).

All functions work on masks at the predictor's working resolution, in (y, x) pixel coordinates.
"""
from __future__ import annotations

import cv2
import numpy as np


def changed_region(prev: np.ndarray, new: np.ndarray, y: int, x: int) -> np.ndarray:
    """The connected region (8-connectivity) of pixels whose label flipped that contains the click;
    empty when the click's own pixel did not flip. This is what the user meant to fix."""
    changed = (prev != new).astype(np.uint8)
    if not changed[y, x]:
        return np.zeros_like(prev, dtype=bool)
    _, labels = cv2.connectedComponents(changed, connectivity=8)
    return labels == labels[y, x]


def focus_radius(prev: np.ndarray, region: np.ndarray, y: int, x: int, min_radius: float = 5.0) -> float:
    """Crop half-size before expansion: the changed region's extent around the click (Chebyshev,
    so the square crop covers it); if the click changed nothing, its distance to the previous
    mask's boundary; never below `min_radius`."""
    if region.any():
        ys, xs = np.nonzero(region)
        r = float(max(np.abs(ys - y).max(), np.abs(xs - x).max()))
    elif prev.any() and not prev.all():
        r = distance_to_other_label(prev, y, x)
    else:
        r = 0.0
    return max(r, float(min_radius))


def distance_to_other_label(mask: np.ndarray, y: int, x: int, start: int = 16) -> float:
    """Euclidean distance from (y, x) to the nearest pixel whose label differs from mask[y, x] (the
    click's distance to the mask's boundary): what scipy's distance_transform_edt gives at that
    pixel, searched in a square window around the click that doubles until it holds the answer, not
    over the whole working image (a 2 MP transform cost ~25 ms of every click). Exact: a pixel
    outside a window of half-side r is farther than r, so a nearest pixel found within r is the
    nearest of all. inf when the mask holds one label only."""
    height, width = mask.shape
    label = mask[y, x]
    r = start
    while True:
        y0, x0 = max(0, y - r), max(0, x - r)
        ys, xs = np.nonzero(mask[y0:y + r + 1, x0:x + r + 1] != label)
        whole = y0 == 0 and x0 == 0 and y + r + 1 >= height and x + r + 1 >= width
        if ys.size:
            d2 = int(((ys + (y0 - y)) ** 2 + (xs + (x0 - x)) ** 2).min())
            if d2 <= r * r or whole:
                return float(np.sqrt(d2))
        elif whole:
            return float("inf")
        r *= 2


def focus_box(y: float, x: float, half: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A square (y0, x0, y1, x1), end exclusive, of side 2*half+1 centred on the click, shifted to
    lie inside the image and clipped where the image is smaller than the square."""
    side = int(round(2 * half + 1))
    side_y, side_x = min(side, height), min(side, width)
    y0 = int(round(y - side_y / 2))
    x0 = int(round(x - side_x / 2))
    y0 = min(max(y0, 0), height - side_y)
    x0 = min(max(x0, 0), width - side_x)
    return y0, x0, y0 + side_y, x0 + side_x


def paste(prob: np.ndarray, crop_prob: np.ndarray, box: tuple[int, int, int, int], positive: bool,
          region: np.ndarray | None, intention: bool = True) -> np.ndarray:
    """Paste a refined crop into a copy of `prob`.

    Intention rule: a positive click asks for foreground, a negative one for background, so outside
    the changed region the refinement may only move pixels in the click's direction.
    """
    y0, x0, y1, x1 = box
    out = prob.copy()
    old = prob[y0:y1, x0:x1]
    new = crop_prob
    if intention:
        directed = np.maximum(old, new) if positive else np.minimum(old, new)
        if region is not None:
            free = region[y0:y1, x0:x1]
            new = np.where(free, new, directed)
        else:
            new = directed
    out[y0:y1, x0:x1] = new
    return out


def object_view(mask: np.ndarray, positive: list[tuple[float, float]], expand: float = 1.4,
                min_side: int = 200, max_cover: float = 0.8) -> tuple[int, int, int, int] | None:
    """Zoom-in view (RITM's): the bounding box of the mask and the positive clicks (y, x), each side
    grown `expand` times around its centre and to at least `min_side` pixels, clipped to the image;
    (y0, x0, y1, x1) end exclusive. None when there is nothing to frame, or when the view would
    cover `max_cover` of the image or more (the whole image is then as good and cheaper to cache)."""
    height, width = mask.shape
    known = mask.copy()
    for y, x in positive:
        known[int(min(max(round(y), 0), height - 1)), int(min(max(round(x), 0), width - 1))] = True
    if not known.any():
        return None
    ys = np.flatnonzero(known.any(axis=1))
    xs = np.flatnonzero(known.any(axis=0))
    cy, cx = (ys[0] + ys[-1]) / 2, (xs[0] + xs[-1]) / 2
    side_y = max((ys[-1] - ys[0] + 1) * expand, min_side)
    side_x = max((xs[-1] - xs[0] + 1) * expand, min_side)
    y0, y1 = max(0, int(round(cy - side_y / 2))), min(height, int(round(cy + side_y / 2)) + 1)
    x0, x1 = max(0, int(round(cx - side_x / 2))), min(width, int(round(cx + side_x / 2)) + 1)
    if (y1 - y0) * (x1 - x0) >= max_cover * height * width:
        return None
    return y0, x0, y1, x1
