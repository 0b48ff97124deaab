"""The fine-tuning job's pieces that need no queue: the promotion rule, the checked pull of
Label Studio-format annotations (bad ones skipped with a logged reason), the train/holdout split,
and the FINETUNE_* settings. Images go through the backend's real fetcher (local files)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from backend.config import Config
from backend.labelstudio.fetch import ImageFetcher
from backend.labelstudio.masks import mask_to_rle, rle_to_mask
from backend.labelstudio import pull
from backend.finetune import BoxPaired, FinetuneSettings, Paired, decide
from backend.labelstudio.make_export import brush_result


# -- the promotion rule ----------------------------------------------------------------------------
def paired(name, parent, candidate):
    """A Paired comparison from two lists of per-instance NoC@90 (instance ids i0, i1, ...)."""
    return Paired(name, {f"i{k}": v for k, v in enumerate(parent)}, {f"i{k}": v for k, v in enumerate(candidate)})


HOLD_BETTER = ([6, 8, 4, 6], [4, 6, 4, 4])                # mean 6.00 -> 4.50, 3 better, none worse


@pytest.mark.parametrize("hold, bench, margin, gain, promote, needle", [
    (HOLD_BETTER, [("GrabCut", [3, 3], [3, 3])], 0.1, 0.0, True, "holdout NoC@90 6.00 -> 4.50"),
    (([6, 6], [6, 6]), [], 0.1, 0.0, False, "not better"),
    (([6, 6], [7, 6]), [], 0.1, 0.0, False, "not better"),
    (([6, 6], [6, 5]), [], 0.1, 0.75, False, "by more than 0.75"),
    (HOLD_BETTER, [("GrabCut", [3, 3], [3, 4])], 0.5, 0.0, True, "GrabCut NoC@90 3.00 -> 3.50"),
    (HOLD_BETTER, [("GrabCut", [3, 3], [2, 2]), ("Berkeley", [4, 4], [5, 4])], 0.1, 0.0, False,
     "Berkeley NoC@90 got worse by 0.50 (4.00 -> 4.50), more than the allowed 0.1; 1 of 2 instances worse (i0)"),
    # The mean improved thanks to one instance while more instances got worse: paired, refused.
    (([20, 3, 3, 3], [5, 4, 4, 3]), [], 0.1, 0.0, False, "only 1 of 4 instances got better and 2 worse"),
])
def test_promotion_rule(hold, bench, margin, gain, promote, needle):
    ok, reason, confidence = decide(paired("holdout", *hold), [paired(*b) for b in bench], margin, gain)
    assert ok is promote and needle in reason, reason
    assert confidence == "normal"


def test_the_decision_names_every_regression():
    """Issue 14: a rejection named Berkeley but not GrabCut, which also got worse."""
    bench = [paired("GrabCut", [3, 3, 3], [5, 3, 4]), paired("Berkeley", [4, 4], [6, 5])]
    ok, reason, _ = decide(paired("holdout", [6, 6], [6, 7]), bench, 0.1)
    assert not ok
    for needle in ("holdout NoC@90 6.50 is not better than the parent's 6.00",
                   "GrabCut NoC@90 got worse by 1.00 (3.00 -> 4.00)", "2 of 3 instances worse (i0, i2)",
                   "Berkeley NoC@90 got worse by 1.50 (4.00 -> 5.50)", "2 of 2 instances worse"):
        assert needle in reason, reason


def box(parent, candidate):
    return BoxPaired({f"i{k}": v for k, v in enumerate(parent)}, {f"i{k}": v for k, v in enumerate(candidate)})


def test_a_parent_that_reads_boxes_must_keep_its_box_alone():
    """Clicks got better, the box prompt (never used by the NoC runs) got worse: refused, named."""
    ok, reason, _ = decide(paired("holdout", *HOLD_BETTER), [], 0.1, box=box([0.9, 0.8], [0.8, 0.8]), box_margin=0.02)
    assert not ok
    assert "holdout box alone mean IoU 0.850 -> 0.800, a drop of 0.050, more than the allowed 0.02" in reason
    assert "1 of 2 instances worse (i0)" in reason
    ok, reason, _ = decide(paired("holdout", *HOLD_BETTER), [], 0.1, box=box([0.9, 0.8], [0.89, 0.8]), box_margin=0.02)
    assert ok and "holdout box alone mean IoU 0.850 -> 0.845" in reason, reason
    assert decide(paired("holdout", *HOLD_BETTER), [], 0.1, box=None)[0]


def test_a_small_holdout_makes_a_low_confidence_decision():
    ok, reason, confidence = decide(paired("holdout", [6, 6], [4, 5]), [], 0.1, confident_holdout=10)
    assert ok and confidence == "low"
    assert "low confidence: only 2 holdout instance(s), under FINETUNE_CONFIDENT_HOLDOUT=10" in reason
    assert decide(paired("holdout", [6] * 10, [5] * 10), [], 0.1, confident_holdout=10)[2] == "normal"


def test_benchmark_instances_whose_image_is_in_the_project_are_left_out(tmp_path):
    """Issue 14: the first N Berkeley instances included the project's own annotated images. Here
    the project holds two Berkeley images (one re-encoded as PNG, under other names)."""
    from training.evaluation.datasets import load_dataset
    from backend.finetune import benchmark_samples, image_digest

    first = load_dataset("Berkeley", limit=4)
    Image.open(first[0].image).save(tmp_path / "task-1.png")
    (tmp_path / "task-2.jpg").write_bytes(open(first[2].image, "rb").read())
    project = {image_digest(p) for p in sorted(tmp_path.iterdir())}
    kept, excluded = benchmark_samples("Berkeley", 3, project)
    assert excluded == [first[0].sample_id, first[2].sample_id]
    assert [s.sample_id for s in kept] == [first[1].sample_id, first[3].sample_id,
                                           load_dataset("Berkeley", limit=5)[4].sample_id]
    assert [s.sample_id for s in benchmark_samples("Berkeley", 3, set())[0]] == [s.sample_id for s in first[:3]]


def test_too_few_annotations_name_the_settings():
    from backend.finetune import too_few
    s = FinetuneSettings.from_env({})
    report = {"train_regions": 3, "train_tasks": [1, 2, 3], "holdout_tasks": [4, 5], "skipped": []}
    msg = too_few(report, s)
    assert "3 training region(s) in 3 task(s) and 2 holdout task(s)" in msg
    assert f"FINETUNE_MIN_TRAIN={s.min_train}" in msg and f"FINETUNE_MIN_HOLDOUT={s.min_holdout}" in msg
    assert too_few(dict(report, train_regions=4), s) == ""
    assert "FINETUNE_MIN_HOLDOUT=3" in too_few(dict(report, train_regions=9), FinetuneSettings.from_env({}, min_holdout=3))


def test_settings_from_env_and_overrides():
    s = FinetuneSettings.from_env({"FINETUNE_STEPS": "12", "FINETUNE_BENCH_DATASETS": "", "FINETUNE_LR": "3e-4",
                                   "FINETUNE_KEEP_WORKDIR": "yes"}, batch_size=3)
    assert (s.steps, s.bench_datasets, s.lr, s.keep_workdir, s.batch_size) == (12, "", 3e-4, True, 3)
    assert FinetuneSettings.from_env({}).bench_datasets == "GrabCut,Berkeley"
    with pytest.raises(ValueError, match="FINETUNE_STEPS"):
        FinetuneSettings.from_env({"FINETUNE_STEPS": "many"})
    with pytest.raises(ValueError, match="unknown"):
        FinetuneSettings.from_env({}, stepz=3)


# -- the split -------------------------------------------------------------------------------------
def test_split_is_deterministic_and_stable_as_the_project_grows():
    a_train, a_hold = pull.split_tasks(range(1, 41), 0.2, 0)
    b_train, b_hold = pull.split_tasks(range(1, 201), 0.2, 0)
    assert pull.split_tasks(reversed(range(1, 41)), 0.2, 0) == (a_train, a_hold)
    assert set(a_hold) <= set(b_hold) and not set(a_hold) & set(b_train)   # no task changes side
    assert 0.1 < len(b_hold) / 200 < 0.3
    train, hold = pull.split_tasks([1, 2, 3], 0.0, 2)       # topped up to min_holdout
    assert len(hold) == 2 and len(train) == 1
    assert pull.split_tasks([5], 0.9, 2) == ([5], [])        # never everything


# -- the checked pull ------------------------------------------------------------------------------
def _img(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _disk(h, w, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < r * r


def _task(tid, url, results, cancelled=False):
    return {"id": tid, "data": {"image": url},
            "annotations": [{"id": 100 + tid, "was_cancelled": cancelled, "result": results,
                             "updated_at": f"2026-02-0{tid % 9 + 1}T00:00:00Z"}]}


def test_bad_annotations_are_skipped_with_a_logged_reason(tmp_path, caplog):
    imgs = tmp_path / "images"
    imgs.mkdir()
    h, w = 60, 80
    for i in range(1, 8):
        _img(imgs / f"im{i}.png", h, w, i)
    good = _disk(h, w, 15)
    wrong_rle = brush_result(_disk(40, 40, 10))
    wrong_rle["original_width"], wrong_rle["original_height"] = w, h          # RLE of 40x40 declared 80x60
    poly = {"type": "polygonlabels", "from_name": "poly", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"points": [[10, 10], [90, 10], [90, 90], [10, 90]],
                                            "polygonlabels": ["Object"]}}
    tasks = [
        _task(1, "/data/local-files/?d=im1.png", [brush_result(good)]),
        _task(2, "/data/local-files/?d=im2.png", [brush_result(np.zeros((h, w), bool))]),     # empty mask
        _task(3, "/data/local-files/?d=im3.png", [wrong_rle]),                               # wrong size
        _task(4, "/data/local-files/?d=deleted.png", [brush_result(good)]),                  # deleted image
        _task(5, "/data/local-files/?d=im5.png", [brush_result(_disk(30, 30, 8))]),          # image is 80x60
        _task(6, "/data/local-files/?d=im6.png", [brush_result(good)], cancelled=True),      # not counted
        _task(7, "/data/local-files/?d=im7.png", [poly, {"type": "keypointlabels", "value": {}},
                                                   brush_result(_disk(h, w, 3))]),           # polygon + tiny
    ]
    fetcher = ImageFetcher(Config.from_env({"LOCAL_FILES_ROOT": str(imgs)}))
    caplog.set_level(logging.WARNING, logger="backend.labelstudio.pull")
    report = pull.build_dataset(tasks, fetcher, tmp_path / "out", holdout_fraction=0.0, min_holdout=1,
                                min_area=100)
    reasons = {(s["task"], s["reason"].split(":")[0].split(" (")[0]) for s in report.skipped}
    assert reasons == {(2, "empty mask"), (3, "wrong size"), (4, "image unavailable"),
                       (5, "wrong size"), (7, "mask of 25 px < 100 px")}, report.skipped
    for s in report.skipped:                       # each one is in the log with its task and reason
        assert any(f"task {s['task']} " in r.getMessage() and s["reason"] in r.getMessage()
                   for r in caplog.records)
    assert "local image not found" in next(s["reason"] for s in report.skipped if s["task"] == 4)
    assert (report.tasks, report.annotations, report.kept) == (7, 6, 2)
    assert sorted(report.train_tasks + report.holdout_tasks) == [1, 7] and len(report.holdout_tasks) == 1
    # The written exports are what training.data.LabelStudioSource reads: the polygon became RLE.
    from training.data import LabelStudioSource
    exported = json.loads((tmp_path / "out" / "train.json").read_text()) + \
        json.loads((tmp_path / "out" / "holdout.json").read_text())
    src = LabelStudioSource(exported, image_dir=tmp_path / "out" / "images", min_area=100)
    masks = {it.id.split("/")[0]: src.load(i, np.random.default_rng(0)).mask for i, it in enumerate(src.items)}
    assert np.array_equal(masks["1"], good)
    poly_mask = masks["7"]
    assert poly_mask[10:50, 10:70].all() and not poly_mask[:5].any()
    r7 = next(t for t in exported if t["id"] == 7)["annotations"][0]["result"][0]
    assert np.array_equal(rle_to_mask(r7["value"]["rle"], h, w), poly_mask)
    assert mask_to_rle(poly_mask) == r7["value"]["rle"]
    held = pull.holdout_instances(tmp_path / "out")
    assert len(held) == 1 and held[0][1].shape[:2] == held[0][2].shape == (h, w)
    # the id names the task and stays the same in every job (a parent's earlier results are reused)
    assert held[0][0].startswith("t") and [i for i, _, _ in pull.holdout_instances(tmp_path / "out")] == [held[0][0]]
