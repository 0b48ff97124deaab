"""The command line end to end: JSON shape, the reference predictors on real images, history, plots, report."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from training.evaluation.cli import main

from .conftest import DATASETS, ROOT

needs_data = pytest.mark.skipif(not (DATASETS / "GrabCut").is_dir(), reason=f"no benchmarks under {DATASETS}")
KEYS = {"dataset", "instances", "noc85", "noc90", "nof90", "spc", "device", "model_version"}


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.e2e
@needs_data
def test_module_entry_oracle_json_on_three_benchmarks(tmp_path):
    db = tmp_path / "h.sqlite"
    proc = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--checkpoint", "oracle", "--datasets", "GrabCut,Berkeley,DAVIS",
         "--limit", "3", "--workers", "1", "--json", "--db", str(db), "--data-root", str(DATASETS)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]   # stdout is JSON lines only
    assert [r["dataset"] for r in rows] == ["GrabCut", "Berkeley", "DAVIS"]
    for r in rows:
        assert KEYS <= set(r)
        assert r["instances"] == 3 and r["noc85"] == 1.0 and r["noc90"] == 1.0 and r["nof90"] == 0
        assert r["model_version"] == "oracle" and r["device"] == "cpu" and r["checkpoint_hash"] == "reference:oracle"
        assert len(r["miou"]) == 20
    assert "NoC@85  NoC@90" in proc.stderr and "GrabCut" in proc.stderr   # the paper table goes to stderr
    assert db.stat().st_size > 0


@pytest.mark.e2e
@needs_data
def test_grabcut_baseline_with_workers_history_compare_plot_and_report(tmp_path, capsys):
    db, report, plots = str(tmp_path / "h.sqlite"), tmp_path / "report", tmp_path / "plots"
    common = ["--db", db, "--data-root", str(DATASETS), "--no-progress"]
    assert main(["--checkpoint", "oracle", "--datasets", "GrabCut,Berkeley", "--limit", "2", "--workers", "1",
                 "--tag", "ref"] + common) == 0
    capsys.readouterr()
    assert main(["--checkpoint", "grabcut", "--datasets", "GrabCut,Berkeley", "--limit", "2", "--workers", "2",
                 "--json", "--report", str(report), "--report-k", "1"] + common) == 0
    out = capsys.readouterr()
    rows = _json_lines(out.out)
    assert len(rows) == 2
    for r in rows:
        assert KEYS <= set(r) and r["workers"] == 2
        assert r["model_version"].startswith("grabcut-opencv")
        assert 1.0 <= r["noc85"] <= r["noc90"] <= 20.0 and 0 <= r["nof90"] <= 2
        assert r["spc"] > 0 and 0.0 < r["miou"][0] <= r["miou"][19] + 0.3
    version = rows[0]["model_version"]

    assert main(["history", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert listing.count("oracle") >= 2 and version in listing and "partial" in listing

    assert main(["history", "--compare", "oracle", version, "--db", db]) == 0
    cmp_text = capsys.readouterr().out
    assert "GrabCut" in cmp_text and "Berkeley" in cmp_text and "+" in cmp_text

    assert main(["plot", "--versions", f"oracle,{version}", "--out", str(plots), "--db", db]) == 0
    for name in ("miou_curves.png", "noc90_by_version.png"):
        with Image.open(plots / name) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
            assert np.asarray(im.convert("L")).std() > 10   # not a blank canvas

    index = (report / "index.html").read_text()
    assert "GrabCut" in index and "Berkeley" in index
    pngs = sorted(report.rglob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 20_000 for p in pngs)
    assert "| 1 |" in (report / "report.md").read_text()


def test_unknown_version_is_a_clean_error(tmp_path, capsys):
    db = str(tmp_path / "h.sqlite")
    assert main(["history", "--compare", "nope", "other", "--db", db]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["plot", "--versions", "nope", "--out", str(tmp_path), "--db", db]) == 2


@pytest.mark.e2e
@needs_data
def test_bad_checkpoint_and_unknown_data_set_fail_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04 this is a pickle, not a checkpoint")
    common = ["--datasets", "GrabCut", "--limit", "2", "--db", str(tmp_path / "h.sqlite"), "--no-progress",
              "--data-root", str(DATASETS)]
    assert main(["--checkpoint", str(tmp_path / "missing.safetensors")] + common) == 2
    assert main(["--checkpoint", str(bad), "--workers", "1"] + common) == 2
    assert "pickle" in capsys.readouterr().err
    assert main(["--checkpoint", "oracle", "--datasets", "NoSuchSet"] + common[2:]) == 2
    assert "unknown data set" in capsys.readouterr().err


@pytest.mark.e2e
@needs_data
def test_network_checkpoint_is_evaluated_and_hashed(tmp_path, capsys, tiny_checkpoint):
    import hashlib

    want = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert main(["--checkpoint", str(tiny_checkpoint), "--datasets", "GrabCut", "--limit", "1", "--workers", "1",
                 "--json", "--no-progress", "--db", str(tmp_path / "h.sqlite"), "--data-root", str(DATASETS),
                 "--device", "cpu"]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    assert row["checkpoint_hash"] == want and row["model_version"] == "tiny" and row["device"] == "cpu"
    assert row["instances"] == 1 and 1 <= row["noc90"] <= 20 and row["spc"] > 0


@pytest.mark.e2e
@needs_data
def test_predictor_options_make_an_ablation_version(tmp_path, capsys, tiny_checkpoint):
    assert main(["--checkpoint", str(tiny_checkpoint), "--datasets", "GrabCut", "--limit", "1", "--workers", "1",
                 "--json", "--no-progress", "--db", str(tmp_path / "h.sqlite"), "--data-root", str(DATASETS),
                 "--device", "cpu", "--predictor-options", "refine=false"]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    assert row["model_version"] == "tiny[refine=False]"
    assert main(["--checkpoint", str(tiny_checkpoint), "--datasets", "GrabCut", "--limit", "1",
                 "--predictor-options", "refien=false", "--no-record"]) == 2
    assert "refien" in capsys.readouterr().err
