"""Per-instance failure report: the worst instances with image, gt and prediction overlays.

Worst = highest NoC@90, then lowest IoU after 20 clicks. Each instance gets one PNG (image with the
clicks | ground truth | prediction after click 1 | prediction after click 20 with errors coloured |
IoU per click) and the folder gets index.html and report.md listing them.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Callable, Dict, List, cast

import numpy as np

from matplotlib import patheffects

from .plots import plt
from .protocol import CURVE_CLICKS
from .runner import DatasetResult, InstanceResult
from .samples import LoadedSample

GREEN, RED, BLUE, GREY = (0.1, 0.85, 0.2), (0.95, 0.15, 0.1), (0.15, 0.45, 1.0), (0.6, 0.6, 0.6)


def _blend(image: np.ndarray, layers: List[tuple], alpha: float = 0.5) -> np.ndarray:
    out = image.astype(np.float32) / 255.0
    for mask, color in layers:
        if mask is not None and mask.any():
            out[mask] = (1 - alpha) * out[mask] + alpha * np.array(color, np.float32)
    return out


def _draw_clicks(ax, clicks, size: float) -> None:
    for i, (x, y, pos) in enumerate(clicks, start=1):
        ax.scatter([x], [y], s=size, c=[GREEN if pos else RED], edgecolors="white", linewidths=1.2, zorder=3)
        if i <= 20:
            ax.annotate(str(i), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7.5, color="white",
                        weight="bold", zorder=4, path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])


def render_instance(sample: LoadedSample, r: InstanceResult, out: Path, title: str) -> Path:
    img, gt, ign = sample.image, sample.gt, sample.ignore
    last = max(k for k in cast(dict, r.masks))     # a report is made of results that kept masks
    p1, plast = r.mask(1), r.mask(last)
    valid = ~ign if ign is not None else np.ones_like(gt)
    h, w = gt.shape
    panel_w = 4.3
    panel_h = panel_w * h / w
    fig = plt.figure(figsize=(4 * panel_w, panel_h + 2.9))
    grid = fig.add_gridspec(2, 4, height_ratios=[panel_h + 0.35, 2.1])
    panels = [
        ("image + clicks (green +, red -)", img.astype(np.float32) / 255.0, r.clicks[:last]),
        ("ground truth" + (" (grey: ignored)" if ign is not None else ""),
         _blend(img, [(gt, BLUE), (ign, GREY)]), None),
        (f"prediction after click 1 (IoU {r.ious[0]:.3f})", _blend(img, [(p1, BLUE)]), r.clicks[:1]),
        (f"after click {last} (IoU {r.ious[last - 1]:.3f}): blue TP, red FP, green FN",
         _blend(img, [(plast & gt & valid, BLUE), (plast & ~gt & valid, RED), (~plast & gt & valid, GREEN)]),
         r.clicks[:last]),
    ]
    size = 60 * max(0.6, min(1.5, max(img.shape[:2]) / 600))
    for i, (name, pic, clicks) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(pic)
        if clicks:
            _draw_clicks(ax, clicks, size)
        ax.set_title(name, fontsize=9.5)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    ks = np.arange(1, len(r.ious) + 1)
    ax.plot(ks, r.ious, marker="o", color="0.2", linewidth=1.5, markersize=4)
    for k, (_, _, pos) in zip(ks, r.clicks):
        ax.scatter([k], [r.ious[k - 1]], c=[GREEN if pos else RED], s=28, zorder=3)
    for t in (0.85, 0.90):
        ax.axhline(t, color="0.6", linestyle=":", linewidth=1)
    ax.set_xlim(0.5, max(CURVE_CLICKS, len(r.ious)) + 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(ks if len(ks) <= 30 else ks[::5])
    ax.set_xlabel("click")
    ax.set_ylabel("IoU")
    ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(result: DatasetResult, load: Callable[[str], LoadedSample], out_dir: Path,
                 k: int = 10) -> List[Dict[str, object]]:
    """Render the worst `k` instances of `result` (evaluated with report_k >= k) into out_dir/<dataset>/."""
    have = [r for r in result.instances if r.masks]
    worst = sorted(have, key=lambda r: (-r.noc(), r.ious[CURVE_CLICKS - 1]))[:k]
    ds_dir = Path(out_dir) / _slug(result.dataset)
    entries: List[Dict[str, object]] = []
    for rank, r in enumerate(worst, start=1):
        png = ds_dir / f"{rank:02d}_{_slug(r.sample_id)}.png"
        title = (f"{result.dataset} / {r.sample_id}  ({result.model_version}):  NoC@85 {r.noc(0.85)},  "
                 f"NoC@90 {r.noc(0.90)},  IoU@1 {r.ious[0]:.3f},  IoU@20 {r.ious[CURVE_CLICKS - 1]:.3f}")
        render_instance(load(r.sample_id), r, png, title)
        entries.append(dict(rank=rank, id=r.sample_id, noc85=r.noc(0.85), noc90=r.noc(0.90),
                            iou1=r.ious[0], iou20=r.ious[CURVE_CLICKS - 1], png=png.relative_to(out_dir)))
    return entries


def write_index(out_dir: Path, sections: List[tuple]) -> Path:
    """index.html and report.md for [(DatasetResult, entries), ...]; returns index.html."""
    md = ["# Failure report", ""]
    hx = ["<!doctype html><meta charset=utf-8><title>Failure report</title>",
          "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:2px 8px}</style><h1>Failure report</h1>"]
    for result, entries in sections:
        m = result.metrics()
        head = (f"{result.dataset}: {result.model_version} on {result.device}, {m['instances']} instances, "
                f"NoC@85 {m['noc85']:.2f}, NoC@90 {m['noc90']:.2f}, NoF@90 {m['nof90']}")
        md += [f"## {head}", "", f"Worst {len(entries)} instances (highest NoC@90, then lowest IoU@20).", "",
               "| rank | instance | NoC@85 | NoC@90 | IoU@1 | IoU@20 |", "|---|---|---|---|---|---|"]
        hx += [f"<h2>{html.escape(head)}</h2>", "<table><tr><th>rank</th><th>instance</th><th>NoC@85</th>"
               "<th>NoC@90</th><th>IoU@1</th><th>IoU@20</th></tr>"]
        for e in entries:
            md.append(f"| {e['rank']} | [{e['id']}]({e['png']}) | {e['noc85']} | {e['noc90']} | "
                      f"{e['iou1']:.3f} | {e['iou20']:.3f} |")
            hx.append(f"<tr><td>{e['rank']}</td><td><a href=\"{html.escape(str(e['png']))}\">"
                      f"{html.escape(str(e['id']))}</a></td><td>{e['noc85']}</td><td>{e['noc90']}</td>"
                      f"<td>{e['iou1']:.3f}</td><td>{e['iou20']:.3f}</td></tr>")
        md.append("")
        hx.append("</table>")
        for e in entries:
            hx.append(f"<h3>{html.escape(result.dataset)} #{e['rank']}: {html.escape(str(e['id']))}</h3>"
                      f"<img src=\"{html.escape(str(e['png']))}\" style=\"max-width:100%\">")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    index = out_dir / "index.html"
    index.write_text("\n".join(hx) + "\n")
    return index


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)
