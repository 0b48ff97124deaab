"""Masks to and from Label Studio's formats.

Brush RLE goes through label-studio-sdk's converter (the codec the editor's rle-pack format is
maintained in); nothing here hand-rolls RLE. Polygons come from OpenCV contours.
"""
from __future__ import annotations

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle


class MaskFormatError(ValueError):
    pass


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """bool H x W -> Label Studio brush RLE (RGBA, 255 where the mask is set)."""
    if mask.ndim != 2:
        raise MaskFormatError(f"mask must be 2-D, got shape {mask.shape}")
    return mask2rle(np.where(mask, 255, 0).astype(np.uint8))


def rle_to_mask(rle, height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> bool H x W (alpha channel > 0)."""
    if not isinstance(rle, (list, tuple)) or not rle:
        raise MaskFormatError("rle must be a non-empty list of byte values")
    try:
        data = bytes(int(v) for v in rle)
    except (TypeError, ValueError, OverflowError) as e:    # OverflowError: int(Infinity)
        raise MaskFormatError(f"rle must be a list of integers 0..255: {e}") from None
    if len(data) < 7:
        raise MaskFormatError("rle too short for its header")
    n = int.from_bytes(data[:4], "big")
    if n != height * width * 4:
        raise MaskFormatError(
            f"rle holds {n} values but original_width x original_height x 4 = {height * width * 4}")
    try:
        return decode_rle(data).reshape(height, width, 4)[:, :, 3] > 0
    except (ValueError, IndexError) as e:
        raise MaskFormatError(f"corrupt rle: {e}") from None


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
