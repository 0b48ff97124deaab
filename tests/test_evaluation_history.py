"""The run history on SQLite (temporary file) and on the real PostgreSQL at 127.0.0.1:5432."""
import os
import uuid

import numpy as np
import pytest
import sqlalchemy as sa

from training.evaluation.history import (compare, engine_for, known_ious, list_runs, record_run, resolve_url,
                                        select_runs)
from training.evaluation.reference import OraclePredictor
from training.evaluation.protocol import Protocol
from training.evaluation.runner import evaluate_dataset
from training.evaluation.samples import samples_from_arrays
from training.evaluation.tables import compare_table, history_table

PG_ADMIN = os.environ.get("SIMCLICK_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class Late:
    """Returns the ground truth from click `n` on."""

    needs_gt, device = True, "cpu"

    def __init__(self, n, version):
        self.n, self.version = n, version

    def open(self, image, gt):
        self.gt, self.k = gt.astype(np.float32), 0
        return self

    def add_click(self, x, y, positive):
        self.k += 1
        return self.gt if self.k >= self.n else np.zeros_like(self.gt)


def _samples(n=3):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        m = np.zeros((24, 24), bool)
        m[4:20, 3 + i:21] = True
        out.append((rng.integers(0, 255, (24, 24, 3), dtype=np.uint8), m))
    return samples_from_arrays(out)


def _exercise(db):
    s = _samples()
    r1 = evaluate_dataset(Late(4, "v1"), s, dataset="GrabCut", progress=False)
    r2 = evaluate_dataset(Late(2, "v2"), s, dataset="GrabCut", progress=False)
    r3 = evaluate_dataset(OraclePredictor(), s, dataset="DAVIS", progress=False)
    id1 = record_run(r1, db, checkpoint="a.safetensors", checkpoint_hash="aa" * 32, tag="baseline", commit="abc")
    id2 = record_run(r2, db, checkpoint="b.safetensors", checkpoint_hash="bb" * 32, notes="longer schedule")
    id3 = record_run(r3, db, checkpoint="oracle", checkpoint_hash="reference:oracle", complete=False)
    rows = list_runs(db)
    assert [r["id"] for r in rows] == [id1, id2, id3]
    assert rows[0]["model_version"] == "v1" and rows[0]["noc90"] == 4.0 and rows[0]["tag"] == "baseline"
    assert rows[0]["git_commit"] == "abc" and rows[1]["notes"] == "longer schedule"
    assert rows[2]["complete"] is False and rows[2]["device"] == "cpu"
    assert [r["id"] for r in list_runs(db, dataset="grabcut")] == [id1, id2]
    full = list_runs(db, model_version="v2", full=True)[0]
    assert full["per_instance"][0]["ious"][:2] == [0.0, 1.0]
    assert full["per_instance"][0]["clicks"][0][2] is True
    assert full["metrics"]["miou"][1] == 1.0 and full["protocol"]["threshold"] == 0.49
    assert select_runs(str(id2), db)["GrabCut"]["model_version"] == "v2"
    assert select_runs("v1", db)["GrabCut"]["id"] == id1
    with pytest.raises(KeyError):
        select_runs("v9", db)
    rows = compare("v1", "v2", db)
    (gc,) = [r for r in rows if r["dataset"] == "GrabCut"]
    assert gc["noc90"] == (4.0, 2.0, -2.0) and gc["nof90"] == (0, 0, 0)
    assert gc["better"] == 3 and gc["worse"] == 0 and gc["paired"] == 3
    text = compare_table("v1", "v2", compare(str(id1), str(id2), db))
    assert "-2.00" in text and "3/0 of 3" in text
    assert "baseline" in history_table(list_runs(db)) and "partial" in history_table(list_runs(db))
    # A checkpoint's earlier per-instance results, for a later run to reuse: same protocol only.
    assert known_ious("aa" * 32, "grabcut", {"threshold": 0.49, "box": False}, db) == {
        p["id"]: p["ious"] for p in list_runs(db, model_version="v1", full=True)[0]["per_instance"]}
    assert known_ious("aa" * 32, "GrabCut", {"coarse_size": 256}, db) == {}
    assert known_ious("cc" * 32, "GrabCut", {}, db) == {}
    short = evaluate_dataset(Late(3, "v1"), s[:1], dataset="GrabCut", protocol=Protocol(curve=False), progress=False)
    short_id = record_run(short, db, checkpoint="a.safetensors", checkpoint_hash="aa" * 32,
                          extra_protocol={"coarse_size": 256})
    assert known_ious("aa" * 32, "GrabCut", {"coarse_size": 256}, db) == {short.instances[0].sample_id: [0.0, 0.0, 1.0]}
    assert compare(str(id1), str(short_id), db)[0]["noc90"][2] == -1.0   # no mIoU curve, still compared


def test_history_on_sqlite(tmp_path):
    db = str(tmp_path / "sub" / "runs.sqlite")
    _exercise(db)
    assert (tmp_path / "sub" / "runs.sqlite").stat().st_size > 0
    assert resolve_url(db).startswith("sqlite:///")


@pytest.fixture
def pg_url():
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(sa.text("select 1"))
    except Exception as e:  # pragma: no cover - only where no server runs
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN}: {e}")
    name = f"simclick_eval_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        engine_for(url).dispose()
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.e2e
def test_history_on_postgresql(pg_url):
    _exercise(pg_url)
    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        assert c.execute(sa.text("select count(*) from evaluation_runs")).scalar() == 4
        kind = c.execute(sa.text("select data_type from information_schema.columns where "
                                 "table_name='evaluation_runs' and column_name='per_instance'")).scalar()
    eng.dispose()
    assert kind == "json"


def test_plain_postgresql_url_uses_psycopg3():
    assert resolve_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
