"""Metric arithmetic: IoU with an ignore region, NoC/NoF budgets, mIoU@k, SPC, the run loop's bookkeeping."""
from functools import partial

import numpy as np
import pytest

from training.evaluation.metrics import failed, iou, miou_curve, noc, summarize
from training.evaluation.protocol import Protocol
from training.evaluation.reference import OraclePredictor
from training.evaluation.runner import evaluate_dataset, run_instance
from training.evaluation.samples import LoadedSample, samples_from_arrays


def test_iou_counts_only_non_ignored_pixels():
    gt = np.zeros((4, 4), bool)
    gt[0, :] = True                       # 4 object pixels
    pred = np.zeros_like(gt)
    pred[0, :2] = True                    # 2 TP
    pred[3, 3] = True                     # 1 FP
    assert iou(gt, pred) == pytest.approx(2 / 5)
    ignore = np.zeros_like(gt)
    ignore[3, 3] = True
    ignore[0, 3] = True                   # one FN pixel and the FP are ignored
    assert iou(gt, pred, ignore) == pytest.approx(2 / 3)
    assert iou(np.zeros_like(gt), np.zeros_like(gt)) == 1.0


def test_noc_and_nof_budgets():
    ious = [0.5, 0.86, 0.89, 0.91] + [0.95] * 16
    assert noc(ious, 0.85) == 2
    assert noc(ious, 0.90) == 4
    never = [0.8] * 20
    assert noc(never, 0.85) == 20 and failed(never, 0.90)
    late = [0.8] * 20 + [0.92] * 5      # reaches 0.90 at click 21: NoC20 = 20 (failed), NoC100 = 21
    assert noc(late, 0.90) == 20 and failed(late, 0.90)
    assert noc(late, 0.90, 100) == 21 and not failed(late, 0.90, 100)
    assert noc([0.9] + [0.0] * 19, 0.90) == 1   # the first time it is reached counts


def test_summarize_means_and_curve():
    a = [0.5, 0.86, 0.91] + [0.95] * 17      # NoC85 2, NoC90 3
    b = [0.2] * 20                           # never: 20, 20
    c = [0.88] * 20 + [0.93]                 # NoC85 1, NoC90 20 (21 with 100 clicks)
    m = summarize([a, b, c], total_seconds=6.1, total_clicks=61, max_clicks=100)
    assert m["instances"] == 3
    assert m["noc85"] == pytest.approx((2 + 20 + 1) / 3)
    assert m["noc90"] == pytest.approx((3 + 20 + 20) / 3)
    assert m["nof90"] == 2 and m["nof85"] == 1
    assert m["noc100_90"] == pytest.approx((3 + 100 + 21) / 3)
    assert m["nof100_90"] == 1
    assert m["spc"] == pytest.approx(0.1)
    assert len(m["miou"]) == 20
    assert m["miou"][0] == pytest.approx((0.5 + 0.2 + 0.88) / 3)
    assert m["miou"][19] == pytest.approx((0.95 + 0.2 + 0.88) / 3)
    with pytest.raises(ValueError):
        miou_curve([[0.5] * 10])


class AfterN:
    """Returns the ground truth from the n-th click on (test predictor with a known NoC)."""

    needs_gt = True
    version, device = "after-n", "cpu"

    def __init__(self, n):
        self.n = n

    def open(self, image, gt):
        self.gt, self.k = gt.astype(np.float32), 0
        return self

    def add_click(self, x, y, positive):
        self.k += 1
        return self.gt if self.k >= self.n else np.zeros_like(self.gt)


def _square_sample(size=32):
    gt = np.zeros((size, size), bool)
    gt[8:24, 8:24] = True
    return LoadedSample("sq", np.zeros((size, size, 3), np.uint8), gt, None)


def test_run_instance_runs_to_20_clicks_and_noc_counts_from_the_same_sequence():
    r = run_instance(AfterN(3), _square_sample())
    assert len(r.ious) == 20 and len(r.clicks) == 20
    assert r.ious[:3] == [0.0, 0.0, 1.0]
    assert r.noc(0.85) == 3 and r.noc(0.90) == 3
    # the first clicks are the same positive click sequence whatever the predictor
    assert r.clicks[0] == (15, 15, True)


def test_hundred_click_budget_continues_only_until_090():
    r = run_instance(AfterN(30), _square_sample(), Protocol(max_clicks=100))
    assert len(r.ious) == 30 and r.noc(0.90, 100) == 30
    r = run_instance(AfterN(500), _square_sample(), Protocol(max_clicks=100))
    assert len(r.ious) == 100 and r.noc(0.90, 100) == 100


