"""The learning curve of a project: is labelling more worth it?

    python -m backend.finetune.curve --export export.json --unseen PH2=DIR --unseen-skip 100 \
        --sizes 25,50,100 --out curve/

For each size N the first N tasks of the export (a Label Studio JSON export; `make_export` writes
one from any images/ + masks/ folder) go through a real fine-tuning job with the job's settings
(FINETUNE_*; a fresh registry under --out, the base model as parent): pull, train, evaluate,
decide. Then the base model and every job's version are measured with the robot user on images of
the same domain that no job saw (--unseen: a data set spec as `training.evaluate --datasets` takes
it), NoC@85/90 with the protocol's stop rule. Printed as a table and drawn to
<out>/learning_curve.png (NoC@90 and NoC@85 against the number of labels; a hollow marker is a
version the job's gate did not promote, so the project would still be served the base model);
the numbers also go to <out>/learning_curve.json. Every job and evaluation is recorded in the
evaluation history as usual.

With --chain the sizes are rounds of one project instead: each job starts from the version the
one before promoted (a team that labels 50, trains, labels 50 more, trains again), and each row
also says how the first round's holdout instances fared in that round (they stay in the holdout:
the split is by task).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from model.files import file_sha256, read_info, resolve
from ..registry import ProjectRegistry
from model.settings import LOCAL_FILES_ROOT

from .decision import Paired
from .evaluation import PROTOCOL, ModelSpec, eval_workers
from .job import run_finetune
from .settings import FinetuneSettings


def subset_export(export: Path, n: int, out: Path) -> Path:
    """The first n tasks of an export, as an export file of their own."""
    tasks = json.loads(export.read_text())
    if n > len(tasks):
        raise ValueError(f"{export} has {len(tasks)} tasks, fewer than {n}")
    out.write_text(json.dumps(tasks[:n]))
    return out


def unseen_noc(spec: ModelSpec, samples: list, settings: FinetuneSettings, name: str) -> Dict[str, Any]:
    """NoC@85/90 and NoF@90 of one model on the unseen images (recorded in the history)."""
    from training.evaluation.history import record_run
    from training.evaluation.runner import evaluate_datasets

    result = evaluate_datasets(spec, {name: samples}, PROTOCOL, workers=eval_workers(settings))[name]
    m = result.metrics()
    try:
        record_run(result, checkpoint=spec.checkpoint, checkpoint_hash=spec.sha256, complete=False,
                   tag="learning-curve")
    except Exception as e:       # a record, not a result: the curve goes on without it
        print(f"warning: could not record the {name} run in the evaluation history: {e}", file=sys.stderr)
    return {"noc85": m["noc85"], "noc90": m["noc90"], "nof90": m["nof90"], "instances": m["instances"],
            "seconds": round(result.wall_seconds, 1)}


def run_curve(export: Path, unseen: str, sizes: List[int], out: Path, unseen_skip: int = 0,
              unseen_limit: int | None = None, settings: FinetuneSettings | None = None,
              base_checkpoint: str | None = None, images: Path | None = None, chain: bool = False,
              log=print) -> Dict[str, Any]:
    """Fine-tune on each size (from the base, or with `chain` from the previous round's promoted
    version), measure base and versions on the unseen images; the rows."""
    from training.evaluation.datasets import dataset_name, load_dataset

    settings = settings or FinetuneSettings.from_env()
    out.mkdir(parents=True, exist_ok=True)
    name = dataset_name(unseen)
    samples = load_dataset(unseen, limit=unseen_limit, skip=unseen_skip)
    base = resolve(base_checkpoint or "default")
    base_spec = ModelSpec(str(base), str(read_info(base).get("version") or base.stem), file_sha256(base),
                          settings.device or None, settings.eval_coarse_size)
    log(f"unseen: {len(samples)} {name} instances; base model {base_spec.version}")
    rows: List[Dict[str, Any]] = [{"labels": 0, "version": base_spec.version, "promoted": None,
                                   "unseen": unseen_noc(base_spec, samples, settings, name)}]
    log(_row_text(rows[-1]))
    first_holdout: List[str] = []
    for n in sizes:
        t0 = time.perf_counter()
        job_id = f"curve-{n}-{int(time.time())}"
        project = "curve" if chain else f"curve{n}"
        summary = run_finetune(project, job_id, settings, export=str(subset_export(export, n, out / f"export-{n}.json")),
                               registry_root=str(out / "registry"), base_checkpoint=str(base),
                               work_root=str(out / "jobs"), local_files_root=str(images) if images else None)
        row: Dict[str, Any] = {"labels": n, "version": summary.get("version"), "status": summary["status"],
                               "promoted": summary.get("promoted"), "reason": summary.get("reason"),
                               "job_s": round(time.perf_counter() - t0, 1), "timings": summary.get("timings")}
        if summary["status"] != "skipped":
            h = summary["metrics"]["holdout"]
            row["holdout"] = {"instances": h["instances"], "parent": h["parent"], "candidate": h["candidate"]}
            if chain:
                row["parent"] = summary["parent"]
                first_holdout = first_holdout or sorted(h["per_instance"])
                row["first_holdout"] = _on(h["per_instance"], first_holdout)
            v = ProjectRegistry(out / "registry", project).get(summary["version"])
            row["unseen"] = unseen_noc(ModelSpec(str(v.checkpoint), v.name, v.info["sha256"], settings.device or None,
                                                 settings.eval_coarse_size), samples, settings, name)
        rows.append(row)
        log(_row_text(row))
    result = {"unseen": {"spec": unseen, "skip": unseen_skip, "limit": unseen_limit, "instances": len(samples)},
              "settings": settings.to_dict(), "chain": chain, "rows": rows}
    (out / "learning_curve.json").write_text(json.dumps(result, indent=2, default=str))
    plot(rows, out / "learning_curve.png", name, chain)
    return result


def _on(per_instance: Dict[str, list], ids: List[str]) -> Dict[str, Any]:
    """NoC@90 of the job's parent and candidate on the given holdout instances (those it has)."""
    have = {i: per_instance[i] for i in ids if i in per_instance}
    p = Paired("first holdout", {i: v[0] for i, v in have.items()}, {i: v[1] for i, v in have.items()})
    return {"instances": len(p.ids), "parent": p.mean("parent"), "candidate": p.mean("candidate"),
            "worse": len(p.worse), "better": len(p.better)}


