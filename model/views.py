"""Coordinates between the images a session works with: the full image, the working image (long
side <= max_work_side), and the views the network sees (the coarse view, a zoom-in crop, a focus
crop, each resized to the network's input).

One convention inside model/: a point is (y, x), rows first, as numpy indexes arrays and as the
network's click tensor reads it ((y, x, sign)); a box is (y0, x0, y1, x1) with the end exclusive.
The public API (Session.add_click(x, y), set_box(x0, y0, x1, y1)) takes (x, y) as images and
Label Studio give them, and the session converts at that door only.

Pixel centres map to pixel centres: a point p of a frame whose window starts at o, resized by s
(new pixels per old pixel), is at (p - o + 0.5) * s - 0.5 in the view. A box's edges are not pixel
centres: they map as (b - o) * s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

Point = tuple[float, float]                    # (y, x)
Prompt = tuple[float, float, bool]             # (y, x, positive)
Box = tuple[float, float, float, float]        # (y0, x0, y1, x1), end exclusive


@dataclass(frozen=True)
class View:
    """A window of an image starting at (y0, x0), resized by (sy, sx)."""
    y0: float = 0.0
    x0: float = 0.0
    sy: float = 1.0
    sx: float = 1.0

    @classmethod
    def of(cls, window: Box, height: float, width: float) -> "View":
        """The window (y0, x0, y1, x1) resized to height x width."""
        y0, x0, y1, x1 = window
        return cls(y0, x0, height / (y1 - y0), width / (x1 - x0))

    @classmethod
    def scaled(cls, s: float) -> "View":
        """The whole image resized by s (full -> working resolution: s = scale; back: 1 / scale)."""
        return cls(0.0, 0.0, s, s)

    def point(self, y: float, x: float) -> Point:
        return (y - self.y0 + 0.5) * self.sy - 0.5, (x - self.x0 + 0.5) * self.sx - 0.5

    def prompts(self, clicks: Iterable[Prompt]) -> list[Prompt]:
        return [(*self.point(y, x), pos) for y, x, pos in clicks]

    def box(self, box: Box) -> Box:
        y0, x0, y1, x1 = box
        return ((y0 - self.y0) * self.sy, (x0 - self.x0) * self.sx, (y1 - self.y0) * self.sy, (x1 - self.x0) * self.sx)


def inside(point: Point, window: Box) -> bool:
    """Whether a point's pixel centre falls in the window's pixels."""
    y, x = point
    y0, x0, y1, x1 = window
    return y0 - 0.5 <= y < y1 - 0.5 and x0 - 0.5 <= x < x1 - 0.5


def round32(v: float) -> int:
    """A side in the network's pixels: a multiple of 32 (the backbone's stride), at least 32."""
    return max(32, int(round(v / 32)) * 32)
