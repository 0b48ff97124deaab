"""Edge-preserving smoothing of the probability map with the image as guide (He et al., "Guided
Image Filtering", TPAMI 2013), so the mask's edges follow the image's edges at full resolution.

The network answers at stride 4 of a 384-px view and bilinear upsampling blurs the boundary over
several pixels of a large photo; the filter snaps that soft band to the nearest image edge. It is
O(pixels) (a handful of box filters), whatever the radius.
"""
from __future__ import annotations

import cv2
import numpy as np


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Filter `src` (H, W) float32 with `guide` (H, W) or (H, W, 3) uint8 (taken as grey in [0, 1]).
    `radius` in pixels, `eps` the edge threshold on the guide's variance (e.g. 1e-3: edges of
    contrast above ~0.03 are kept). Returns float32 (H, W), not clipped."""
    if radius < 1:
        return src.astype(np.float32, copy=True)
    grey = cv2.cvtColor(guide, cv2.COLOR_RGB2GRAY) if guide.ndim == 3 else guide
    i = grey.astype(np.float32) / 255.0
    p = src.astype(np.float32)
    k = (2 * radius + 1, 2 * radius + 1)

    def box(a):
        return cv2.boxFilter(a, -1, k, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(i), box(p)
    var_i = box(i * i) - mean_i * mean_i
    cov_ip = box(i * p) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box(a) * i + box(b)
