"""Command line: evaluate a checkpoint, list/compare the history, plot versions.

    python -m training.evaluate --checkpoint PATH|default|oracle|grabcut --datasets GrabCut,Berkeley,DAVIS \
        [--limit N] [--workers N] [--json] [--max-clicks 100] [--report DIR] [--tag T] [--db URL]
    python -m training.evaluate history [--dataset X] [--version V] [--compare A B]
    python -m training.evaluate plot --versions A,B --out DIR [--datasets GrabCut,DAVIS]
    python -m training.evaluate ... --queue [--shard-size 10] [--wait]   # shards on RQ workers
    python -m training.evaluate merge GROUP [--json]                     # (training/evaluation/sharded.py)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from model.checkpoint import resolve
from model.settings import REDIS_URL

from . import sharded
from .datasets import dataset_name, load_dataset
from .history import compare, list_runs, record_run
from .plots import plot_versions
from .predictors import PredictorSpec, checkpoint_hash, parse_options
from .protocol import CURVE_CLICKS, THRESHOLD, Protocol
from .report import write_index, write_report
from .runner import evaluate_dataset
from .tables import compare_table, detail_table, history_table, paper_table

DEFAULT_DATASETS = "GrabCut,Berkeley,DAVIS"


def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None,
                   help="history database: URL (postgresql://user@host/db) or SQLite path; "
                        "default $SIMCLICK_EVAL_DB or data/evaluation.sqlite")


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate",
                                description="NoC evaluation with the standard robot user "
                                            "(subcommands: history, plot; see --help of each)")
    p.add_argument("--checkpoint", default="default",
                   help="checkpoint file, 'default' (the shipped model), or a reference predictor: "
                        "'oracle' (returns the ground truth; NoC must be 1.00) or 'grabcut' (OpenCV GrabCut)")
    p.add_argument("--datasets", default=DEFAULT_DATASETS,
                   help="comma-separated: GrabCut, Berkeley, DAVIS, SBD, COCO-MVal, PascalVOC "
                        "(Name=/folder to point one elsewhere); default %(default)s")
    p.add_argument("--data-root", default=None,
                   help="folder holding the data sets (default $SIMCLICK_DATA_ROOT or ../shared/datasets)")
    p.add_argument("--limit", type=int, default=None, help="first N instances of each data set")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N instances of each data set (before --limit): e.g. the second "
                        "half of a folder whose first half a fine-tuning job trained on")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: CPU count on CPU, 1 on a GPU)")
    p.add_argument("--device", default=None, help="torch device for the network (default: cuda if available)")
    p.add_argument("--predictor-options", default=None, metavar="NAME=VALUE,...",
                   help="predictor settings for ablations, e.g. refine=false or intention=false,focus_passes=1 "
                        "(see model.predictor.PredictorOptions); the version is recorded with them")
    p.add_argument("--max-clicks", type=int, default=CURVE_CLICKS,
                   help="click budget: 20 (protocol), or 100 to add NoC100@85/90 and NoF100@90")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="probability threshold (protocol: %(default)s; 0.5 is a deviation)")
    p.add_argument("--box", action="store_true",
                   help="start every instance from its ground-truth box (box-trained models; a deviation from "
                        "the protocol): reports box_miou, the IoU of the box alone, and NoC of the clicks after it")
    p.add_argument("--no-curve", action="store_true",
                   help="stop each instance at the click that reaches IoU 0.90 (the protocol's stop rule) instead of "
                        "running it to 20 for the mIoU curve: the same NoC@85/90 and NoF@90 at a fraction of the clicks")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per data set on stdout (tables go to stderr)")
    p.add_argument("--report", type=Path, default=None, help="write a failure report (PNG + index.html) here")
    p.add_argument("--report-k", type=int, default=10, help="worst instances per data set in the report")
    _db_arg(p)
    p.add_argument("--no-record", action="store_true", help="do not store the run in the history")
    p.add_argument("--tag", default=None, help="free label stored with the run")
    p.add_argument("--notes", default=None, help="free notes stored with the run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    q = p.add_argument_group("across RQ workers (training/evaluation/sharded.py)")
    q.add_argument("--queue", action="store_true",
                   help="split the data sets into shards for RQ workers (`rq worker -u REDIS_URL QUEUE` on any "
                        "machine); per-instance results go to the history database; `merge GROUP` prints the table")
    q.add_argument("--shard-size", type=int, default=10, help="instances per shard (default %(default)s)")
    q.add_argument("--queue-name", default=None, help="RQ queue (default simclick-eval)")
    q.add_argument("--redis-url", default=None, help="default $REDIS_URL")
    q.add_argument("--wait", action="store_true", help="with --queue: wait for the shards, then merge")
    return p


def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate merge",
                                description="merge the shards of a --queue evaluation: table, runs in the history")
    p.add_argument("group", help="the group id --queue printed")
    p.add_argument("--json", action="store_true", help="one JSON object per data set on stdout")
    p.add_argument("--no-record", action="store_true", help="do not store the merged runs")
    p.add_argument("--status", action="store_true", help="only print how many shards are done")
    _db_arg(p)
    return p


def history_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate history",
                                description="list stored runs, or compare two runs / model versions")
    p.add_argument("--dataset", default=None)
    p.add_argument("--version", default=None, help="only this model version")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="run ids (12 or #12) or model versions; shows B - A per data set")
    p.add_argument("--json", action="store_true")
    _db_arg(p)
    return p


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate plot",
                                description="mIoU-vs-clicks curves and NoC@90 across versions (PNG)")
    p.add_argument("--versions", required=True, help="comma-separated model versions or run ids")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--datasets", default=None, help="comma-separated subset (default: all with runs)")
    _db_arg(p)
    return p


def _default_workers(spec) -> int:
    if not spec.is_reference and (spec.device or "").startswith("cuda"):
        return 1
    if not spec.is_reference and spec.device is None and torch.cuda.is_available():
        return 1
    return max(1, os.cpu_count() or 1)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except Exception as e:  # a missing data set or checkpoint is a usage error, not a crash
        if isinstance(e, FileNotFoundError) or type(e).__name__ == "CheckpointError":
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    protocol = Protocol(max_clicks=args.max_clicks, threshold=args.threshold, box=args.box, curve=not args.no_curve)
    if args.no_curve and args.report:
        print("error: --report shows the predictions at click 20, which --no-curve does not run", file=sys.stderr)
        return 2
    if args.skip < 0 or (args.limit is not None and args.limit < 1):
        print("error: --skip must be >= 0 and --limit >= 1", file=sys.stderr)
        return 2

    try:
        spec = PredictorSpec(args.checkpoint, args.device, parse_options(args.predictor_options))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not spec.is_reference:
        resolve(args.checkpoint)  # fail before any work: 'default' -> $SIMCLICK_CHECKPOINT or shipped file
    workers = args.workers if args.workers is not None else _default_workers(spec)
    names = _csv(args.datasets)
    try:
        for n in names:
            dataset_name(n)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.queue:
        return _enqueue(args, spec, protocol, names)
    sets = [(dataset_name(n), load_dataset(n, args.data_root, args.limit, skip=args.skip)) for n in names]
    predictor = spec() if workers <= 1 else spec  # one predictor for all data sets
    log = sys.stderr if args.json else sys.stdout
    metrics, sections = [], []
    started = time.perf_counter()
    for name, samples in sets:
        result = evaluate_dataset(predictor, samples, dataset=name, protocol=protocol, workers=workers,
                                  progress=not args.no_progress,
                                  report_k=args.report_k if args.report else 0)
        out = result.to_json()
        out["checkpoint"] = args.checkpoint
        out["checkpoint_hash"] = checkpoint_hash(spec, result.checkpoint_path, result.model_version,
                                                  result.checkpoint_sha256)
        out["workers"] = workers
        if not args.no_record:
            out["run_id"] = record_run(
                result, args.db, checkpoint=args.checkpoint, checkpoint_hash=out["checkpoint_hash"],
                complete=not args.skip and (args.limit is None or args.limit >= _full_size(name, args)), tag=args.tag,
                notes=args.notes, extra_protocol={"limit": args.limit, "skip": args.skip, "workers": workers,
                                                  "data_root": str(args.data_root or "")})
        if args.json:
            print(json.dumps({k: v for k, v in out.items() if k != "miou"} | {"miou": out["miou"]}), flush=True)
        if args.report:
            by_id = {s.sample_id: s for s in samples}
            sections.append((result, write_report(result, lambda i: by_id[i].load(), args.report, args.report_k)))  # noqa: B023 (used at once)
        metrics.append(out)
    total = time.perf_counter() - started
    version = metrics[0]["model_version"]
    print(f"\n{version} ({args.checkpoint}) on {metrics[0]['device']}, {workers} worker(s), "
          f"threshold {protocol.threshold}, {protocol.max_clicks} clicks max\n", file=log)
    print(paper_table(version, metrics), file=log)
    print("\n" + detail_table(metrics), file=log)
    print(f"\nwall time {total:.1f} s" + ("" if args.no_record else
          f"; stored as run(s) {', '.join(str(m['run_id']) for m in metrics)}"), file=log)
    if args.report:
        print(f"failure report: {write_index(args.report, sections)}", file=log)
    return 0


def _enqueue(args: argparse.Namespace, spec, protocol: Protocol, names: List[str]) -> int:
    if args.no_record or args.report:
        print("error: --queue stores its results in the history (no --no-record) and makes no --report",
              file=sys.stderr)
        return 2
    redis_url = args.redis_url or REDIS_URL.read()
    if not redis_url:
        print("error: --queue needs --redis-url or $REDIS_URL", file=sys.stderr)
        return 2
    queue = args.queue_name or sharded.DEFAULT_QUEUE
    info = sharded.enqueue(args.checkpoint, args.device, spec.options, names,
                           str(args.data_root) if args.data_root else None, args.limit, protocol, args.db,
                           redis_url, queue=queue, shard_size=args.shard_size, tag=args.tag, notes=args.notes,
                           skip=args.skip)
    log = sys.stderr if args.json else sys.stdout
    sets = ", ".join(f"{d['name']} {d['instances']} in {d['shards']}" for d in info["datasets"])
    print(f"group {info['group']}: {len(info['jobs'])} shard job(s) on queue {queue!r} ({sets}); run workers with\n"
          f"  rq worker -u {redis_url} {queue}\nthen: python -m training.evaluate merge {info['group']}"
          + (f" --db {args.db}" if args.db else ""), file=log, flush=True)
    if not args.json:
        print(info["group"])
    if not args.wait:
        if args.json:
            print(json.dumps(info))
        return 0
    sharded.wait(info["group"], args.db, log=log, jobs=info["jobs"], redis_url=redis_url)
    return _print_merged(sharded.merge(info["group"], args.db), args.json)


def cmd_merge(args: argparse.Namespace) -> int:
    try:
        if args.status:
            st = sharded.status(args.group, args.db)
            print(json.dumps(st) if args.json else f"group {args.group}: {st['done']}/{st['shards']} shards done")
            return 0
        metrics = sharded.merge(args.group, args.db, record=not args.no_record)
    except (KeyError, LookupError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 3 if isinstance(e, LookupError) and not isinstance(e, KeyError) else 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _print_merged(metrics, args.json)


def _print_merged(metrics: List[dict], as_json: bool) -> int:
    log = sys.stderr if as_json else sys.stdout
    if as_json:
        for m in metrics:
            print(json.dumps(m, default=str), flush=True)
    version = metrics[0]["model_version"]
    print(f"\n{version} ({metrics[0]['checkpoint']}) on {metrics[0]['device']}, {metrics[0]['workers']}, "
          f"group {metrics[0]['group']}\n", file=log)
    print(paper_table(version, metrics), file=log)
    print("\n" + detail_table(metrics), file=log)
    ids = [str(m["run_id"]) for m in metrics if "run_id" in m]
    if ids:
        print(f"\nstored as run(s) {', '.join(ids)}", file=log)
    return 0


def _full_size(name: str, args: argparse.Namespace) -> int:
    """Instances in the whole data set (only called with --limit)."""
    return len(load_dataset(name, args.data_root, args.limit + 1))


def cmd_history(args: argparse.Namespace) -> int:
    if args.compare:
        a, b = args.compare
        try:
            rows = compare(a, b, args.db)
        except KeyError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 2
        print(json.dumps(rows, default=str) if args.json else compare_table(a, b, rows))
        return 0
    rows = list_runs(args.db, args.dataset, args.version)
    if args.json:
        print(json.dumps(rows, default=str))
    elif not rows:
        print("no runs stored yet")
    else:
        print(history_table(rows))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    try:
        paths = plot_versions(_csv(args.versions), args.out, args.db, _csv(args.datasets) if args.datasets else None)
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "history":
        return cmd_history(history_parser().parse_args(argv[1:]))
    if argv and argv[0] == "plot":
        return cmd_plot(plot_parser().parse_args(argv[1:]))
    if argv and argv[0] == "merge":
        return cmd_merge(merge_parser().parse_args(argv[1:]))
    if argv and argv[0] == "run":
        argv = argv[1:]
    elif "--compare" in argv and "--checkpoint" not in argv:  # `python -m training.evaluate --compare A B`
        return cmd_history(history_parser().parse_args(argv))
    return cmd_run(run_parser().parse_args(argv))
