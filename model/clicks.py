"""Click encoding shared by the network, the predictor and training.

A batch of clicks is a float tensor (B, M, 3) of (y, x, sign) in the network input's pixel
coordinates (pixel centres at integer positions); sign is +1 positive, -1 negative, 0 padding, so
samples with different click counts share one tensor.

`Click` is one click in image pixel coordinates, the one click type of every layer: the backend's
prompts (backend/payload.py), the predictor's session and the evaluation's robot user
(training/evaluation/clicker.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Click(NamedTuple):
    """A click at column `x`, row `y` (pixel centres at integers; the robot user's are whole
    pixels, the backend's may be sub-pixel), positive (on the object) or negative."""
    x: float
    y: float
    positive: bool

    def as_tuple(self) -> tuple[float, float, bool]:
        return (self.x, self.y, self.positive)


def disk_maps(clicks: torch.Tensor, height: int, width: int, radius: float) -> torch.Tensor:
    """(B, M, 3) clicks -> (B, 2, H, W) binary disk maps: channel 0 positive, 1 negative."""
    b, m, _ = clicks.shape
    dev = clicks.device
    yy = torch.arange(height, device=dev, dtype=torch.float32).view(1, height, 1)
    xx = torch.arange(width, device=dev, dtype=torch.float32).view(1, 1, width)
    out = torch.zeros(b, 2, height, width, device=dev, dtype=torch.float32)
    r2 = float(radius) ** 2
    if b == 1:
        # One image (the predictor's case): each disk is painted in its own bounding window, the same
        # test on the same pixels, instead of a pass over the whole map per click.
        for y, x, sign in clicks[0].tolist():
            if sign == 0:
                continue
            y0, y1 = max(0, math.floor(y - radius)), min(height, math.ceil(y + radius) + 1)
            x0, x1 = max(0, math.floor(x - radius)), min(width, math.ceil(x + radius) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            cy, cx = torch.tensor(y, device=dev), torch.tensor(x, device=dev)     # float32, as below
            disk = ((yy[:, y0:y1] - cy) ** 2 + (xx[:, :, x0:x1] - cx) ** 2) <= r2
            window = out[0, 0 if sign > 0 else 1, y0:y1, x0:x1]
            window.copy_(torch.maximum(window, disk[0].float()))
        return out
    # A loop over the (few) clicks keeps memory at B x H x W instead of B x M x H x W.
    for j in range(m):
        cy = clicks[:, j, 0].view(b, 1, 1).float()
        cx = clicks[:, j, 1].view(b, 1, 1).float()
        sign = clicks[:, j, 2].view(b, 1, 1)
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r2
        out[:, 0] = torch.maximum(out[:, 0], (disk & (sign > 0)).float())
        out[:, 1] = torch.maximum(out[:, 1], (disk & (sign < 0)).float())
    return out


def proximity_maps(clicks: torch.Tensor, input_hw: tuple[int, int], out_hw: tuple[int, int],
                   falloff: float = 0.15) -> torch.Tensor:
    """(B, M, 3) clicks -> (B, 2, h, w) maps of exp(-d / (falloff * long side)), d the distance from
    each output cell centre to the nearest positive (channel 0) / negative (channel 1) click in input
    pixels; 0 where there is no click of that sign. A smooth "how near a click" signal for the decoder,
    whose own receptive field is a few cells."""
    height, width = input_hw
    h, w = out_hw
    b, m, _ = clicks.shape
    dev = clicks.device
    yy = ((torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * height / h - 0.5).view(1, h, 1)
    xx = ((torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * width / w - 0.5).view(1, 1, w)
    scale = 1.0 / (falloff * max(height, width))
    out = torch.zeros(b, 2, h, w, device=dev, dtype=torch.float32)
    for j in range(m):
        cy = clicks[:, j, 0].view(b, 1, 1).float()
        cx = clicks[:, j, 1].view(b, 1, 1).float()
        sign = clicks[:, j, 2].view(b, 1, 1)
        near = torch.exp(-torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) * scale)
        out[:, 0] = torch.maximum(out[:, 0], near * (sign > 0))
        out[:, 1] = torch.maximum(out[:, 1], near * (sign < 0))
    return out


def sample_at_clicks(feature: torch.Tensor, clicks: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinearly sample (B, C, h, w) features at click positions given in input pixels -> (B, M, C)."""
    height, width = input_hw
    y = (clicks[..., 0] + 0.5) / height * 2 - 1
    x = (clicks[..., 1] + 0.5) / width * 2 - 1
    grid = torch.stack([x, y], dim=-1).unsqueeze(1).to(feature.dtype)  # (B, 1, M, 2)
    s = torch.nn.functional.grid_sample(feature, grid, mode="bilinear", align_corners=False)
    return s.squeeze(2).transpose(1, 2)  # (B, M, C)


def box_maps(boxes: torch.Tensor | None, batch: int, height: int, width: int,
             device=None) -> torch.Tensor:
    """(B, 4) boxes (y0, x0, y1, x1) in input pixels, end exclusive -> (B, 1, H, W) map, 1 inside.
    A row with y1 <= y0 or x1 <= x0 (e.g. all -1) is "no box" and gives zeros; None: no boxes."""
    out = torch.zeros(batch, 1, height, width, device=device, dtype=torch.float32)
    if boxes is None:
        return out
    yy = torch.arange(height, device=out.device, dtype=torch.float32).view(1, height, 1) + 0.5
    xx = torch.arange(width, device=out.device, dtype=torch.float32).view(1, 1, width) + 0.5
    b = boxes.to(out.device, torch.float32).view(-1, 4, 1, 1)
    inside = (yy >= b[:, 0]) & (yy < b[:, 2]) & (xx >= b[:, 1]) & (xx < b[:, 3])
    out[:, 0] = inside.float().expand(batch, -1, -1) if b.shape[0] == 1 else inside.float()
    return out
