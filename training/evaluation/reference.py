"""Reference predictors that validate the evaluation machinery without a trained network.

Both follow the Predictor contract of model/predictor.py (`open(image)` -> session with
`add_click(x, y, positive)` returning an H x W float32 probability map, `undo()`, `reset()`).

- `OraclePredictor`: returns the ground truth (it needs it: `open(image, gt=mask)`); its NoC must
  be exactly 1.00 on every data set, which checks the clicker, IoU and bookkeeping end to end.
- `GrabCutPredictor`: OpenCV GrabCut seeded from the clicks, a classic non-learned baseline.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import cv2
import numpy as np

ClickT = Tuple[int, int, bool]


class _ClickSession:
    """Click bookkeeping shared by the reference sessions; subclasses implement `_predict`."""

    def __init__(self, image: np.ndarray):
        self.image = image
        self.clicks: List[ClickT] = []

    def add_click(self, x: int, y: int, positive: bool) -> np.ndarray:
        h, w = self.image.shape[:2]
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"click ({x}, {y}) outside the {w}x{h} image")
        self.clicks.append((int(x), int(y), bool(positive)))
        return self._predict()

    def undo(self) -> np.ndarray:
        if self.clicks:
            self.clicks.pop()
        return self._predict()

    def reset(self) -> None:
        self.clicks = []

    def _predict(self) -> np.ndarray:
        raise NotImplementedError


class _OracleSession(_ClickSession):
    def __init__(self, image: np.ndarray, gt: np.ndarray):
        super().__init__(image)
        if gt.shape != image.shape[:2]:
            raise ValueError("oracle: gt does not match the image")
        self.prob = gt.astype(np.float32)

    def _predict(self) -> np.ndarray:
        return self.prob.copy() if self.clicks else np.zeros_like(self.prob)


class OraclePredictor:
    version = "oracle"
    device = "cpu"
    needs_gt = True  # the evaluator passes open(image, gt=...)

    def open(self, image: np.ndarray, gt: Optional[np.ndarray] = None) -> _OracleSession:
        if gt is None:
            raise ValueError("the oracle needs the ground truth: open(image, gt=mask)")
        return _OracleSession(np.asarray(image), np.asarray(gt, dtype=bool))


class _GrabCutSession(_ClickSession):
    def __init__(self, image: np.ndarray, p: "GrabCutPredictor"):
        super().__init__(image)
        self.p = p
        h, w = image.shape[:2]
        self.scale = min(1.0, p.work_size / max(h, w))
        size = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if self.scale < 1 else image
        self.small = np.ascontiguousarray(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        diag = float(np.hypot(self.small.shape[0], self.small.shape[1]))
        self.seed_r = max(1, int(round(p.seed_radius * diag)))
        self.prior_r = max(2, int(round(p.prior_radius * diag)))
        self.history: List[Optional[np.ndarray]] = []  # working-resolution result after each click

    def _xy(self, x: int, y: int) -> Tuple[int, int]:
        h, w = self.small.shape[:2]
        return (min(w - 1, int((x + 0.5) * self.scale)), min(h - 1, int((y + 0.5) * self.scale)))

    def undo(self) -> np.ndarray:
        if self.clicks:
            self.clicks.pop()
            self.history.pop()
        return self._full(self.history[-1] if self.history else None)

    def reset(self) -> None:
        super().reset()
        self.history = []

    def _predict(self) -> np.ndarray:
        pos = [self._xy(x, y) for x, y, p in self.clicks if p]
        neg = [self._xy(x, y) for x, y, p in self.clicks if not p]
        prev = self.history[-1] if self.history else None
        if not pos:
            fg = None
        else:
            # Probable foreground: a disk around each positive click (incremental mode: the
            # previous result plus a disk around the latest click if positive); probable
            # background elsewhere; small disks of definite foreground/background under the clicks
            # themselves (hard constraints).
            mask = np.full(self.small.shape[:2], cv2.GC_PR_BGD, np.uint8)
            if self.p.incremental and prev is not None:
                mask[prev] = cv2.GC_PR_FGD
                grow = [self._xy(*self.clicks[-1][:2])] if self.clicks[-1][2] else []
            else:
                grow = pos
            for c in grow:
                cv2.circle(mask, c, self.prior_r, cv2.GC_PR_FGD, -1)
            for c in neg:
                cv2.circle(mask, c, self.seed_r, cv2.GC_BGD, -1)
            for c in pos:
                cv2.circle(mask, c, self.seed_r, cv2.GC_FGD, -1)
            fg = _components_with(self._grabcut(mask), pos)
        self.history.append(fg)
        return self._full(fg)

    def _full(self, fg) -> np.ndarray:
        h, w = self.image.shape[:2]
        if fg is None:
            return np.zeros((h, w), np.float32)
        fg8 = fg.astype(np.uint8) * 255
        if self.scale < 1:
            fg8 = cv2.resize(fg8, (w, h), interpolation=cv2.INTER_LINEAR)
        return fg8.astype(np.float32) / 255.0

    def _grabcut(self, mask: np.ndarray) -> np.ndarray:
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        probable_or_bg = (mask == cv2.GC_BGD) | (mask == cv2.GC_PR_BGD)
        if probable_or_bg.any() and (~probable_or_bg).any():
            try:
                cv2.setRNGSeed(0)
                cv2.grabCut(self.small, mask, None, bgd, fgd, self.p.iterations,  # type: ignore[call-overload]
                            cv2.GC_INIT_WITH_MASK)     # OpenCV's stubs want a rect; with a mask it is None
            except cv2.error:
                pass  # too few samples for a GMM: keep the seeded trimap
        return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def _components_with(fg: np.ndarray, points: List[Tuple[int, int]]) -> np.ndarray:
    """Keep the connected foreground components that contain a positive click."""
    n, labels = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
    if n <= 2:
        return fg
    keep = {int(labels[y, x]) for x, y in points} - {0}
    return np.isin(labels, list(keep))


class GrabCutPredictor:
    """OpenCV GrabCut at a working resolution (long side `work_size`), seeded from the clicks."""

    device = "cpu"

    def __init__(self, work_size: int = 240, iterations: int = 2, seed_radius: float = 0.01,
                 prior_radius: float = 0.12, incremental: bool = True):
        self.work_size, self.iterations = work_size, iterations
        self.seed_radius, self.prior_radius, self.incremental = seed_radius, prior_radius, incremental
        self.version = (f"grabcut-opencv{cv2.__version__}-s{work_size}-i{iterations}-r{prior_radius:g}"
                        + ("-inc" if incremental else ""))

    def open(self, image: np.ndarray) -> _GrabCutSession:
        return _GrabCutSession(np.asarray(image), self)
