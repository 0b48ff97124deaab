"""PNG figures for people: mIoU-vs-clicks curves of several versions, and NoC@90 across versions."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .history import select_runs  # noqa: E402
from .protocol import CURVE_CLICKS  # noqa: E402

# version label -> dataset -> metrics dict (needs "miou", "noc90", "instances")
Series = Dict[str, Dict[str, dict]]
DATASET_ORDER = ["GrabCut", "Berkeley", "SBD", "DAVIS", "COCO-MVal", "PascalVOC"]


def _datasets(series: Series, only: Optional[Sequence[str]]) -> List[str]:
    present = {d for per in series.values() for d in per}
    if only:
        present &= {d for d in present if d.lower() in {o.lower() for o in only}}
    return sorted(present, key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else 99, d))


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def plot_miou_curves(series: Series, out: Path, datasets: Optional[Sequence[str]] = None) -> Path:
    names = _datasets(series, datasets)
    if not names:
        raise ValueError("nothing to plot")
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, (3.9 + 0.28 * len(series)) * rows + 0.6),
                             squeeze=False)
    colors = _colors(len(series))
    for ax, ds in zip(axes.flat, names):
        lows = []
        for (label, per), color in zip(series.items(), colors):
            m = per.get(ds)
            if not m or not m.get("miou"):
                continue
            y = m["miou"][:CURVE_CLICKS]
            lows.append(min(y))
            ax.plot(range(1, len(y) + 1), y, marker="o", markersize=3.5, linewidth=2, color=color,
                    label=f"{label}  (NoC@90 {m['noc90']:.2f})")
        for t in (0.85, 0.90):
            ax.axhline(t, color="0.55", linestyle=":", linewidth=1)
            ax.text(CURVE_CLICKS + 0.4, t, f"{int(t * 100)}%", va="bottom", ha="right", fontsize=8, color="0.4")
        n = max((per[ds]["instances"] for per in series.values() if ds in per), default=0)
        ax.set_title(f"{ds}  ({n} instances)", fontsize=12)
        ax.set_xlabel("number of clicks")
        ax.set_ylabel("mIoU")
        ax.set_xlim(0.5, CURVE_CLICKS + 0.5)
        ax.set_xticks([1, 5, 10, 15, 20])
        lo = min(lows) if lows else 0.0
        ax.set_ylim(max(0.0, min(0.8, lo) - 0.05), 1.01)
        ax.grid(True, alpha=0.3)
        # below the axes, so it never hides the low (first-click) part of the curves
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8.5, frameon=False)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle("mIoU after k clicks (robot user, standard protocol)", fontsize=13)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_noc_by_version(series: Series, out: Path, datasets: Optional[Sequence[str]] = None,
                        key: str = "noc90") -> Path:
    names = _datasets(series, datasets)
    versions = list(series)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(versions) * max(1, len(names)) ** 0.5 + 3), 4.8))
    width = 0.8 / max(1, len(names))
    colors = _colors(len(names))
    for j, (ds, color) in enumerate(zip(names, colors)):
        xs, ys = [], []
        for i, v in enumerate(versions):
            m = series[v].get(ds)
            if m is not None:
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(m[key])
        bars = ax.bar(xs, ys, width=width * 0.92, color=color, label=ds)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_xticks(range(len(versions)))
    ax.set_xticklabels([_wrap(v) for v in versions], fontsize=9)
    label = key.replace("noc", "NoC@")
    ax.set_ylabel(f"{label} (lower is better)")
    ax.set_ylim(0, max(CURVE_CLICKS + 1.5, ax.get_ylim()[1] * 1.08))
    ax.axhline(CURVE_CLICKS, color="0.6", linestyle=":", linewidth=1)
    ax.text(len(versions) - 0.5, CURVE_CLICKS, f"{CURVE_CLICKS} = never reached", ha="right", va="bottom",
            fontsize=8, color="0.4")
    ax.set_title(f"{label} by model version", fontsize=13)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=9, ncol=min(6, len(names)), loc="upper left", framealpha=0.95)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _wrap(label: str, width: int = 22) -> str:
    """Break long version names at '-' so tick labels stay horizontal and readable."""
    lines, cur = [], ""
    for part in label.split("-"):
        piece = part if not cur else "-" + part
        if cur and len(cur) + len(piece) > width:
            lines.append(cur + "-")
            cur = part
        else:
            cur += piece
    return "\n".join(lines + [cur])


def plot_versions(refs: Sequence[str], out_dir: Path, db=None,
                  datasets: Optional[Sequence[str]] = None) -> List[Path]:
    """Both figures for run ids / model versions from the history."""
    series: Series = {}
    for ref in refs:
        runs = select_runs(ref, db, datasets)
        if not runs:
            raise KeyError(f"{ref}: no runs on {', '.join(datasets or [])}")
        label = ref if not ref.lstrip("#").isdigit() else f"{next(iter(runs.values()))['model_version']} #{ref.lstrip('#')}"
        series[label] = {ds: {**r["metrics"], "noc90": r["noc90"], "instances": r["instances"]}
                         for ds, r in runs.items()}
    out_dir = Path(out_dir)
    return [plot_miou_curves(series, out_dir / "miou_curves.png", datasets),
            plot_noc_by_version(series, out_dir / "noc90_by_version.png", datasets)]
