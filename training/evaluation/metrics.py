"""IoU and the per-data-set metrics of the protocol: NoC@85/90, NoF@90, mIoU@k, SPC."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from .protocol import CURVE_CLICKS, NOF_TARGET, TARGETS


def iou(gt: np.ndarray, pred: np.ndarray, ignore: Optional[np.ndarray] = None) -> float:
    """|pred & gt| / |pred | gt| over the non-ignored pixels (1.0 when both are empty)."""
    inter = gt & pred
    union = gt | pred
    if ignore is not None:
        inter = inter & ~ignore
        union = union & ~ignore
    u = int(union.sum())
    return 1.0 if u == 0 else int(inter.sum()) / u


def noc(ious: Sequence[float], target: float, budget: int = CURVE_CLICKS) -> int:
    """Clicks needed to first reach `target` (1-based); `budget` if never reached within it."""
    for k, v in enumerate(ious[:budget], start=1):
        if v >= target:
            return k
    return budget


def failed(ious: Sequence[float], target: float, budget: int = CURVE_CLICKS) -> bool:
    return not any(v >= target for v in ious[:budget])


def miou_curve(all_ious: Sequence[Sequence[float]], clicks: int = CURVE_CLICKS) -> list:
    """mIoU after exactly k clicks, k = 1..clicks (every instance must have >= clicks values)."""
    if not all_ious:
        return []
    arr = np.array([list(x[:clicks]) for x in all_ious], dtype=np.float64)
    if arr.shape[1] < clicks:
        raise ValueError(f"an instance has fewer than {clicks} IoU values")
    return [float(v) for v in arr.mean(axis=0)]


def pct(t: float) -> str:
    return f"{int(round(t * 100))}"


def summarize(all_ious: Sequence[Sequence[float]], total_seconds: float, total_clicks: int,
              max_clicks: int = CURVE_CLICKS) -> Dict[str, object]:
    """All protocol metrics of one data set from the per-instance IoU sequences."""
    n = len(all_ious)
    out: Dict[str, object] = {"instances": n}
    for t in TARGETS:
        out[f"noc{pct(t)}"] = float(np.mean([noc(x, t) for x in all_ious])) if n else float("nan")
    for t in TARGETS:
        out[f"nof{pct(t)}"] = int(sum(failed(x, t) for x in all_ious))
    if max_clicks > CURVE_CLICKS:
        for t in TARGETS:
            out[f"noc{max_clicks}_{pct(t)}"] = (float(np.mean([noc(x, t, max_clicks) for x in all_ious]))
                                                if n else float("nan"))
        out[f"nof{max_clicks}_{pct(NOF_TARGET)}"] = int(sum(failed(x, NOF_TARGET, max_clicks) for x in all_ious))
    # A run stopped at the target (Protocol.curve False) has no mIoU@k curve.
    out["miou"] = miou_curve(all_ious) if all(len(x) >= CURVE_CLICKS for x in all_ious) else []
    out["spc"] = total_seconds / total_clicks if total_clicks else float("nan")
    return out