def test_threshold_is_049():
    class Half:
        version, device = "half", "cpu"

        def open(self, image):
            return self

        def add_click(self, x, y, positive):
            return np.full((32, 32), 0.495, np.float32)

    full = LoadedSample("all", np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), bool), None)
    assert run_instance(Half(), full).ious[0] == 1.0                       # 0.495 > 0.49
    assert run_instance(Half(), full, Protocol(threshold=0.5)).ious[0] == 0.0


def test_wrong_probability_shape_is_an_error():
    class Small:
        def open(self, image):
            return self

        def add_click(self, x, y, positive):
            return np.zeros((4, 4), np.float32)

    with pytest.raises(ValueError, match="expected"):
        run_instance(Small(), _square_sample())


def test_in_memory_samples_and_dataset_metrics():
    rng = np.random.default_rng(1)
    pairs = []
    for n in range(3):
        img = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
        m = np.zeros((40, 50), np.uint8)
        m[5 + n:30, 10:40 - n] = 1
        m[0:2, :] = 255                   # {0, 1, 255}: 255 becomes the ignore region
        pairs.append((img, m))
    samples = samples_from_arrays(pairs, prefix="holdout")
    loaded = samples[0].load()
    assert loaded.ignore is not None and loaded.ignore[:2].all() and not loaded.gt[:2].any()
    res = evaluate_dataset(AfterN(2), samples, dataset="holdout", progress=False)
    m = res.to_json()
    assert m["dataset"] == "holdout" and m["instances"] == 3 and m["model_version"] == "after-n"
    assert m["noc85"] == 2.0 and m["noc90"] == 2.0 and m["nof90"] == 0
    assert m["miou"][0] == 0.0 and m["miou"][1] == 1.0
    assert m["spc"] >= 0 and m["device"] == "cpu"
    oracle = evaluate_dataset(OraclePredictor(), samples, progress=False).metrics()
    assert oracle["noc90"] == 1.0 and oracle["miou"] == [1.0] * 20


def _broken_factory():
    raise RuntimeError("cannot build this predictor")


@pytest.mark.e2e  # slow (starts Python processes that import torch): the unit tier stays within a minute (issue 24)
def test_a_predictor_that_fails_to_load_in_the_workers_raises_instead_of_hanging():
    samples = samples_from_arrays([(np.zeros((8, 8, 3), np.uint8), np.eye(8, dtype=bool))] * 2)
    with pytest.raises(RuntimeError, match="cannot build"):
        evaluate_dataset(_broken_factory, samples, workers=2, progress=False)
    with pytest.raises(TypeError, match="picklable"):
        evaluate_dataset(OraclePredictor(), samples, workers=2, progress=False)


def test_without_the_curve_an_instance_stops_at_090_with_the_same_noc():
    """Protocol(curve=False): the protocol's stop rule, what a promotion gate needs."""
    full = run_instance(AfterN(3), _square_sample())
    short = run_instance(AfterN(3), _square_sample(), Protocol(curve=False))
    assert len(full.ious) == 20 and short.ious == full.ious[:3] and short.clicks == full.clicks[:3]
    assert (short.noc(0.85), short.noc(0.90)) == (full.noc(0.85), full.noc(0.90)) == (3, 3)
    never = run_instance(AfterN(500), _square_sample(), Protocol(curve=False))
    assert len(never.ious) == 20 and never.noc(0.90) == 20           # a failure still costs its 20 clicks
    m = summarize([short.ious, never.ious], 1.0, 23)
    assert (m["noc90"], m["nof90"], m["miou"]) == (11.5, 1, [])       # no curve from stopped instances


@pytest.mark.e2e  # slow (starts Python processes that import torch): the unit tier stays within a minute (issue 24)
def test_several_data_sets_in_one_pool_of_workers():
    from training.evaluation.runner import evaluate_datasets

    rng = np.random.default_rng(2)
    pairs = []
    for n in range(3):
        m = np.zeros((30, 30), bool)
        m[5:25, 5 + n:25] = True
        pairs.append((rng.integers(0, 255, (30, 30, 3), dtype=np.uint8), m))
    sets = {"a": samples_from_arrays(pairs[:2], prefix="a"), "b": samples_from_arrays(pairs[2:], prefix="b")}
    seen = []
    for workers in (1, 2):
        out = evaluate_datasets(partial(OraclePredictor), sets, Protocol(curve=False), workers=workers,
                                on_result=lambda name, r: seen.append((name, r.sample_id)))
        assert {k: [r.sample_id for r in v.instances] for k, v in out.items()} == {"a": ["a00000", "a00001"],
                                                                                 "b": ["b00000"]}
        assert all(r.ious == [1.0] for v in out.values() for r in v.instances)
        assert out["a"].dataset == "a" and out["a"].metrics()["noc90"] == 1.0
    assert seen == [("a", "a00000"), ("a", "a00001"), ("b", "b00000")] * 2
