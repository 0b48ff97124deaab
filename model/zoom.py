"""Zoom-in (RITM's): from click `zoom_skip_clicks + 1` on, the coarse pass looks at the box around
the current mask and the positive clicks (each side grown by `zoom_expand`, at least
`zoom_min_side` working pixels) instead of the whole image, so a small object gets more of the
network's pixels. A box prompt frames the object from the start."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from . import focus
from .views import Box, Prompt, View, inside, round32


def view(prev: np.ndarray, clicks: Sequence[Prompt], box: Optional[Box], options) -> Optional[tuple[int, int, int, int]]:
    """The zoom-in window at working resolution (focus.object_view), None for the whole image."""
    points = [(y, x) for y, x, pos in clicks if pos]
    if box is not None:
        y0, x0, y1, x1 = box
        points += [(y0, x0), (y1 - 1, x1 - 1)]
    elif len(clicks) <= options.zoom_skip_clicks:
        return None
    return focus.object_view(prev, points, options.zoom_expand, options.zoom_min_side)


def coarse_pass(predictor, work: np.ndarray, window: tuple[int, int, int, int], clicks: Sequence[Prompt],
                prev: np.ndarray, prev_prob: np.ndarray,
                box_in: Callable[[View], Optional[Box]]) -> tuple[np.ndarray, float]:
    """The coarse pass on the window of the working image `work`: the crop at the coarse size (long
    side), the answer pasted into the previous map (outside the window the previous answer stays).
    `box_in(view)` is the session's box prompt in the view's pixels. Returns the map and the
    view's scale (network pixels per working pixel)."""
    y0, x0, y1, x1 = window
    vh, vw = y1 - y0, x1 - x0
    s = predictor.options.coarse_size / max(vh, vw)
    h, w = round32(vh * s), round32(vw * s)
    crop = cv2.resize(work[y0:y1, x0:x1], (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    to_view = View.of(window, h, w)
    net_clicks = to_view.prompts(c for c in clicks if inside(c[:2], window))
    prev_small = cv2.resize(prev[y0:y1, x0:x1].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    out = predictor.run_net(predictor.encode(predictor.to_tensor(crop)), net_clicks, prev_small, box_in(to_view))
    prob = prev_prob.copy()
    prob[y0:y1, x0:x1] = cv2.resize(out, (vw, vh), interpolation=cv2.INTER_LINEAR)
    return prob, max(h, w) / max(vh, vw)
