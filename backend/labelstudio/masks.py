"""Masks to and from Label Studio's formats: brush RLE (the codec is training/brush.py, shared with
fine-tuning) and polygons (from OpenCV contours).
"""
from __future__ import annotations

import cv2
import numpy as np

# The brush RLE codec is training's (fine-tuning reads annotations with the same decoder); the
# backend's names for it:
from training.brush import (ALPHA_THRESHOLD, RLE_SIZES, MaskFormatError, check_rle, mask_to_rle, rle_bytes,  # noqa: F401
                            rle_to_mask)


def mask_to_polygons(mask: np.ndarray, tolerance: float, min_area: float = 4.0) -> list[list[list[float]]]:
    """bool H x W -> outer polygons in percent of the image ([[x%, y%], ...] each).

    Each connected component gives one polygon (holes are not represented: PolygonLabels has no
    holes), simplified with Douglas-Peucker at `tolerance` pixels; pieces under min_area pixels
    are dropped.
    """
    h, w = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polys = []
    for c in sorted(contours, key=cv2.contourArea, reverse=True):
        if cv2.contourArea(c) < min_area:
            continue
        approx = cv2.approxPolyDP(c, tolerance, True) if tolerance > 0 else c
        if len(approx) < 3:
            continue
        pts = approx.reshape(-1, 2).astype(np.float64)
        # Contour points are pixel centres: +0.5 puts them at the pixel's centre in continuous
        # coordinates, which is what percent coordinates measure.
        polys.append([[round((x + 0.5) / w * 100.0, 4), round((y + 0.5) / h * 100.0, 4)]
                      for x, y in pts])
    return polys


def polygon_to_mask(points, height: int, width: int) -> np.ndarray:
    """[[x%, y%], ...] -> bool H x W (a PolygonLabels annotation as a mask: fine-tuning pulls them,
    backend/labelstudio/pull.py)."""
    pts = np.array([[x / 100.0 * width - 0.5, y / 100.0 * height - 0.5] for x, y in points])
    out = np.zeros((height, width), np.uint8)
    cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 1)
    return out.astype(bool)
