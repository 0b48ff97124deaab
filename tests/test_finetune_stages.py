"""run_finetune as a sequence of stages (backend/finetune/job.py), and the training progress through
train()'s on_step callback instead of a thread reading log.csv."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from backend.finetune import (Eta, Evaluation, FinetuneJob, FinetuneSettings, decide_promotion, job, run_finetune,
                              step_reporter, train_candidate)
from backend.finetune import candidate as candidate_module
from backend.finetune.evaluation import EvalSet


def make_job(tmp_path, progress, **settings) -> FinetuneJob:
    parent = SimpleNamespace(name="p5-base", checkpoint=tmp_path / "parent.safetensors", info={})
    return FinetuneJob("5", "job-1", FinetuneSettings(**settings), progress, registry=None,
                       work=tmp_path / "work", parent=parent, name="p5-v001", timings={})


def test_step_reports_are_throttled_and_the_last_one_is_sent(tmp_path):
    calls = []
    job = make_job(tmp_path, lambda stage, percent, **kw: calls.append((stage, percent, kw)), steps=5)
    times = iter([0.0, 0.2, 0.5, 1.3, 1.4])
    on_step = step_reporter(job, Eta(5, {}), every=1.0, clock=lambda: next(times))
    for step in range(1, 6):
        on_step(step, 5, {"loss": 0.5})
    assert [(c[0], c[1], c[2]["step"], c[2]["detail"]) for c in calls] == [
        ("train", 34, 1, "step 1/5"), ("train", 68, 4, "step 4/5"), ("train", 80, 5, "step 5/5")]
    assert all("eta_s" in c[2] for c in calls)


@pytest.mark.parametrize("gpus", [1, 2])
def test_train_stage_reports_steps_from_either_path(tmp_path, monkeypatch, gpus):
    """One process: train()'s on_step; several (torchrun children): torchrun_train's, from log.csv."""
    import training.distributed
    import training.train

    def fake(cfg, *args, on_step=None, **kw):
        for step in range(1, cfg.steps + 1):
            on_step(step, cfg.steps, {"loss": 1.0 / step})
        return {"steps": cfg.steps, "last_checkpoint": str(tmp_path / "last.safetensors"), "device": "cpu"}

    monkeypatch.setattr(training.train, "train", fake)
    monkeypatch.setattr(training.distributed, "torchrun_train", fake)
    monkeypatch.setattr(candidate_module, "make_candidate",
                        lambda trained, parent, name, routing, settings: (trained, {"kind": "trained", "routing": None}))
    calls = []
    job = make_job(tmp_path, lambda stage, percent, **kw: calls.append((stage, percent, kw)), steps=3,
                   batch_size=4, gpus=gpus)
    tcfg, trained, candidate, made = train_candidate(job, Eta(3, {}), None)
    assert trained["resumed"] is False and trained["steps"] == 3 and tcfg.steps == 3
    assert candidate == tmp_path / "last.safetensors" and made["kind"] == "trained"
    assert calls[0][:2] == ("train", 23) and calls[0][2]["detail"] == "starting from p5-base"
    assert calls[-1][:2] == ("train", 80) and calls[-1][2]["step"] == 3
    assert "train_s" in job.timings


def test_a_routed_network_trains_on_the_project_alone(tmp_path):
    """The router is fitted before training: a network that will answer only the project's images
    (routed) trains with FINETUNE_ROUTED_REHEARSAL of base data and no distillation (it teaches on
    the base samples); one that will answer every image rehearses FINETUNE_REHEARSAL of it."""
    j = make_job(tmp_path, lambda *a, **k: None, rehearsal=0.5, routed_rehearsal=0.0, distill=1.0)
    routed, alone = job.train_config(j, routed=True), job.train_config(j, routed=False)
    assert (routed.rehearsal, routed.distill, routed.val_fraction) == (0.0, 0.0, 0.0)
    assert (alone.rehearsal, alone.distill, alone.val_fraction) == (0.5, 1.0, 0.05)
    some = job.train_config(make_job(tmp_path, lambda *a, **k: None, rehearsal=0.5, routed_rehearsal=0.2,
                                     distill=1.0), routed=True)
    assert (some.rehearsal, some.distill) == (0.2, 1.0)


def _set(label, parent, candidate, excluded=()):
    """An evaluated set: per instance id, the click on which IoU 0.90 was reached."""
    samples = [SimpleNamespace(sample_id=i) for i in parent]
    return EvalSet(label, label, samples, True, list(excluded),
                   {i: [0.5] * (n - 1) + [0.95] for i, n in parent.items()},
                   {i: [0.5] * (n - 1) + [0.95] for i, n in candidate.items()})


def test_decide_names_the_benchmark_instances_left_out():
    ev = Evaluation({}, [_set("holdout", {"a": 5, "b": 5}, {"a": 3, "b": 4}),
                         _set("GrabCut", {"g1": 2}, {"g1": 2}, excluded=["g7", "g9"])])
    promote, reason, confidence = decide_promotion(ev, FinetuneSettings(confident_holdout=0))
    assert promote and confidence == "normal"
    assert reason.endswith("left out of the benchmarks (image in the project): 2 GrabCut instance(s)")


def test_no_thread_polls_the_training_log():
    assert not hasattr(job, "_TrainProgress")
    assert "threading" not in vars(job)


@pytest.mark.e2e
def test_run_finetune_goes_through_the_stages_in_order(tmp_path, tiny_checkpoint, monkeypatch):
    """A real job, in this process: pull (an export), train 3 steps, evaluate, decide, register."""
    from backend.labelstudio.make_export import make_export

    export = make_export(tmp_path / "export", count=5)
    monkeypatch.setenv("LOCAL_FILES_ROOT", str(export.parent / "images"))
    monkeypatch.setenv("SIMCLICK_EVAL_DB", str(tmp_path / "eval.sqlite"))
    settings = FinetuneSettings(steps=3, batch_size=2, crop_size=128, checkpoint_every=2, warmup_steps=1,
                                max_sim_rounds=1, bench_datasets="", eval_coarse_size=128, threads=1,
                                min_train=2, min_holdout=1, holdout_fraction=0.2, seed=0)
    calls = []
    result = run_finetune(5, "job-stages", settings, progress=lambda stage, percent, **kw: calls.append(
        (stage, percent, kw)), export=str(export), registry_root=str(tmp_path / "registry"),
        base_checkpoint=str(tiny_checkpoint), work_root=str(tmp_path / "jobs"))
    stages = list(dict.fromkeys(c[0] for c in calls))
    assert stages[:6] == ["pull", "evaluate_parent", "route", "train", "evaluate_candidate", "register"], stages
    assert stages[-1] == "done"
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)           # percent never goes back
    steps = [c[2]["step"] for c in calls if c[0] == "train" and "step" in c[2]]
    assert steps and steps[-1] == 3                                        # the last step is reported
    assert result["status"] in ("promoted", "kept") and result["version"] == "p5-v001"
    # SOD masks on BSDS images: the base model's own domain, which no router tells apart, so the
    # network will answer every image and rehearses the base data
    assert result["candidate"]["kind"] == "interpolated" and not result["candidate"]["routing"]["used"]
    assert result["train"] == {"steps": 3, "resumed": False, "device": result["train"]["device"], "rehearsal": 0.5}
    assert list(result["timings"]) == ["pull_s", "evaluate_parent_s", "route_s", "train_s", "evaluate_candidate_s",
                                       "register_s", "total_s"]
    assert calls[-1][2]["timings"] == result["timings"]                   # in job.meta: where the time went
    assert list(result["metrics"]) == ["holdout", "benchmarks", "history_runs"]
    assert not Path(tmp_path / "jobs" / "job-stages").exists()            # work folder cleaned up


@pytest.mark.e2e
def test_a_parent_that_reads_boxes_is_also_judged_on_the_box_alone(tmp_path, tiny_checkpoint, monkeypatch):
    """The shipped model reads boxes; the NoC runs never use one, so the job also measures the box
    prompt alone on the holdout, parent and candidate, and the decision weighs it."""
    from dataclasses import replace

    from backend.labelstudio.make_export import make_export
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.network import InteractiveSegNet, grow

    state, config, info = load_checkpoint(tiny_checkpoint)
    net = InteractiveSegNet(config, pretrained=False)
    net.load_state_dict(state)
    boxed = grow(net, replace(config, box_input=True))
    parent = save_checkpoint(tmp_path / "box-parent.safetensors", boxed.state_dict(), boxed.config, info)
    export = make_export(tmp_path / "export", count=5)
    monkeypatch.setenv("LOCAL_FILES_ROOT", str(export.parent / "images"))
    monkeypatch.setenv("SIMCLICK_EVAL_DB", str(tmp_path / "eval.sqlite"))
    settings = FinetuneSettings(steps=2, batch_size=2, crop_size=128, checkpoint_every=2, warmup_steps=1,
                                max_sim_rounds=1, bench_datasets="", eval_coarse_size=128, threads=1,
                                min_train=2, min_holdout=1, holdout_fraction=0.2, seed=0, box_margin=-1.0)
    result = run_finetune(5, "job-box", settings, export=str(export), registry_root=str(tmp_path / "registry"),
                          base_checkpoint=str(parent), work_root=str(tmp_path / "jobs"))
    box = result["metrics"]["holdout"]["box_alone"]
    assert box["instances"] >= 1 and 0.0 <= box["parent"] <= 1.0 and 0.0 <= box["candidate"] <= 1.0
    # A margin of -1 demands a box alone better than the parent's by a whole IoU of 1: refused, and named.
    assert box["candidate"] - box["parent"] < 1.0
    assert not result["promoted"] and "holdout box alone mean IoU" in result["reason"], result["reason"]


@pytest.mark.e2e
def test_a_second_job_on_the_same_parent_reuses_its_evaluations(tmp_path, tiny_checkpoint, monkeypatch):
    """The parent's holdout and benchmark results come from the evaluation history (matched by
    checkpoint hash and instance id): a second job evaluates only its candidate."""
    from backend.labelstudio.make_export import make_export
    from training.evaluation.history import list_runs

    export = make_export(tmp_path / "export", count=5)
    monkeypatch.setenv("LOCAL_FILES_ROOT", str(export.parent / "images"))
    monkeypatch.setenv("SIMCLICK_EVAL_DB", str(tmp_path / "eval.sqlite"))
    settings = FinetuneSettings(steps=1, batch_size=2, crop_size=128, checkpoint_every=1, warmup_steps=1,
                                max_sim_rounds=0, bench_datasets="GrabCut", bench_limit=1, eval_coarse_size=128,
                                threads=1, eval_workers=1, min_train=2, min_holdout=1, holdout_fraction=0.2,
                                min_holdout_gain=100.0, rehearsal=0.0, distill=0.0, seed=0)   # never promoted
    details = []
    for n in (1, 2):
        result = run_finetune(5, f"job-{n}", settings, export=str(export), registry_root=str(tmp_path / "registry"),
                              progress=lambda stage, percent, **kw: details.append((stage, kw.get("detail"))),
                              base_checkpoint=str(tiny_checkpoint), work_root=str(tmp_path / "jobs"))
        assert result["status"] == "kept" and result["parent"].startswith("p5-base")
    runs = list_runs(str(tmp_path / "eval.sqlite"))
    parent = [r for r in runs if r["model_version"] == result["parent"]]
    assert sorted(r["dataset"] for r in parent) == ["GrabCut", "ls-p5-holdout"]     # the first job's, only
    assert sum(r["model_version"] != result["parent"] for r in runs) == 4              # each candidate, both sets
    hold = result["metrics"]["holdout"]["instances"]
    assert ("evaluate_parent", f"{hold + 1} instance(s) from the history") in details
