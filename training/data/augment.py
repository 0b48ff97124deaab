"""Geometric and photometric augmentation of one (image, mask) instance to a fixed square crop.

Steps: a scale ``s = base * U_log(scale_range)`` where ``base`` makes the whole image's long side
equal the crop (``base="image"``, what the coarse view sees at inference) or the object's bounding
box long side equal ``object_fill * crop`` (``base="object"``); a crop window placed so that the
object is inside when it fits, or the window lies within the object's extent when it does not (and
at least one object pixel is always inside); zero padding where the window leaves the image; a
horizontal flip; mild brightness/contrast/saturation/hue jitter. Downscaling uses cv2 INTER_AREA on
the whole image (no aliasing), upscaling one cv2.warpAffine straight into the crop (only the crop's
pixels are computed). Pixel centres are aligned the same way in both paths (half-pixel convention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Tuple, cast

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: int = 384
    scale_range: Tuple[float, float] = (0.75, 1.4)
    base: str = "image"           # "image" | "object" | "mixed" (object base with prob. object_prob)
    object_fill: float = 0.5      # "object" base: bbox long side = object_fill * crop_size
    object_prob: float = 0.3      # "mixed" base
    max_scale: float = 4.0        # cap on the absolute scale (tiny objects are not blown up further)
    min_visible: float = 0.6      # wanted fraction of the object (of what can fit) inside the crop
    tries: int = 10
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.2       # factor in [1-b, 1+b]
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02             # shift in turns (0.02 turn = 7.2 degrees)

    @classmethod
    def eval(cls, crop_size: int = 384) -> "AugmentConfig":
        """No random scale, flip or jitter: the whole image at the base scale (the window placement
        still comes from the caller's generator, which the validation dataset seeds per item)."""
        return cls(crop_size=crop_size, scale_range=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0)


class Augmented(NamedTuple):
    image: np.ndarray   # S x S x 3 uint8
    mask: np.ndarray    # S x S bool
    valid: np.ndarray   # S x S bool, False on zero padding
    scale: float
    window: Tuple[int, int]   # (top, left) of the crop in the scaled image (may be negative: padding)
    flipped: bool


def _bbox(mask: np.ndarray) -> Tuple[int, int, int, int]:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    y0, y1 = np.argmax(rows), len(rows) - np.argmax(rows[::-1])
    x0, x1 = np.argmax(cols), len(cols) - np.argmax(cols[::-1])
    return int(y0), int(y1), int(x0), int(x1)


def _origin_range(length: int, a: float, b: float, c: int) -> Tuple[int, int]:
    """Range of window origins along one axis (scaled length ``length``, object span [a, b), crop c)."""
    if length <= c:
        return length - c, 0                       # the whole axis fits: any placement in the padding
    if b - a <= c:
        lo, hi = max(0, math.ceil(b) - c), min(int(a), length - c)     # window contains the span
    else:
        lo, hi = max(0, int(a)), min(length - c, math.ceil(b) - c)     # window inside the span
    if lo > hi:
        lo = hi = min(max(0, int(round((a + b) / 2 - c / 2))), length - c)
    return lo, hi


def _visible(mask_cum: np.ndarray, sy: float, sx: float, oy: int, ox: int, c: int) -> int:
    """Object pixels of the original mask whose scaled position falls in the window (approximate, via
    a 2-D cumulative sum)."""
    H, W = mask_cum.shape[0] - 1, mask_cum.shape[1] - 1
    r0, r1 = np.clip([math.floor(oy / sy), math.ceil((oy + c) / sy)], 0, H)
    c0, c1 = np.clip([math.floor(ox / sx), math.ceil((ox + c) / sx)], 0, W)
    return int(mask_cum[r1, c1] - mask_cum[r0, c1] - mask_cum[r1, c0] + mask_cum[r0, c0])


def choose_scale(mask_hw: Tuple[int, int], bbox: Tuple[int, int, int, int], rng: np.random.Generator,
                 cfg: AugmentConfig) -> float:
    H, W = mask_hw
    base = cfg.base
    if base == "mixed":
        base = "object" if rng.random() < cfg.object_prob else "image"
    if base == "image":
        s0 = cfg.crop_size / max(H, W)
    elif base == "object":
        y0, y1, x0, x1 = bbox
        s0 = cfg.object_fill * cfg.crop_size / max(y1 - y0, x1 - x0)
    else:
        raise ValueError(f"unknown base {cfg.base!r}")
    lo, hi = cfg.scale_range
    f = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
    return min(s0 * f, cfg.max_scale)


def _crop_pad(a: np.ndarray, oy: int, ox: int, c: int) -> np.ndarray:
    out = np.zeros((c, c) + a.shape[2:], a.dtype)
    H, W = a.shape[:2]
    y0, x0 = max(oy, 0), max(ox, 0)
    y1, x1 = min(oy + c, H), min(ox + c, W)
    if y1 > y0 and x1 > x0:
        out[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = a[y0:y1, x0:x1]
    return out


def color_jitter(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig,
                 valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Brightness, contrast (around the mean grey of the ``valid`` pixels), saturation (around each
    pixel's grey) and hue on a uint8 RGB image. The first three are one affine colour map, applied
    with a single saturating ``cv2.transform``; hue is a shift in HSV."""
    b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    w = np.array([0.299, 0.587, 0.114])
    mean_rgb = np.array(cv2.mean(image, mask=None if valid is None else valid.astype(np.uint8)))[:3]
    m = b * float(w @ mean_rgb)
    # out = s*c*b*img + (1-s)*c*b*grey(img) + (1-c)*m
    M = s * c * b * np.eye(3) + (1 - s) * c * b * np.tile(w, (3, 1))
    T = np.concatenate([M, np.full((3, 1), (1 - c) * m)], axis=1).astype(np.float32)
    out = cv2.transform(image, T)
    if cfg.hue > 0:
        shift = int(round(rng.uniform(-cfg.hue, cfg.hue) * 180))
        if shift:
            hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return out


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig = AugmentConfig()) -> Optional[Augmented]:
    """Scale, crop (object kept in), pad, flip and colour-jitter one instance to ``cfg.crop_size``.

    Returns None when no object pixel survives (e.g. a thin object vanishing when downscaled); the
    caller draws another instance.
    """
    if not mask.any():
        return None
    H, W = mask.shape
    c = cfg.crop_size
    bbox = _bbox(mask)
    s = choose_scale((H, W), bbox, rng, cfg)
    sh, sw = max(1, int(round(H * s))), max(1, int(round(W * s)))
    sy, sx = sh / H, sw / W
    y0, y1, x0, x1 = bbox
    total = int(mask.sum())
    cum = cv2.integral(mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8))
    fit = total * min(1.0, c / ((y1 - y0) * sy)) * min(1.0, c / ((x1 - x0) * sx))
    yr = _origin_range(sh, y0 * sy, y1 * sy, c)
    xr = _origin_range(sw, x0 * sx, x1 * sx, c)
    best, best_vis = None, -1
    for _ in range(max(1, cfg.tries)):
        oy, ox = int(rng.integers(yr[0], yr[1] + 1)), int(rng.integers(xr[0], xr[1] + 1))
        vis = _visible(cum, sy, sx, oy, ox, c)
        if vis > best_vis:
            best, best_vis = (oy, ox), vis
        if vis >= cfg.min_visible * fit:
            break
    if best_vis <= 0:  # pathological shape: centre the window on a random object pixel
        ys, xs = np.nonzero(mask)
        k = rng.integers(len(ys))
        best = (min(max(int((ys[k] + 0.5) * sy) - c // 2, min(0, sh - c)), max(0, sh - c)),
                min(max(int((xs[k] + 0.5) * sx) - c // 2, min(0, sw - c)), max(0, sw - c)))
    oy, ox = cast(Tuple[int, int], best)      # set above: by the search, or the fallback

    m8 = mask.astype(np.uint8) * 255
    if s < 1.0:
        img_s = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        m_s = cv2.resize(m8, (sw, sh), interpolation=cv2.INTER_AREA)
        img_c, m_c = _crop_pad(img_s, oy, ox, c), _crop_pad(m_s, oy, ox, c)
    else:
        # dst = s * (src + 0.5) - 0.5 - origin  (half-pixel centres, as cv2.resize)
        M = np.array([[sx, 0, 0.5 * sx - 0.5 - ox], [0, sy, 0.5 * sy - 0.5 - oy]], np.float64)
        img_c = cv2.warpAffine(image, M, (c, c), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        m_c = cv2.warpAffine(m8, M, (c, c), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    valid: np.ndarray = np.zeros((c, c), bool)
    valid[max(0, -oy):max(0, min(c, sh - oy)), max(0, -ox):max(0, min(c, sw - ox))] = True
    mask_c = (m_c > 127) & valid
    img_c[~valid] = 0
    if not mask_c.any():
        return None
    flipped = bool(rng.random() < cfg.flip_prob)
    if flipped:
        img_c, mask_c, valid = img_c[:, ::-1], mask_c[:, ::-1], valid[:, ::-1]
    if cfg.jitter_prob > 0 and rng.random() < cfg.jitter_prob:
        img_c = color_jitter(img_c, rng, cfg, valid)
        img_c[~valid] = 0
    return Augmented(np.ascontiguousarray(img_c), np.ascontiguousarray(mask_c),
                     np.ascontiguousarray(valid), float(s), (oy, ox), flipped)


def eval_config(cfg: AugmentConfig) -> AugmentConfig:
    """The deterministic counterpart of ``cfg`` (same crop size and base)."""
    return replace(cfg, scale_range=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                   base="image" if cfg.base == "mixed" else cfg.base)
