"""Constants of the standard interactive-segmentation protocol (../shared/docs/evaluation-protocol.md).

Anything that deviates from the protocol is a named option of `Protocol`, off by default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

CURVE_CLICKS = 20          # every instance is run to 20 clicks (mIoU@k curve, NoC20)
THRESHOLD = 0.49           # prediction = prob > 0.49 (RITM)
TARGETS = (0.85, 0.90)     # NoC@85, NoC@90
NOF_TARGET = 0.90          # NoF@90


@dataclass(frozen=True)
class Protocol:
    """How one evaluation is run. The defaults are the published protocol."""

    max_clicks: int = CURVE_CLICKS  # 100 adds NoC100@85/90 and NoF100@90 (clicks past 20 stop at 0.90)
    threshold: float = THRESHOLD
    # Deviation, off by default: start every instance from the tight box of its ground truth (a box
    # prompt, for box-trained models); box_miou is the IoU of the box alone, NoC counts the clicks after it.
    box: bool = False
    # The protocol's own stop rule without the curve: stop an instance at the click that reaches
    # IoU 0.90 (NoF@90 target) instead of running it to 20 clicks for the mIoU@k curve. NoC@85/90
    # and NoF@90 are exactly those of a full run; mIoU@k is not computed. What a promotion gate
    # needs, at a fraction of the clicks (an instance with NoC@90 = 4 runs 4 clicks, not 20).
    curve: bool = True

    def __post_init__(self) -> None:
        if self.max_clicks < CURVE_CLICKS:
            raise ValueError(f"max_clicks must be >= {CURVE_CLICKS} (the mIoU curve needs {CURVE_CLICKS})")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError("threshold must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)
