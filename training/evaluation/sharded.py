"""Evaluation split into shards run by RQ workers on any number of machines.

    python -m training.evaluate --checkpoint PATH --datasets GrabCut,Berkeley --queue --db postgresql://... \
        [--shard-size 10] [--queue-name simclick-eval] [--redis-url redis://host:6379/0] [--wait]
    rq worker -u redis://host:6379/0 simclick-eval          # on each machine, from the repository root
    python -m training.evaluate merge GROUP --db postgresql://...   # the merged table; records the runs

`--queue` writes a group row (checkpoint, data sets, their sizes, protocol) to the history database
and enqueues one RQ job per shard (`shard_size` consecutive instances of one data set). A job loads
its instances, runs the robot user exactly as a local run does (one predictor, one process) and
writes its per-instance results (IoU per click, clicks, seconds) to `evaluation_shards` in the same
database; a retried job replaces its shard. `merge` puts the shards back in data-set order, checks
that every shard is there and that all were run by the same model (version and checkpoint sha256),
and stores one ordinary run per data set in `evaluation_runs` (once: merging again prints the same
runs). NoC and mIoU equal a local run's; only the seconds per click (SPC) reflect the workers.

Every worker needs the data sets under the same data root (or `--data-root` valid on every
machine), the checkpoint at the same path, and the database: use PostgreSQL for several machines
(an SQLite path works for workers on the machine that owns the file).
"""
from __future__ import annotations

import datetime as dt
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import sqlalchemy as sa
from rq import Queue
from rq.job import Job

from training.redisconn import connect

from .datasets import dataset_name, load_dataset
from .history import engine_for, metadata, record_run, resolve_url
from .predictors import PredictorSpec, checkpoint_hash
from .protocol import Protocol
from .runner import DatasetResult, InstanceResult, evaluate_dataset

DEFAULT_QUEUE = "simclick-eval"