def _row_text(row: Dict[str, Any]) -> str:
    u = row.get("unseen") or {}
    gate = "" if row["promoted"] is None else (" promoted" if row["promoted"] else " not promoted")
    job = f", job {row['job_s'] / 60:.1f} min" if "job_s" in row else ""
    f = row.get("first_holdout")
    first = (f"; first holdout NoC@90 {f['parent']:.2f} -> {f['candidate']:.2f} ({f['better']} better, "
             f"{f['worse']} worse)" if f else "")
    return (f"{row['labels']:>4} labels: unseen NoC@85 {u.get('noc85', float('nan')):.2f} NoC@90 "
            f"{u.get('noc90', float('nan')):.2f} (NoF@90 {u.get('nof90', '-')}){gate}{job}{first}")


def table(rows: List[Dict[str, Any]]) -> str:
    """The curve as a Markdown table (the README's); chained rounds also show the first round's
    holdout instances."""
    base = rows[0]["unseen"]
    chained = any("first_holdout" in r for r in rows)
    head = ["labels", "unseen NoC@85", "unseen NoC@90", "NoF@90", "vs base @90",
            "holdout NoC@90 parent -> candidate"] + (["first holdout NoC@90"] if chained else []) + ["promoted", "job time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        u, h, f = r.get("unseen"), r.get("holdout"), r.get("first_holdout")
        job = f"{r['job_s'] / 60:.1f} min" if "job_s" in r else "-"
        if u is None:
            cells = [str(r["labels"])] + ["-"] * (len(head) - 3) + [r["status"], job]
        else:
            cells = [str(r["labels"]), f"{u['noc85']:.2f}", f"{u['noc90']:.2f}", str(u["nof90"]),
                     "base" if r["labels"] == 0 else f"{100 * (u['noc90'] / base['noc90'] - 1):+.0f}%",
                     f"{h['parent']['noc90']:.2f} -> {h['candidate']['noc90']:.2f} ({h['instances']})" if h else "-"]
            if chained:
                cells.append(f"{f['parent']:.2f} -> {f['candidate']:.2f} ({f['worse']} worse)" if f else "-")
            cells += ["-" if r["promoted"] is None else ("yes" if r["promoted"] else "no"), job]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: Path, name: str, chain: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [r for r in rows if r.get("unseen")]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for key, colour in (("noc90", "tab:blue"), ("noc85", "tab:orange")):
        xs = [r["labels"] for r in have]
        ax.plot(xs, [r["unseen"][key] for r in have], color=colour, label=f"NoC@{key[3:]}")
        for r in have:
            hollow = r["promoted"] is False
            ax.scatter([r["labels"]], [r["unseen"][key]], color="white" if hollow else colour, edgecolors=colour,
                       zorder=3, s=40)
    ax.set_xlabel("project labels used for fine-tuning (0 = base model)"
                  + ("; each round from the one before" if chain else ""))
    ax.set_ylabel(f"clicks on unseen {name} images")
    ax.set_title(f"{'Rounds of one project' if chain else 'Learning curve'} on {name} "
                 "(hollow: not promoted by the gate)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.finetune.curve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True, help="the project's Label Studio JSON export")
    ap.add_argument("--images", type=Path, default=None,
                    help="where its /data/local-files images are (default: LOCAL_FILES_ROOT, else images/ beside "
                         "the export, as make_export writes it)")
    ap.add_argument("--unseen", required=True, help="unseen images of the domain: NAME=DIR (images/ + masks/)")
    ap.add_argument("--unseen-skip", type=int, default=0, help="leave out the first N unseen instances")
    ap.add_argument("--unseen-limit", type=int, default=None, help="at most N unseen instances")
    ap.add_argument("--sizes", default="25,50,100", help="numbers of labels (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (registry, jobs, JSON, PNG)")
    ap.add_argument("--checkpoint", default=None, help="base model (default: MODEL_CHECKPOINT / the shipped one)")
    ap.add_argument("--chain", action="store_true",
                    help="the sizes are rounds of one project: each job starts from the previous round's promoted version")
    args = ap.parse_args(argv)
    images = args.images
    if images is None and not LOCAL_FILES_ROOT.read():
        images = args.export.parent / "images"
    try:
        sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
        result = run_curve(args.export, args.unseen, sizes, args.out, args.unseen_skip, args.unseen_limit,
                           base_checkpoint=args.checkpoint, images=images.resolve() if images else None,
                           chain=args.chain, log=lambda text: print(text, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result["rows"]))
    print(f"\nplot: {args.out / 'learning_curve.png'}; numbers: {args.out / 'learning_curve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
