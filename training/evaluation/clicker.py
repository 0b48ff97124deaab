"""The robot user of the standard protocol.

Before each click: FN = gt & ~pred, FP = pred & ~gt, both outside the ignore region. Each region is
padded with a one-pixel border of zeros, Euclidean-distance transformed (scipy's exact EDT) and
unpadded; pixels already clicked get distance 0. If max FN distance > max FP distance the click is
positive at the FN maximum, otherwise negative at the FP maximum; ties go to the first pixel in
row-major order (so with nothing left to correct, the click is negative at (0, 0), as in RITM).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from scipy.ndimage import distance_transform_edt

from model.clicks import Click


def region_peak(region: np.ndarray, clicked: Optional[np.ndarray] = None) -> Tuple[float, int, int]:
    """(max distance, row, col) of the padded EDT of `region`, clicked pixels set to 0.

    Equal to computing the EDT on the whole zero-padded image: the transform is taken on the
    region's bounding box grown by one pixel, which is all zeros around the region, and no zero
    outside that box is closer to a region pixel than the box's own zero border. Ties resolve to
    the first pixel in row-major order; an empty region gives (0.0, 0, 0).
    """
    rows = np.flatnonzero(region.any(axis=1))
    if rows.size == 0:
        return 0.0, 0, 0
    cols = np.flatnonzero(region.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(region[r0:r1, c0:c1], 1, mode="constant", constant_values=False)
    dist = distance_transform_edt(crop)[1:-1, 1:-1]
    if clicked is not None:
        dist[clicked[r0:r1, c0:c1]] = 0.0
    flat = int(np.argmax(dist))  # first maximum in row-major order
    peak = float(dist.flat[flat])
    if peak <= 0.0:
        return 0.0, 0, 0
    r, c = divmod(flat, dist.shape[1])
    return peak, int(r0 + r), int(c0 + c)


class RobotClicker:
    def __init__(self, gt: np.ndarray, ignore: Optional[np.ndarray] = None):
        self.gt = np.asarray(gt, dtype=bool)
        self.valid = None if ignore is None else ~np.asarray(ignore, dtype=bool)
        self.clicked = np.zeros(self.gt.shape, dtype=bool)
        self.clicks: List[Click] = []

    def next_click(self, pred: np.ndarray) -> Click:
        pred = np.asarray(pred, dtype=bool)
        fn = self.gt & ~pred
        fp = pred & ~self.gt
        if self.valid is not None:
            fn &= self.valid
            fp &= self.valid
        fn_max, fn_r, fn_c = region_peak(fn, self.clicked)
        fp_max, fp_r, fp_c = region_peak(fp, self.clicked)
        row, col, positive = (fn_r, fn_c, True) if fn_max > fp_max else (fp_r, fp_c, False)
        click = Click(col, row, positive)
        self.clicked[row, col] = True
        self.clicks.append(click)
        return click