groups = sa.Table(
    "evaluation_groups", metadata,
    sa.Column("group_id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("checkpoint", sa.Text, nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),          # device, predictor options, data root, limit
    sa.Column("datasets", sa.JSON, nullable=False),      # [{"name", "spec", "instances", "shards": [[start, stop], ...]}]
    sa.Column("protocol", sa.JSON, nullable=False),
    sa.Column("tag", sa.String(200), nullable=True),
    sa.Column("notes", sa.Text, nullable=True),
    sa.Column("run_ids", sa.JSON, nullable=True),        # set by the first merge: dataset -> run id
)

shards = sa.Table(
    "evaluation_shards", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("group_id", sa.String(64), nullable=False, index=True),
    sa.Column("dataset", sa.String(100), nullable=False),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("start", sa.Integer, nullable=False),
    sa.Column("stop", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_version", sa.String(200), nullable=False),
    sa.Column("checkpoint_path", sa.Text, nullable=True),
    sa.Column("checkpoint_sha256", sa.String(200), nullable=True),
    sa.Column("device", sa.String(100), nullable=False),
    sa.Column("host", sa.String(200), nullable=True),
    sa.Column("wall_seconds", sa.Float, nullable=False),
    sa.Column("per_instance", sa.JSON, nullable=False),  # [{"id", "ious", "clicks", "seconds", "shape", "box_iou"}]
    sa.UniqueConstraint("group_id", "dataset", "shard", name="uq_evaluation_shard"),
)


def split(n: int, shard_size: int) -> List[List[int]]:
    """[start, stop) ranges of at most shard_size instances covering 0..n."""
    if shard_size < 1:
        raise ValueError("shard size must be >= 1")
    return [[a, min(n, a + shard_size)] for a in range(0, n, shard_size)]


def enqueue(checkpoint: str, device: Optional[str], options: tuple, datasets: List[str], data_root: Optional[str],
            limit: Optional[int], protocol, db: Optional[str], redis_url: str, queue: str = DEFAULT_QUEUE,
            shard_size: int = 10, tag: Optional[str] = None, notes: Optional[str] = None,
            job_timeout: int = 6 * 3600, skip: int = 0) -> Dict[str, Any]:
    """Write the group and enqueue its shards; returns {"group", "jobs", "datasets"}."""
    url = resolve_url(db)                    # the workers write where this command would have
    group = uuid.uuid4().hex[:16]
    sets: List[Dict[str, Any]] = []
    for spec in datasets:
        name = dataset_name(spec)
        n = len(load_dataset(spec, Path(data_root) if data_root else None, limit, skip=skip))
        sets.append({"name": name, "spec": spec, "instances": n, "shards": split(n, shard_size)})
    with engine_for(url).begin() as conn:
        conn.execute(groups.insert().values(
            group_id=group, created_at=dt.datetime.now(dt.timezone.utc), checkpoint=checkpoint,
            spec={"device": device, "options": [list(o) for o in options], "data_root": data_root, "limit": limit,
                  "skip": skip},
            datasets=sets, protocol=protocol.to_dict(), tag=tag, notes=notes))
    q = Queue(queue, connection=connect(redis_url))
    jobs = []
    for s in sets:
        for i, (a, b) in enumerate(s["shards"]):
            job = q.enqueue(run_shard, kwargs=dict(group=group, db=url, dataset=s["spec"], shard=i, start=a, stop=b),
                            job_timeout=job_timeout, result_ttl=7 * 86400, failure_ttl=7 * 86400,
                            description=f"evaluate {checkpoint} {s['name']} [{a}:{b}] group {group}")
            jobs.append(job.id)
    return {"group": group, "jobs": jobs, "datasets": [{k: s[k] for k in ("name", "instances")} | {"shards": len(s["shards"])}
                                                       for s in sets]}


def _group(conn, group: str) -> Dict[str, Any]:
    row = conn.execute(sa.select(groups).where(groups.c.group_id == group)).first()
    if row is None:
        raise KeyError(f"no evaluation group {group!r} in the history database")
    return dict(row._mapping)


def run_shard(group: str, db: str, dataset: str, shard: int, start: int, stop: int) -> Dict[str, Any]:
    """The RQ job: instances [start, stop) of `dataset`, results into evaluation_shards."""
    eng = engine_for(db)
    with eng.connect() as conn:
        g = _group(conn, group)
    spec = g["spec"]
    protocol = Protocol(**g["protocol"])
    samples = load_dataset(dataset, spec.get("data_root"), spec.get("limit"), skip=spec.get("skip") or 0)[start:stop]
    if len(samples) != stop - start:
        raise RuntimeError(f"{dataset}[{start}:{stop}]: {len(samples)} instances here; this worker's data "
                           f"differs from the machine that enqueued the group")
    predictor = PredictorSpec(g["checkpoint"], spec.get("device"), tuple(tuple(o) for o in spec.get("options") or ()))()
    name = dataset_name(dataset)
    result = evaluate_dataset(predictor, samples, dataset=name, protocol=protocol, workers=1, progress=False)
    row = dict(group_id=group, dataset=name, shard=shard, start=start, stop=stop,
               created_at=dt.datetime.now(dt.timezone.utc), model_version=result.model_version,
               checkpoint_path=result.checkpoint_path, checkpoint_sha256=result.checkpoint_sha256,
               device=result.device, host=socket.gethostname(), wall_seconds=result.wall_seconds,
               per_instance=[{"id": r.sample_id, "ious": r.ious, "clicks": [list(c) for c in r.clicks],
                              "seconds": r.seconds, "shape": list(r.shape), "box_iou": r.box_iou}
                             for r in result.instances])
    with eng.begin() as conn:   # a retried job replaces its shard
        conn.execute(shards.delete().where((shards.c.group_id == group) & (shards.c.dataset == name)
                                           & (shards.c.shard == shard)))
        conn.execute(shards.insert().values(**row))
    return {"group": group, "dataset": name, "shard": shard, "instances": len(samples)}


def status(group: str, db: Union[None, str, sa.engine.Engine] = None) -> Dict[str, Any]:
    with engine_for(db).connect() as conn:
        g = _group(conn, group)
        done = {(r.dataset, r.shard) for r in conn.execute(
            sa.select(shards.c.dataset, shards.c.shard).where(shards.c.group_id == group))}
    missing = [(s["name"], i) for s in g["datasets"] for i in range(len(s["shards"])) if (s["name"], i) not in done]
    total = sum(len(s["shards"]) for s in g["datasets"])
    return {"group": group, "shards": total, "done": total - len(missing), "missing": missing}


def merge(group: str, db: Optional[str] = None, record: bool = True) -> List[Dict[str, Any]]:
    """One metrics dict per data set (as `--json` prints them), recorded as runs once.
    Raises LookupError while shards are missing, ValueError when shards disagree on the model."""
    eng = engine_for(db)
    st = status(group, eng)
    if st["missing"]:
        raise LookupError(f"group {group}: {st['done']} of {st['shards']} shards done; missing "
                          + ", ".join(f"{d}#{i}" for d, i in st["missing"][:20]))
    with eng.connect() as conn:
        g = _group(conn, group)
        rows = [dict(r._mapping) for r in conn.execute(
            sa.select(shards).where(shards.c.group_id == group).order_by(shards.c.dataset, shards.c.shard))]
    models = {(r["model_version"], r["checkpoint_sha256"]) for r in rows}
    if len(models) > 1:
        raise ValueError(f"group {group}: shards were run by different models {sorted(map(str, models))} "
                         "(the checkpoint differs between machines?)")
    spec_info = g["spec"]
    spec = PredictorSpec(g["checkpoint"], spec_info.get("device"), tuple(tuple(o) for o in spec_info.get("options") or ()))
    protocol = Protocol(**g["protocol"])
    stored = g["run_ids"] or {}
    out, run_ids = [], dict(stored)
    for s in g["datasets"]:
        parts = sorted((r for r in rows if r["dataset"] == s["name"]), key=lambda r: r["shard"])
        instances = [InstanceResult(p["id"], p["ious"], [tuple(c) for c in p["clicks"]], p["seconds"],
                                    shape=tuple(p.get("shape") or (0, 0)), box_iou=p.get("box_iou"))
                     for r in parts for p in r["per_instance"]]
        first = parts[0]
        result = DatasetResult(s["name"], first["model_version"], first["device"], protocol, instances,
                               wall_seconds=max(r["wall_seconds"] for r in parts),
                               checkpoint_path=first["checkpoint_path"], checkpoint_sha256=first["checkpoint_sha256"])
        m = result.to_json()
        m["checkpoint"] = g["checkpoint"]
        m["checkpoint_hash"] = checkpoint_hash(spec, result.checkpoint_path, result.model_version,
                                               result.checkpoint_sha256)
        m["workers"] = f"rq:{len(parts)} shards on {len({r['host'] for r in parts})} host(s)"
        m["group"] = group
        if record and s["name"] not in run_ids:
            run_ids[s["name"]] = record_run(
                result, eng, checkpoint=g["checkpoint"], checkpoint_hash=m["checkpoint_hash"],
                complete=spec_info.get("limit") is None, tag=g["tag"], notes=g["notes"],
                extra_protocol={"limit": spec_info.get("limit"), "workers": m["workers"], "group": group,
                                "data_root": str(spec_info.get("data_root") or "")})
        if s["name"] in run_ids:
            m["run_id"] = run_ids[s["name"]]
        out.append(m)
    if run_ids != stored:
        with eng.begin() as conn:
            conn.execute(groups.update().where(groups.c.group_id == group).values(run_ids=run_ids))
    return out


def wait(group: str, db: Optional[str] = None, poll: float = 5.0, timeout: Optional[float] = None,
         log=None, jobs: Optional[List[str]] = None, redis_url: Optional[str] = None) -> None:
    """Until every shard is stored; a failed shard job (when `jobs` are given) raises at once."""
    t0 = time.monotonic()
    last = None
    while True:
        st = status(group, db)
        if not st["missing"]:
            return
        if jobs and redis_url:
            for job in Job.fetch_many(jobs, connection=connect(redis_url)):
                if job is not None and job.is_failed:
                    raise RuntimeError(f"group {group}: shard job {job.id} failed ({job.description}); "
                                       f"re-enqueue it with `rq requeue {job.id}`, or run merge when it is done")
        if log is not None and st["done"] != last:
            print(f"group {group}: {st['done']}/{st['shards']} shards done", file=log, flush=True)
            last = st["done"]
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise TimeoutError(f"group {group}: {st['done']}/{st['shards']} shards after {timeout:.0f} s")
        time.sleep(poll)


def dumps(obj) -> str:
    return json.dumps(obj, default=str)
