"""Every evaluation run, stored with SQLAlchemy Core: SQLite file by default, PostgreSQL by URL.

The database is `--db URL` or $SIMCLICK_EVAL_DB (a URL, or a path for an SQLite file), default
data/evaluation.sqlite under the repository. One row per (run, data set).
"""
from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union, cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from model.settings import SIMCLICK_EVAL_DB

from .datasets import DATASETS
from .metrics import noc
from .runner import DatasetResult

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DB = REPO_ROOT / "data" / "evaluation.sqlite"

metadata = sa.MetaData()
runs = sa.Table(
    "evaluation_runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_version", sa.String(200), nullable=False, index=True),
    sa.Column("checkpoint", sa.Text, nullable=True),            # as given on the command line
    sa.Column("checkpoint_hash", sa.String(200), nullable=False),
    sa.Column("dataset", sa.String(100), nullable=False, index=True),
    sa.Column("instances", sa.Integer, nullable=False),
    sa.Column("complete", sa.Boolean, nullable=False),           # False when run with --limit
    sa.Column("noc85", sa.Float, nullable=False),
    sa.Column("noc90", sa.Float, nullable=False),
    sa.Column("nof90", sa.Integer, nullable=False),
    sa.Column("max_clicks", sa.Integer, nullable=False),
    sa.Column("spc", sa.Float, nullable=True),
    sa.Column("device", sa.String(100), nullable=False),
    sa.Column("wall_seconds", sa.Float, nullable=True),
    sa.Column("metrics", sa.JSON, nullable=False),               # everything summarize() returns (mIoU curve, NoC100, ...)
    sa.Column("per_instance", sa.JSON, nullable=False),          # [{"id", "ious", "clicks"}]
    sa.Column("protocol", sa.JSON, nullable=False),              # threshold, max_clicks, limit, data root
    sa.Column("git_commit", sa.String(100), nullable=True),
    sa.Column("tag", sa.String(200), nullable=True),
    sa.Column("notes", sa.Text, nullable=True),
)

_ENGINES: Dict[str, Engine] = {}


def resolve_url(db: Optional[str] = None) -> str:
    value = db or SIMCLICK_EVAL_DB.read() or str(DEFAULT_DB)
    if "://" in value:
        if value.startswith("postgresql://"):  # use psycopg 3 (the installed driver)
            value = "postgresql+psycopg://" + value[len("postgresql://"):]
        return value
    path = Path(value).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def engine_for(db: Union[None, str, Engine] = None) -> Engine:
    """An engine with the table created (cached per URL)."""
    if isinstance(db, Engine):
        metadata.create_all(db)
        return db
    url = resolve_url(db)
    if url not in _ENGINES:
        eng = sa.create_engine(url, future=True)
        metadata.create_all(eng)
        _ENGINES[url] = eng
    return _ENGINES[url]


def git_commit(repo: Path = REPO_ROOT) -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def record_run(result: DatasetResult, db: Union[None, str, Engine] = None, checkpoint: Optional[str] = None,
               checkpoint_hash: Optional[str] = None, complete: bool = True, tag: Optional[str] = None,
               notes: Optional[str] = None, extra_protocol: Optional[Dict[str, Any]] = None,
               commit: Optional[str] = None) -> int:
    """Store one data set's result; returns the run id."""
    m = result.metrics()
    row = dict(
        created_at=dt.datetime.now(dt.timezone.utc),
        model_version=result.model_version,
        checkpoint=checkpoint,
        checkpoint_hash=checkpoint_hash or f"unhashed:{result.model_version}",
        dataset=result.dataset,
        instances=len(result.instances),
        complete=complete,
        noc85=m["noc85"], noc90=m["noc90"], nof90=m["nof90"],
        max_clicks=result.protocol.max_clicks,
        spc=m["spc"], device=result.device, wall_seconds=result.wall_seconds,
        metrics={k: v for k, v in m.items() if k not in ("dataset", "device", "model_version")},
        per_instance=[{"id": r.sample_id, "ious": [round(v, 6) for v in r.ious],
                       "clicks": [list(c) for c in r.clicks]} for r in result.instances],
        protocol={**result.protocol.to_dict(), **(extra_protocol or {})},
        git_commit=commit if commit is not None else git_commit(),
        tag=tag, notes=notes,
    )
    with engine_for(db).begin() as conn:
        key = cast(Any, conn.execute(runs.insert().values(**row)).inserted_primary_key)
        return int(key[0])


SUMMARY_COLS = [c for c in runs.c if c.name not in ("per_instance", "metrics", "protocol")]


