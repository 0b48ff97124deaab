"""`python -m backend.jobs`: the worker and the admin commands (status, enqueue, versions, rollback,
retry, cancel, resync); usage in the package's docstring (backend/jobs/__init__.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from rq import Queue, SimpleWorker, Worker
from rq.registry import clean_registries

from ..registry import ProjectRegistry, RegistryError, default_root
from model.settings import help_text
from training.redisconn import connect

from .control import cancel_job, retry_job
from .enqueue import enqueue_training, resync_counter
from .settings import JobSettings
from .status import job_info, list_jobs


def preload() -> None:
    """Import what a job needs once, in the worker process: every job's forked work-horse then starts
    warm (about 10 s less per job on a small CPU). Imports only: no torch op runs before the fork."""
    # inside the function on purpose: the worker loads these, the enqueue and status commands do not
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (training.train plots the loss)
    import timm  # noqa: F401
    import torchvision  # noqa: F401
    from label_studio_sdk.client import LabelStudio  # noqa: F401

    import backend.labelstudio.masks  # noqa: F401
    import backend.labelstudio.pull  # noqa: F401
    import model.predictor  # noqa: F401
    import training.data  # noqa: F401
    import training.evaluation.history  # noqa: F401
    import training.evaluation.runner  # noqa: F401
    import training.train  # noqa: F401


def _conn(args):
    s = JobSettings.from_env(redis_url=args.redis_url, queue=args.queue)
    return connect(s.redis_url), s


def _stopping(cls):
    """An RQ worker class whose stop (SIGTERM, SIGINT: docker stop, systemd, Ctrl+C) also ends the
    job it is running, instead of RQ's warm shutdown that waits for the job to finish (a training
    takes many minutes, the supervisor SIGKILLs the worker before, and its work-horse would go on
    alone). The job's SIGTERM handler (`interruptible`) ends it cleanly, failed with the reason;
    `retry` resumes it from its last saved state."""

    class StoppingWorker(cls):
        def request_stop(self, signum, frame):
            horse = getattr(self, "horse_pid", 0)
            if horse:
                self.log.warning("Worker %s: stopping; ending the running job (work-horse %s)", self.name, horse)
                try:
                    os.kill(horse, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            super().request_stop(signum, frame)

    StoppingWorker.__name__ = StoppingWorker.__qualname__ = f"Stopping{cls.__name__}"
    return StoppingWorker


def cmd_worker(args) -> int:
    conn, s = _conn(args)
    conn.ping()
    if not args.no_preload:
        preload()
    cls = SimpleWorker if args.simple else _stopping(Worker)
    worker = cls([Queue(s.queue, connection=conn)], connection=conn, name=args.name)
    worker.work(burst=args.burst, logging_level=args.log_level, with_scheduler=False)
    return 0


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
        return
    if isinstance(obj, dict):
        obj = [obj]
    for d in obj:
        line = f"{d['id']}  {d['status']:<9} project {d['project']}  {d.get('stage') or '':<18} {d.get('percent') or 0:>3}%"
        if d.get("detail"):
            line += f"  {d['detail']}"
        if d.get("eta_s") is not None:
            line += f"  ETA {d['eta_s'] // 60:.0f} min {d['eta_s'] % 60:02.0f} s"
        if d.get("timings"):
            line += "  [" + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s"
                                      for k, v in d["timings"].items()) + "]"
        if d.get("error"):
            line += f"  error: {d['error']}"
        if d["status"] == "skipped":
            line += f"  skipped: {d.get('reason')}"
        elif d.get("result"):
            r = d["result"]
            line += f"  -> {r.get('version')} {r.get('status')}: {r.get('reason')}"
        print(line)


def cmd_status(args) -> int:
    conn, s = _conn(args)
    clean_registries(Queue(s.queue, connection=conn))    # abandoned jobs -> failed
    if args.job:
        info = job_info(conn, args.job)
        if info is None:
            print(f"no job {args.job}", file=sys.stderr)
            return 1
        _print(info, args.json)
        return 0
    jobs = list_jobs(conn, s.queue, args.project, args.limit)
    if not jobs and not args.json:
        print("no jobs")
    else:
        _print(jobs, args.json)
    return 0


def cmd_enqueue(args) -> int:
    conn, s = _conn(args)
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "crop_size": args.crop_size,
                                   "bench_limit": args.bench_limit, "bench_datasets": args.bench_datasets,
                                   "eval_coarse_size": args.eval_coarse_size}.items() if v is not None}
    export = os.path.abspath(args.export) if args.export else None
    job_id, created = enqueue_training(conn, args.project, settings=s, trigger="cli", overrides=overrides,
                                       export=export)
    print(json.dumps({"job": job_id, "created": created}) if args.json
          else f"{job_id} ({'enqueued' if created else 'folded into the pending job'})")
    return 0


def _registry(args):
    return ProjectRegistry(args.registry or default_root(), args.project)


def cmd_versions(args) -> int:
    reg = _registry(args)
    d = reg.describe()
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    if not d["versions"]:
        print(f"project {reg.project}: no versions in {reg.dir}")
        return 0
    for v in d["versions"]:
        mark = "*" if v["promoted"] else " "
        h = (v["metrics"] or {}).get("holdout") or {}
        noc = (f"holdout NoC@90 {h['parent']['noc90']:.2f} -> {h['candidate']['noc90']:.2f}" if h else "")
        dec = v["decision"].get("reason", "") if v["decision"] else ""
        print(f"{mark} {v['name']:<22} {v['kind']:<9} parent {v['parent'] or '-':<22} job {v['job_id'] or '-'}  "
              f"{noc}  {dec}")
    return 0


def cmd_rollback(args) -> int:
    reg = _registry(args)
    v = reg.rollback(args.to, reason=args.reason or "", actor=f"cli {os.environ.get('USER', '')}".strip())
    print(f"project {reg.project}: now serving {v.name}")
    return 0


def cmd_retry(args) -> int:
    conn, _ = _conn(args)
    print(retry_job(conn, args.job))
    return 0


def cmd_cancel(args) -> int:
    conn, _ = _conn(args)
    out = cancel_job(conn, args.job, f"cli {os.environ.get('USER', '')}".strip(), wait=args.wait)
    print(json.dumps(out) if args.json else f"{out['job']}  {out['status']}  {out['detail'] or ''}")
    return 0



def cmd_resync(args) -> int:
    conn, s = _conn(args)
    print(json.dumps(resync_counter(conn, args.project, s, args.registry)))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m backend.jobs", description=sys.modules[__name__.rpartition(".")[0]].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--help-env", action="store_true",
                    help="print every environment variable SimClick reads (backend, worker, paths) and exit")
    sub = ap.add_subparsers(dest="command")

    def common(p, registry=False):
        p.add_argument("--redis-url", default=None, help="default $REDIS_URL")
        p.add_argument("--queue", default=None, help="default $TRAINING_QUEUE or simclick-training")
        if registry:
            p.add_argument("--registry", default=None, help="default $MODEL_REGISTRY or $DATA_DIR/registry")

    p = sub.add_parser("worker", help="run an RQ worker on the training queue")
    common(p)
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--simple", action="store_true", help="run jobs in the worker process (no fork)")
    p.add_argument("--name", default=None)
    p.add_argument("--no-preload", action="store_true", help="do not import torch before forking jobs")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("status", help="jobs and their stage/percent (or one job)")
    common(p)
    p.add_argument("job", nargs="?")
    p.add_argument("--project", default=None)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("enqueue", help="enqueue a fine-tuning job (folds into a pending one)")
    common(p)
    p.add_argument("--project", required=True)
    p.add_argument("--export", default=None, help="a Label Studio JSON export instead of the Label Studio API")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--crop-size", type=int)
    p.add_argument("--bench-limit", type=int)
    p.add_argument("--bench-datasets")
    p.add_argument("--eval-coarse-size", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_enqueue)

    p = sub.add_parser("versions", help="the project's registry versions (* = promoted)")
    common(p, registry=True)
    p.add_argument("--project", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_versions)

    p = sub.add_parser("rollback", help="serve the previously promoted version (or --to VERSION)")
    common(p, registry=True)
    p.add_argument("--project", required=True)
    p.add_argument("--to", default=None)
    p.add_argument("--reason", default=None)
    p.set_defaults(fn=cmd_rollback)

    p = sub.add_parser("retry", help="requeue a failed job (resumes from its saved state)")
    common(p)
    p.add_argument("job")
    p.set_defaults(fn=cmd_retry)

    p = sub.add_parser("cancel", help="cancel a job: queued (never runs), running (ended, resumable) or abandoned")
    common(p)
    p.add_argument("job")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a running job to end")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_cancel)

    p = sub.add_parser("resync", help="re-derive the annotation counter from Label Studio")
    common(p, registry=True)
    p.add_argument("--project", required=True)
    p.set_defaults(fn=cmd_resync)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.help_env:
        print(help_text())
        return 0
    if not getattr(args, "fn", None):
        parser().print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except Exception as e:
        if isinstance(e, (RegistryError, RuntimeError)) or type(e).__module__.startswith(("redis", "rq")):
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
