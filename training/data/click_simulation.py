"""Click simulation for training: initial clicks from the gt, robot-user clicks on errors, focus view.

Click convention (everywhere in ``training.data``)
--------------------------------------------------
A batch of click sequences is an array ``clicks`` of shape ``(B, M, 3)``, dtype float32 (numpy or
torch), each row ``(y, x, sign)``:

- ``y``, ``x``: integer-valued pixel indices (row, column) in the tensor the clicks belong to (the
  384 x 384 training crop, or the focus-view crop after :func:`remap_clicks`); pixel ``(y, x)``
  covers the continuous square ``[y, y+1) x [x, x+1)``, its centre is ``(y + 0.5, x + 0.5)``;
- ``sign``: ``+1`` positive (object), ``-1`` negative (background), ``0`` padding / no click;
  padding rows are ``(-1, -1, 0)``.

Rows are in chronological order; a padding row may sit between real clicks (a sample that was
already perfect when the others got a new click gets ``(-1, -1, 0)`` for that round). The last
click of a sample is its last row with ``sign != 0`` (:func:`last_clicks`).

Boxes (focus view) are ``(B, 4)`` float32 ``(y0, x0, y1, x1)`` in continuous pixel-edge coordinates
with integer values: the crop covers rows ``y0 .. y1-1`` and columns ``x0 .. x1-1``.

Robot-user rule (:func:`next_clicks`, identical to the evaluation protocol): FN = gt & ~pred and
FP = pred & ~gt (outside ``valid``, nothing counts); each is padded with a 1-pixel border of zeros,
Euclidean-distance-transformed and unpadded; already clicked pixels get distance 0; if max FN
distance > max FP distance the click is positive at the FN maximum, else negative at the FP maximum
(ties: first pixel in row-major order); no click when both maxima are 0. ``inner_ratio < 1``
(training only) instead picks uniformly among the pixels of the chosen region whose distance is at
least ``inner_ratio`` times the maximum, as RITM's training sampler does.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

PAD_CLICK = (-1.0, -1.0, 0.0)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _like(a: np.ndarray, ref: Any) -> Any:
    if isinstance(ref, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(a)).to(ref.device)
    return a


def _squeeze_channel(a: np.ndarray) -> np.ndarray:
    return a[:, 0] if a.ndim == 4 else a


def _as_bool(a: Any) -> np.ndarray:
    """(B, [1,] H, W) bool/0-1 array or tensor -> (B, H, W) bool numpy."""
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu" and a.dtype != torch.bool:
            a = a > 0.5  # threshold on the device, transfer 1 byte per pixel
        a = a.detach().cpu().numpy()
    a = _squeeze_channel(np.asarray(a))
    return a if a.dtype == np.bool_ else a > 0.5


_POOLS: Dict[Tuple[int, int], Any] = {}


def _pool(n: int):
    """A thread pool per size, re-created in a forked child (whose copy has no threads)."""
    key = (os.getpid(), n)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="clicks")
    return _POOLS[key]


def padded_edt(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel of ``region`` (H x W bool) to the nearest pixel outside it,
    the region being padded with a 1-pixel border of zeros (so the image border counts as outside).
    Exact (cv2 DIST_MASK_PRECISE), float32; 0 outside the region."""
    r = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(r, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def empty_clicks(batch: int, num: int, like: Any = None) -> Any:
    out = np.tile(np.array(PAD_CLICK, np.float32), (batch, num, 1))
    return _like(out, like)


def num_clicks(clicks: Any) -> Any:
    """Number of real clicks per sample, shape (B,)."""
    return (clicks[..., 2] != 0).sum(-1)


def last_clicks(clicks: Any) -> Any:
    """The last real click of each sample, (B, 3); ``(-1, -1, 0)`` for a sample without clicks."""
    c = _np(clicks)
    out = np.tile(np.array(PAD_CLICK, np.float32), (c.shape[0], 1))
    real = c[..., 2] != 0
    for b in range(c.shape[0]):
        idx = np.nonzero(real[b])[0]
        if idx.size:
            out[b] = c[b, idx[-1]]
    return _like(out, clicks)


def random_clicks(clicks: Any, rng: np.random.Generator) -> Any:
    """One uniformly chosen real click per sample, (B, 3); ``(-1, -1, 0)`` if the sample has none."""
    c = _np(clicks)
    out = np.tile(np.array(PAD_CLICK, np.float32), (c.shape[0], 1))
    for b in range(c.shape[0]):
        idx = np.nonzero(c[b, :, 2] != 0)[0]
        if idx.size:
            out[b] = c[b, idx[rng.integers(idx.size)]]
    return _like(out, clicks)


# --------------------------------------------------------------------------------------------------
# initial clicks from the gt (simplified RITM MultiPointSampler)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InitialClickConfig:
    max_clicks: int = 6            # cap on the total (the output is padded to this length)
    center_power: float = 2.0      # first positive: P(pixel) ~ EDT(pixel) ** center_power
    p_extra_pos: float = 0.4       # probability of 1..max_extra_pos more positive clicks
    max_extra_pos: int = 3
    extra_power: float = 1.0       # extra positives: P ~ EDT ** extra_power
    p_neg: float = 0.4             # probability of 1..max_neg negative clicks
    max_neg: int = 3
    neg_band_min: float = 4.0      # negatives at distance [min, max] px from the object, where
    neg_band_frac: float = 0.3     # max = max(neg_band_floor, neg_band_frac * sqrt(object area))
    neg_band_floor: float = 20.0
    min_spacing: float = 5.0       # minimum distance between two clicks of one sample (px)


def _pick_spaced(weights: np.ndarray, n: int, taken: list, rng: np.random.Generator,
                 spacing: float, offset: Tuple[int, int] = (0, 0), tries: int = 20) -> list:
    """Up to ``n`` pixels drawn with probability ~ ``weights`` (a window whose top-left is ``offset``
    in image coordinates), each at least ``spacing`` px from ``taken`` and from each other."""
    W = weights.shape[1]
    cum = np.cumsum(weights.ravel(), dtype=np.float64)
    if cum.size == 0 or cum[-1] <= 0:
        return []
    picked: list = []
    for _ in range(n):
        for _ in range(tries):
            k = int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), cum.size - 1))
            y, x = divmod(k, W)
            y, x = y + offset[0], x + offset[1]
            if all((y - ty) ** 2 + (x - tx) ** 2 >= spacing ** 2 for ty, tx in taken + picked):
                picked.append((y, x))
                break
    return picked