def list_runs(db: Union[None, str, Engine] = None, dataset: Optional[str] = None,
              model_version: Optional[str] = None, full: bool = False) -> List[Dict[str, Any]]:
    q = sa.select(*(runs.c if full else SUMMARY_COLS)).order_by(runs.c.id)
    if dataset:
        q = q.where(sa.func.lower(runs.c.dataset) == dataset.lower())
    if model_version:
        q = q.where(runs.c.model_version == model_version)
    with engine_for(db).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def known_ious(checkpoint_hash: str, dataset: str, same: Dict[str, Any],
               db: Union[None, str, Engine] = None) -> Dict[str, List[float]]:
    """Per-instance IoU after each click (instance id -> ious) of every earlier run of this
    checkpoint file on `dataset` whose protocol has the values in `same` (threshold, box,
    predictor options, ...; a missing key counts as None/False), later runs winning: the
    instances a new run of the same checkpoint can take from the history instead of clicking them
    again. A run without the curve (Protocol.curve False) stops at IoU 0.90: its NoC@85/90 are
    those of a full run."""
    q = (sa.select(runs.c.per_instance, runs.c.protocol, runs.c.max_clicks).order_by(runs.c.id)
         .where(runs.c.checkpoint_hash == checkpoint_hash, sa.func.lower(runs.c.dataset) == dataset.lower()))
    out: Dict[str, List[float]] = {}
    with engine_for(db).connect() as conn:
        for per_instance, protocol, max_clicks in conn.execute(q):
            protocol = protocol or {}
            if max_clicks < 20 or any((protocol.get(k) or None) != (v or None) for k, v in same.items()):
                continue
            out.update({p["id"]: list(p["ious"]) for p in per_instance})
    return out


def get_run(run_id: int, db: Union[None, str, Engine] = None) -> Optional[Dict[str, Any]]:
    with engine_for(db).connect() as conn:
        r = conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()
    return dict(r._mapping) if r else None


def select_runs(ref: str, db: Union[None, str, Engine] = None,
                datasets: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """dataset -> run for a reference that is a run id ('12' or '#12') or a model version.

    A model version gives its latest complete run per data set (latest partial run if it has none).
    """
    ref = str(ref)
    key = ref.lstrip("#")
    if key.isdigit():
        run = get_run(int(key), db)
        if run is not None:
            return {run["dataset"]: run}
        if ref.startswith("#"):
            raise KeyError(f"no run with id {key}")
    with engine_for(db).connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(
            sa.select(runs).where(runs.c.model_version == ref).order_by(runs.c.id))]
    if not rows:
        raise KeyError(f"no run id or model version {ref!r} in the history")
    out: Dict[str, Dict[str, Any]] = {}
    for r in rows:  # later rows win; complete runs beat partial ones
        cur = out.get(r["dataset"])
        if cur is None or r["complete"] or not cur["complete"]:
            out[r["dataset"]] = r
    if datasets:
        wanted = {d.lower() for d in datasets}
        out = {k: v for k, v in out.items() if k.lower() in wanted}
    return out


def compare(a: str, b: str, db: Union[None, str, Engine] = None) -> List[Dict[str, Any]]:
    """Per data set: metrics of A and B and B - A (negative NoC delta = B is better)."""
    ra, rb = select_runs(a, db), select_runs(b, db)
    rows = []
    order = list(DATASETS)
    for ds in sorted(set(ra) | set(rb), key=lambda d: (order.index(d) if d in order else len(order), d)):
        x, y = ra.get(ds), rb.get(ds)
        row: Dict[str, Any] = {"dataset": ds, "a": x and x["id"], "b": y and y["id"]}
        if x is None or y is None:
            row["missing"] = "A" if x is None else "B"
            rows.append(row)
            continue
        for k in ("noc85", "noc90", "nof90", "spc"):
            row[k] = (x[k], y[k], None if x[k] is None or y[k] is None else y[k] - x[k])
        for n in (1, 5):
            if x["metrics"].get("miou") and y["metrics"].get("miou"):   # a run without the curve has none
                ma, mb = x["metrics"]["miou"][n - 1], y["metrics"]["miou"][n - 1]
                row[f"miou@{n}"] = (ma, mb, mb - ma)
        row["instances"] = (x["instances"], y["instances"])
        row.update(_paired(x["per_instance"], y["per_instance"]))
        rows.append(row)
    return rows


def _paired(pa: Iterable[Dict[str, Any]], pb: Iterable[Dict[str, Any]]) -> Dict[str, int]:
    """Instances (matched by id) whose NoC@90 got better / worse from A to B."""
    na = {p["id"]: noc(p["ious"], 0.90) for p in pa}
    nb = {p["id"]: noc(p["ious"], 0.90) for p in pb}
    common = na.keys() & nb.keys()
    return {"paired": len(common),
            "better": sum(nb[i] < na[i] for i in common),
            "worse": sum(nb[i] > na[i] for i in common)}
