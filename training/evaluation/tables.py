"""Plain-text tables: the papers' NoC table, per-data-set details, history listing, comparisons."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def grid(header: Sequence[str], rows: Sequence[Sequence[Any]], align_left: int = 1) -> str:
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < align_left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def paper_table(method: str, metrics: Sequence[Dict[str, Any]]) -> str:
    """One row per method, NoC@85 / NoC@90 under each data set, as in the RITM/SimpleClick tables."""
    width = max(len("Method"), len(method))
    groups = []
    for m in metrics:
        cells = [_fmt(m["noc85"]), _fmt(m["noc90"])]
        w = max(len(m["dataset"]), len("NoC@85  NoC@90"))
        groups.append((m["dataset"].center(w), "NoC@85  NoC@90".rjust(w), f"{cells[0]:>6}  {cells[1]:>6}".rjust(w)))
    top = " " * width + " | " + " | ".join(g[0] for g in groups)
    mid = "Method".ljust(width) + " | " + " | ".join(g[1] for g in groups)
    row = method.ljust(width) + " | " + " | ".join(g[2] for g in groups)
    return "\n".join([top, mid, "-" * len(mid), row])


def _spc(v: Any) -> str:
    return "-" if v is None else (f"{v:.3f}" if v >= 0.01 else f"{v:.2g}")


def detail_table(metrics: Sequence[Dict[str, Any]]) -> str:
    extra = sorted({k for m in metrics for k in m if k.startswith(("noc1", "nof1")) and "_" in k})
    box = any("box_miou" in m for m in metrics)
    header = ["Dataset", "Inst", "NoC@85", "NoC@90", "NoF@90"] + [_label(k) for k in extra] + \
             (["box IoU"] if box else []) + ["mIoU@1", "mIoU@5", "mIoU@20", "SPC (s)", "Device"]
    rows = []
    for m in metrics:
        miou = m.get("miou") or [None] * 20
        rows.append([m["dataset"], m["instances"], _fmt(m["noc85"]), _fmt(m["noc90"]), m["nof90"]]
                    + [_fmt(m.get(k)) for k in extra]
                    + ([_fmt(m.get("box_miou"), ".3f")] if box else [])
                    + [_fmt(miou[0], ".3f"), _fmt(miou[4], ".3f"), _fmt(miou[19], ".3f"),
                       _spc(m["spc"]), m["device"]])
    return grid(header, rows)


def _label(key: str) -> str:  # noc100_90 -> NoC100@90
    name, t = key.split("_")
    return f"{name[:3].replace('noc', 'NoC').replace('nof', 'NoF')}{name[3:]}@{t}"


def _short_ckpt(c: Any) -> str:
    c = str(c or "")
    return c if len(c) <= 28 else "..." + c[-25:]


def _short_hash(h: Any) -> str:
    h = str(h or "")
    return h[:12] if all(ch in "0123456789abcdef" for ch in h) else "-"


def history_table(rows: List[Dict[str, Any]]) -> str:
    header = ["id", "date (UTC)", "model version", "dataset", "inst", "NoC@85", "NoC@90", "NoF@90", "SPC",
              "device", "checkpoint", "sha256", "commit", "tag"]
    body = []
    for r in rows:
        body.append([r["id"], r["created_at"].strftime("%Y-%m-%d %H:%M"), r["model_version"], r["dataset"],
                     f"{r['instances']}{'' if r['complete'] else '*'}", _fmt(r["noc85"]), _fmt(r["noc90"]),
                     r["nof90"], _spc(r["spc"]), r["device"], _short_ckpt(r["checkpoint"]), _short_hash(r["checkpoint_hash"]),
                     (r["git_commit"] or "")[:10], r["tag"] or ""])
    text = grid(header, body, align_left=4)
    if any(not r["complete"] for r in rows):
        text += "\n* partial run (--limit)"
    return text


def compare_table(a: str, b: str, rows: List[Dict[str, Any]]) -> str:
    header = ["dataset", "runs A/B", "inst A/B", "NoC@85 A", "B", "delta", "NoC@90 A", "B", "delta",
              "NoF@90 A", "B", "delta", "mIoU@1 delta", "mIoU@5 delta", "NoC@90 better/worse"]
    body = []
    for r in rows:
        if "missing" in r:
            body.append([r["dataset"], f"{r['a'] or '-'}/{r['b'] or '-'}", f"(no run for {r['missing']})"]
                        + [""] * (len(header) - 3))
            continue
        line = [r["dataset"], f"{r['a']}/{r['b']}", "%d/%d" % r["instances"]]
        for k in ("noc85", "noc90"):
            x, y, d = r[k]
            line += [_fmt(x), _fmt(y), f"{d:+.2f}"]
        x, y, d = r["nof90"]
        line += [x, y, f"{d:+d}"]
        line += [f"{r['miou@1'][2]:+.3f}", f"{r['miou@5'][2]:+.3f}",
                 f"{r['better']}/{r['worse']} of {r['paired']}"]
        body.append(line)
    return (f"A = {a}, B = {b}; delta = B - A (negative NoC/NoF delta: B needs fewer clicks)\n"
            + grid(header, body, align_left=3))