def sample_initial_clicks(mask: np.ndarray, rng: np.random.Generator, valid: Optional[np.ndarray] = None,
                          cfg: InitialClickConfig = InitialClickConfig()) -> np.ndarray:
    """Initial clicks for one gt mask (H x W bool): ``(cfg.max_clicks, 3)`` float32, padded.

    One positive click at a random interior pixel drawn with probability ~ EDT**center_power
    (biased to the centre, never on the boundary); with probability ``p_extra_pos`` 1..max_extra_pos
    more positives (~ EDT**extra_power), with probability ``p_neg`` 1..max_neg negatives drawn
    uniformly in the background band at distance ``[neg_band_min, band_max]`` px from the object
    (inside ``valid``). Clicks of one sample are ``min_spacing`` px apart. The first row is always the
    centre-biased positive; the total is capped at ``max_clicks``. All work is done in windows around
    the object (about 1-2 ms at 384 x 384).
    """
    mask = np.asarray(mask, bool)
    if valid is not None:
        mask = mask & valid
    out = np.tile(np.array(PAD_CLICK, np.float32), (cfg.max_clicks, 1))
    bb = _bbox(mask)
    if bb is None or cfg.max_clicks < 1:
        return out
    y0, y1, x0, x1 = bb
    # padded EDT on the object's bounding box equals the whole-image padded EDT there (see _region_max)
    dt = padded_edt(mask[y0:y1, x0:x1]).astype(np.float64)
    pos = _pick_spaced(dt ** cfg.center_power, 1, [], rng, 0.0, (y0, x0))
    neg: list = []
    budget = cfg.max_clicks - 1
    if budget > 0 and cfg.max_extra_pos > 0 and rng.random() < cfg.p_extra_pos:
        n = min(int(rng.integers(1, cfg.max_extra_pos + 1)), budget)
        pos += _pick_spaced(dt ** cfg.extra_power, n, pos, rng, cfg.min_spacing, (y0, x0))
        budget = cfg.max_clicks - len(pos)
    if budget > 0 and cfg.max_neg > 0 and rng.random() < cfg.p_neg:
        n = min(int(rng.integers(1, cfg.max_neg + 1)), budget)
        band_max = max(cfg.neg_band_floor, cfg.neg_band_frac * float(np.sqrt(mask.sum())))
        # every pixel within band_max of the object lies in the bbox grown by band_max, and its
        # nearest object pixel lies in the bbox: the distance computed in that window is exact
        r = int(np.ceil(band_max))
        H, W = mask.shape
        wy0, wy1, wx0, wx1 = max(0, y0 - r), min(H, y1 + r), max(0, x0 - r), min(W, x1 + r)
        win = mask[wy0:wy1, wx0:wx1]
        bg_dist = cv2.distanceTransform((~win).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        band = (bg_dist >= cfg.neg_band_min) & (bg_dist <= band_max)
        if valid is not None:
            band &= valid[wy0:wy1, wx0:wx1]
        neg = _pick_spaced(band.astype(np.float64), n, pos, rng, cfg.min_spacing, (wy0, wx0))
    rows = [(y, x, 1.0) for y, x in pos] + [(y, x, -1.0) for y, x in neg]
    out[:len(rows)] = np.array(rows, np.float32)
    return out


# --------------------------------------------------------------------------------------------------
# robot-user clicks on the errors
# --------------------------------------------------------------------------------------------------

def _bbox(region: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    rows = np.flatnonzero(region.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(region[rows[0]:rows[-1] + 1].any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _region_max(region: np.ndarray, clicked: Optional[Tuple[np.ndarray, np.ndarray]],
                rng: Optional[np.random.Generator], inner_ratio: float) -> Tuple[float, int, int]:
    """(max padded-EDT distance, y, x of the chosen pixel) of one error region; (0, -1, -1) if empty.

    The EDT is computed on the region's bounding box padded with one zero pixel, which gives the same
    distances as the whole padded image: for a pixel inside the box, clamping any outside zero pixel
    onto the padded box's border gives a zero pixel at least as close."""
    bb = _bbox(region)
    if bb is None:
        return 0.0, -1, -1
    y0, y1, x0, x1 = bb
    dt = padded_edt(region[y0:y1, x0:x1])
    if clicked is not None:
        ys, xs = clicked
        ok = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
        dt[ys[ok] - y0, xs[ok] - x0] = 0
    k = int(np.argmax(dt))  # first maximum in row-major order (crop order = image order)
    m = float(dt.flat[k])
    if m > 0 and rng is not None and inner_ratio < 1.0:
        cand = np.flatnonzero(dt >= inner_ratio * m)
        k = int(cand[rng.integers(cand.size)])
    y, x = divmod(k, x1 - x0)
    return m, y + y0, x + x0


def next_clicks(gt: Any, pred: Any, clicks: Any = None, valid: Any = None,
                rng: Optional[np.random.Generator] = None, inner_ratio: float = 1.0,
                num_threads: int = 1) -> Any:
    """One new click per sample from its errors: ``(B, 3)`` float32 (torch if ``gt`` is torch).

    ``gt``, ``pred``: (B, H, W) or (B, 1, H, W) bool (or 0/1) arrays/tensors on any device;
    ``clicks``: (B, M, 3) existing clicks (their pixels get distance 0), optional; ``valid``: pixels
    that count (e.g. not padding), optional. A sample with no error gets ``(-1, -1, 0)``. The rule is
    the evaluation protocol's robot user (module docstring); with ``inner_ratio < 1`` and an ``rng``
    the click is drawn uniformly among pixels with distance >= inner_ratio * max (training noise).
    ``num_threads > 1`` spreads the samples over a thread pool (same result).
    Cost: one distance transform per sample, about 1 ms at 384 x 384 on one CPU core.
    """
    g = _as_bool(gt)
    p = _as_bool(pred)
    v = None if valid is None else _as_bool(valid)
    c = None if clicks is None else _np(clicks)
    B = g.shape[0]
    out = np.tile(np.array(PAD_CLICK, np.float32), (B, 1))

    def one(b: int) -> None:
        fn, fp = g[b] & ~p[b], p[b] & ~g[b]
        if v is not None:
            fn &= v[b]
            fp &= v[b]
        clicked = None
        if c is not None:
            real = c[b][c[b, :, 2] != 0]
            if real.size:
                clicked = (real[:, 0].astype(np.int64), real[:, 1].astype(np.int64))
        # the random pick (if any) is made only in the region that wins
        fn_max, fny, fnx = _region_max(fn, clicked, None, 1.0)
        fp_max, fpy, fpx = _region_max(fp, clicked, None, 1.0)
        if max(fn_max, fp_max) <= 0:
            return
        positive = fn_max > fp_max
        if rng is not None and inner_ratio < 1.0:
            _, y, x = _region_max(fn if positive else fp, clicked, rngs[b], inner_ratio)
        else:
            y, x = (fny, fnx) if positive else (fpy, fpx)
        out[b] = (y, x, 1.0 if positive else -1.0)

    # one child generator per sample: the result does not depend on num_threads
    rngs = rng.spawn(B) if (rng is not None and inner_ratio < 1.0) else [None] * B
    if num_threads > 1 and B > 1:
        list(_pool(num_threads).map(one, range(B)))  # cv2 releases the GIL
    else:
        for b in range(B):
            one(b)
    return _like(out, gt if clicks is None else clicks)


def add_next_clicks(clicks: Any, gt: Any, pred: Any, valid: Any = None,
                    rng: Optional[np.random.Generator] = None, inner_ratio: float = 1.0,
                    num_threads: int = 1) -> Any:
    """``clicks`` (B, M, 3) with the :func:`next_clicks` row appended: (B, M + 1, 3)."""
    new = next_clicks(gt, pred, clicks, valid, rng, inner_ratio, num_threads)
    if isinstance(clicks, torch.Tensor):
        return torch.cat([clicks, new.to(clicks.dtype)[:, None]], dim=1)
    return np.concatenate([np.asarray(clicks, np.float32), new[:, None]], axis=1)


# --------------------------------------------------------------------------------------------------
# focus view
# --------------------------------------------------------------------------------------------------

def sample_focus_boxes(points: Any, height: int, width: int, rng: np.random.Generator,
                       size_range: Tuple[float, float] = (0.2, 0.6), jitter: float = 0.2,
                       valid: Any = None, min_side: int = 16) -> np.ndarray:
    """Square crop boxes around clicks for the training's focus view: (B, 4) float32 (y0, x0, y1, x1).

    ``points``: (B, 2) or (B, 3) clicks (e.g. :func:`last_clicks` or :func:`random_clicks`). The
    side is ``U(size_range) * min(h, w)`` of the image (or of the ``valid`` region's bounding box
    when ``valid`` (B, [1,] H, W) is given, so the box does not sit in zero padding), at least
    ``min_side``; the box is centred on the click shifted by up to ``jitter * side`` and then moved
    (not shrunk) to lie inside the image/valid box, which keeps the click inside it. A sample whose
    click is padding gets a box centred on its image/valid box.
    """
    pts = _np(points).astype(np.float64)
    v = None if valid is None else _squeeze_channel(_np(valid)).astype(bool)
    B = pts.shape[0]
    boxes = np.zeros((B, 4), np.float32)
    for b in range(B):
        if v is not None and v[b].any():
            rows, cols = np.nonzero(v[b].any(1))[0], np.nonzero(v[b].any(0))[0]
            ty0, ty1, tx0, tx1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        else:
            ty0, ty1, tx0, tx1 = 0, height, 0, width
        lim = min(ty1 - ty0, tx1 - tx0)
        side = int(round(rng.uniform(*size_range) * lim))
        side = min(max(side, min(min_side, lim)), lim)
        has_click = pts.shape[1] < 3 or pts[b, 2] != 0
        if has_click:
            cy, cx = pts[b, 0] + 0.5, pts[b, 1] + 0.5
            cy += rng.uniform(-jitter, jitter) * side
            cx += rng.uniform(-jitter, jitter) * side
        else:
            cy, cx = (ty0 + ty1) / 2, (tx0 + tx1) / 2
        y0 = int(np.clip(np.floor(cy - side / 2), ty0, ty1 - side))
        x0 = int(np.clip(np.floor(cx - side / 2), tx0, tx1 - side))
        if has_click:  # rounding must not push the click out
            y0 = int(np.clip(y0, pts[b, 0] - side + 1, pts[b, 0]))
            x0 = int(np.clip(x0, pts[b, 1] - side + 1, pts[b, 1]))
        boxes[b] = (y0, x0, y0 + side, x0 + side)
    return boxes


def crop_resize(x: torch.Tensor, boxes: Any, out_size: int = 384, mode: str = "bilinear",
                padding_mode: str = "border") -> torch.Tensor:
    """Crop ``boxes`` (B, 4) (y0, x0, y1, x1) out of ``x`` (B, C, H, W) and resize each to
    ``out_size`` x ``out_size`` in one batched ``grid_sample`` (align_corners=False: box edges map to
    output edges). ``padding_mode="border"`` (default) keeps the half-pixel fringe at an image edge
    from blending with zeros when upscaling; use "zeros" to read parts of a box outside the image
    as 0. Works on any device and float dtype."""
    B, C, H, W = x.shape
    bnp = _np(boxes).astype(np.float64)
    bx = torch.as_tensor(bnp, dtype=torch.float32, device=x.device)
    y0, x0, y1, x1 = bx.unbind(1)
    theta = torch.zeros(B, 2, 3, dtype=torch.float32, device=x.device)
    theta[:, 0, 0] = (x1 - x0) / W
    theta[:, 0, 2] = (x0 + x1) / W - 1
    theta[:, 1, 1] = (y1 - y0) / H
    theta[:, 1, 2] = (y0 + y1) / H - 1
    grid = F.affine_grid(theta, [B, 1, out_size, out_size], align_corners=False)
    xs = x if x.is_floating_point() else x.float()
    return F.grid_sample(xs, grid.to(xs.dtype), mode=mode, padding_mode=padding_mode, align_corners=False)


def remap_clicks(clicks: Any, boxes: Any, out_size: int = 384) -> Any:
    """Clicks (B, M, 3) into the coordinates of their sample's box resized to ``out_size``; clicks
    whose pixel is outside the box become padding ``(-1, -1, 0)``. Same type as ``clicks``."""
    c = _np(clicks).astype(np.float32).copy()
    bx = _np(boxes).astype(np.float64)
    y0, x0, y1, x1 = (bx[:, i][:, None] for i in range(4))
    y, x = c[..., 0].astype(np.float64), c[..., 1].astype(np.float64)
    inside = (c[..., 2] != 0) & (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
    ny = np.clip(np.floor((y + 0.5 - y0) * out_size / (y1 - y0)), 0, out_size - 1)
    nx = np.clip(np.floor((x + 0.5 - x0) * out_size / (x1 - x0)), 0, out_size - 1)
    c[..., 0] = np.where(inside, ny, -1)
    c[..., 1] = np.where(inside, nx, -1)
    c[..., 2] = np.where(inside, c[..., 2], 0)
    return _like(c, clicks)


def focus_view(boxes: Any, image: torch.Tensor, mask: torch.Tensor, prev: Optional[torch.Tensor] = None,
               clicks: Any = None, valid: Optional[torch.Tensor] = None, out_size: int = 384,
               binarize_prev: bool = True) -> Dict[str, Any]:
    """The training's second view: every tensor cropped to ``boxes`` and resized to ``out_size``.

    ``image`` (B, 3, H, W) float bilinear; ``mask`` / ``valid`` (B, 1, H, W) bilinear then > 0.5;
    ``prev`` (B, 1, H, W) bilinear, then > 0.5 unless ``binarize_prev`` is False; ``clicks`` via
    :func:`remap_clicks`. Returns a dict with the same keys (absent inputs are absent) plus ``boxes``.
    """
    # one batched grid_sample over all channels (image, mask, prev, valid) instead of one per tensor
    dtype = image.dtype if image.is_floating_point() else torch.float32
    parts = [("image", image.to(dtype)), ("mask", mask.to(dtype))]
    if prev is not None:
        parts.append(("prev", prev.to(dtype)))
    if valid is not None:
        parts.append(("valid", valid.to(dtype)))
    crop = crop_resize(torch.cat([t for _, t in parts], dim=1), boxes, out_size)
    out: Dict[str, Any] = {"boxes": boxes}
    c0 = 0
    for name, t in parts:
        piece = crop[:, c0:c0 + t.shape[1]]
        c0 += t.shape[1]
        if name == "image" or (name == "prev" and not binarize_prev):
            out[name] = piece
        else:
            out[name] = (piece > 0.5).to(dtype)
    if clicks is not None:
        out["clicks"] = remap_clicks(clicks, boxes, out_size)
    return out


# --------------------------------------------------------------------------------------------------
# box prompts
# --------------------------------------------------------------------------------------------------

NO_BOX = (-1.0, -1.0, -1.0, -1.0)


def sample_boxes(gt: Any, rng: np.random.Generator, noise: float = 0.1, valid: Any = None) -> np.ndarray:
    """A user's box around each object: the ground truth's bounding box with every edge moved by
    N(0, noise * side) (at most 2 * noise * side), clipped to the image: (B, 4) float32 (y0, x0,
    y1, x1), end exclusive. An empty mask gets NO_BOX."""
    g = _squeeze_channel(_as_bool(gt))
    if valid is not None:
        g = g & _squeeze_channel(_as_bool(valid))
    B, H, W = g.shape
    out = np.tile(np.array(NO_BOX, np.float32), (B, 1))
    for b in range(B):
        box = _bbox(g[b])
        if box is None:
            continue
        y0, y1, x0, x1 = box
        h, w = y1 - y0, x1 - x0
        d = np.clip(rng.normal(0.0, noise, 4), -2 * noise, 2 * noise) * np.array([h, w, h, w])
        ny0, nx0 = np.clip(y0 + d[0], 0, H - 1), np.clip(x0 + d[1], 0, W - 1)
        ny1, nx1 = np.clip(y1 + d[2], ny0 + 1, H), np.clip(x1 + d[3], nx0 + 1, W)
        out[b] = (ny0, nx0, ny1, nx1)
    return out


def remap_boxes(boxes: Any, crops: Any, out_size: int) -> np.ndarray:
    """Boxes (B, 4) into the coordinates of their sample's crop (B, 4) resized to ``out_size``,
    clipped to the crop; a box that misses its crop, or NO_BOX, becomes NO_BOX."""
    bx = _np(boxes).astype(np.float64)
    cr = _np(crops).astype(np.float64)
    sy = out_size / (cr[:, 2] - cr[:, 0])
    sx = out_size / (cr[:, 3] - cr[:, 1])
    y0 = np.clip((bx[:, 0] - cr[:, 0]) * sy, 0, out_size)
    x0 = np.clip((bx[:, 1] - cr[:, 1]) * sx, 0, out_size)
    y1 = np.clip((bx[:, 2] - cr[:, 0]) * sy, 0, out_size)
    x1 = np.clip((bx[:, 3] - cr[:, 1]) * sx, 0, out_size)
    out = np.stack([y0, x0, y1, x1], 1).astype(np.float32)
    gone = (bx[:, 2] <= bx[:, 0]) | (y1 <= y0) | (x1 <= x0)
    out[gone] = NO_BOX
    return out
