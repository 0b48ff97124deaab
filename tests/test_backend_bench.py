"""backend.bench and backend.replaybench share their setup (backend.bench.start_bench): both run
end to end on one Berkeley image with the small test model."""
from __future__ import annotations

import json

import pytest

from backend import bench, replaybench
from tests.conftest import DATASETS

BERKELEY = DATASETS / "Berkeley"


@pytest.fixture
def args(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)     # replaybench's three kinds, no Redis state
    if not (BERKELEY / "masks").is_dir():
        pytest.skip(f"no Berkeley data under {BERKELEY}")
    return ["--data", str(BERKELEY), "--images", "1", "--clicks", "2", "--checkpoint", str(tiny_checkpoint),
            "--device", "cpu", "--json"]


@pytest.mark.e2e  # slow (1.1 s of CPU): the unit tier stays within a minute (issue 24)
def test_bench_runs_on_the_shared_setup(args, capsys):
    assert bench.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 1 and report["ms_per_click"]["n"] == 2
    assert len(report["mean_iou_per_click"]) == 2 and report["model_version"] == "tiny"


@pytest.mark.e2e  # slow (1.1 s of CPU): the unit tier stays within a minute (issue 24)
def test_replaybench_runs_on_the_shared_setup(args, capsys):
    assert replaybench.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 1 and set(report["p50_ms_by_click"]) == {"cached", "replay", "cold"}
    assert report["identical_masks"] == "2/2"


def test_start_bench_without_masks(tmp_path, capsys):
    assert bench.start_bench(tmp_path, 1) is None
    assert "no masks under" in capsys.readouterr().err


@pytest.mark.e2e          # converts the model to OpenVINO and serves it twice: seconds of CPU
def test_bench_compares_runtimes_in_one_run(args, capsys, monkeypatch, tmp_path):
    from model.runtime import installed

    if not installed("openvino"):
        pytest.skip("openvino is not installed")
    monkeypatch.setenv("INFERENCE_CACHE", str(tmp_path))
    assert bench.main(args + ["--runtimes", "torch,openvino"]) == 0
    first, second = json.loads(capsys.readouterr().out)
    assert (first["runtime"], second["runtime"]) == ("torch", "openvino")
    assert second["ms_per_click"]["speedup"]["p50"] > 0 and "speedup" not in first["ms_per_click"]
    assert first["mean_iou_per_click"] == second["mean_iou_per_click"]      # the same masks
