"""The training loop: a few real iterations on the real training data, resume, determinism, losses."""
import csv
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.checkpoint import load_checkpoint
from model.predictor import Predictor
from training.config import TrainConfig
from training.losses import bce_loss, normalized_focal_loss
from training.train import train

from .conftest import DATASETS

# Real training runs read the training data: skipped without it, and in the e2e tier (slow). The
# other tests build the network and run steps on toy batches: unit tier, no data needed.
needs_data = pytest.mark.skipif(not (DATASETS / "train").is_dir(), reason=f"training data not at {DATASETS / 'train'}")


def tiny_config(out_dir, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), model={"backbone": "efficientnet-lite2", "input_size": 128,
                                             "aspp_channels": 32, "decoder_channels": 32},
                crop_size=128, steps=3, batch_size=2, num_workers=0, warmup_steps=1,
                checkpoint_every=2, val_instances=0, max_sim_rounds=2, data_root=str(DATASETS / "train"))
    base.update(kw)
    return TrainConfig(**base)


def weights(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}


@pytest.mark.e2e
@needs_data
def test_a_few_iterations_write_everything(tmp_path):
    summary = train(tiny_config(tmp_path, val_instances=1), progress=False)
    assert summary["steps"] == 3
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["loss"]) > 0 and float(r["pem"]) >= 0 for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    state, config, info = load_checkpoint(tmp_path / "last.safetensors")
    assert config.input_size == 128 and info["training"]["steps"] == 3
    assert not any("pro_pos" in k or k.startswith("pem") for k in state)  # PEM is training-only
    assert set(info["metrics"]["train-val"]) >= {"noc85", "noc90"}
    assert load_checkpoint(tmp_path / "step3.safetensors")[2]["training"]["steps"] == 3  # each validated step kept
    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as f:
        assert any(k.startswith("pem.") for k in f.keys())               # ...but kept for resuming
    prob = Predictor.load(tmp_path / "last.safetensors").open(torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()) \
        .add_click(10, 10, True)
    assert prob.shape == (64, 64)
    assert json.loads((tmp_path / "card.json").read_text())["steps"] == 3

    # Export from the resumable state: weights only, fp16, loadable.
    from training.export import export
    out = export(tmp_path / "state.safetensors", tmp_path / "exported.safetensors", half=True, version="x-1")
    exported, config2, info2 = load_checkpoint(out)
    assert info2["version"] == "x-1" and info2["training"]["steps"] == 3 and config2 == config
    assert exported.keys() == state.keys()
    assert out.stat().st_size < 0.6 * (tmp_path / "last.safetensors").stat().st_size

    # Inference settings chosen for the weights travel in the card and are the loaded defaults.
    from training.export import main as export_main
    assert export_main([str(tmp_path / "state.safetensors"), str(tmp_path / "tuned.safetensors"),
                        "--predictor", "edge_radius=2.5,focus_passes=1"]) == 0
    tuned = Predictor.load(tmp_path / "tuned.safetensors")
    assert (tuned.options.edge_radius, tuned.options.focus_passes) == (2.5, 1)
    assert Predictor.load(tmp_path / "tuned.safetensors", focus_passes=2).options.focus_passes == 2
    # ...also chosen after the export: an inference checkpoint re-exported with other settings
    assert export_main([str(out), str(tmp_path / "retagged.safetensors"), "--half", "--predictor", "edge_radius=4"]) == 0
    retagged, config3, info3 = load_checkpoint(tmp_path / "retagged.safetensors")
    assert info3["predictor"] == {"edge_radius": 4.0} and info3["version"] == "x-1" and config3 == config
    assert info3["training"] == info2["training"]
    assert all(torch.equal(retagged[k], exported[k]) for k in exported)
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "state.safetensors"), str(tmp_path / "x.safetensors"), "--predictor", "edge=2"])


@pytest.mark.e2e
@needs_data
def test_a_run_that_continues_a_checkpoint_exports_its_architecture(tmp_path):
    """A config with init_checkpoint and no "model" (cpu-lite2-continue.json): the exported file
    must carry the continued network's architecture, not the default one."""
    first = tmp_path / "first"
    train(tiny_config(first, steps=1, model={"backbone": "efficientnet-lite2", "input_size": 128,
                                             "aspp_channels": 32, "decoder_channels": 32,
                                             "late_fusion": True}), progress=False)
    second = tmp_path / "second"
    train(tiny_config(second, steps=1, model={}, init_checkpoint=str(first / "last.safetensors")),
          progress=False)
    from training.export import export
    _, config, _ = load_checkpoint(export(second / "state.safetensors", tmp_path / "out.safetensors"))
    assert config.late_fusion and config.decoder_channels == 32 and config.input_size == 128


@pytest.mark.e2e
@needs_data
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(straight, steps=4), progress=False)
    killed = tmp_path / "killed"
    # "Killed" after step 2: the state written at the step-2 checkpoint is all that survives.
    train(tiny_config(killed, steps=2), progress=False)
    summary = train(tiny_config(killed, steps=4), resume=True, progress=False)
    assert summary["steps"] == 4
    a, b = weights(straight / "state.safetensors"), weights(killed / "state.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = list(csv.DictReader((killed / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


@pytest.mark.e2e
@needs_data
def test_on_step_is_called_once_per_step_with_the_log_row(tmp_path):
    from training.train import LOG_FIELDS

    calls = []
    train(tiny_config(tmp_path, steps=2), progress=False, on_step=lambda *a: calls.append(a))
    train(tiny_config(tmp_path, steps=3), resume=True, progress=False, on_step=lambda *a: calls.append(a))
    assert [(step, total) for step, total, _ in calls] == [(1, 2), (2, 2), (3, 3)]   # the resumed run: step 3
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    for (step, _, stats), row in zip(calls, rows):
        assert set(stats) == set(LOG_FIELDS) - {"step"} and int(row["step"]) == step
        # log.csv rounds (grad_norm and sec_per_step to 3 decimals): compare to the written precision.
        for k in stats:
            places = len(row[k].split(".")[1]) if "." in row[k] and "e" not in row[k] else None
            tol = dict(abs=0.51 * 10 ** -places) if places is not None else dict(rel=1e-3)
            assert stats[k] == pytest.approx(float(row[k]), **tol), (k, stats[k], row[k])


@pytest.mark.e2e
@needs_data
def test_seed_changes_the_run(tmp_path):
    train(tiny_config(tmp_path / "s0", steps=1, checkpoint_every=1), progress=False)
    train(tiny_config(tmp_path / "s1", steps=1, checkpoint_every=1, seed=1), progress=False)
    a, b = weights(tmp_path / "s0" / "state.safetensors"), weights(tmp_path / "s1" / "state.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_unknown_config_key_is_refused(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.load(p)


def test_losses_reward_the_right_answer_and_ignore_padding():
    gt = torch.zeros(1, 1, 8, 8)
    gt[..., :4] = 1
    good = (gt * 2 - 1) * 6
    bad = -good
    for loss in (normalized_focal_loss, bce_loss):
        assert loss(good, gt) < loss(bad, gt)
        valid = torch.zeros_like(gt)
        valid[..., :4] = 1
        wrong_in_padding = good.clone()
        wrong_in_padding[..., 4:] = 6  # confidently wrong, but only where valid == 0
        assert loss(wrong_in_padding, gt, valid) == pytest.approx(loss(good, gt, valid).item(), abs=1e-6)


@pytest.mark.e2e
@needs_data
def test_crash_mid_write_keeps_the_previous_state(tmp_path, monkeypatch):
    from model import checkpoint

    cfg = tiny_config(tmp_path, steps=2, checkpoint_every=2)
    train(cfg, progress=False)
    before = (tmp_path / "state.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError):
        train(tiny_config(tmp_path, steps=4, checkpoint_every=2), resume=True, progress=False)
    assert (tmp_path / "state.safetensors").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_click_inputs_learn_fast_and_rgb_stem_stays_pretrained():
    from training.train import build_net, build_optimizer, train_step

    cfg = tiny_config("/tmp/unused", focus_view=False, max_sim_rounds=0, pem_weight=0.0, lr=1e-3)
    torch.manual_seed(0)
    net = build_net(cfg).train()
    opt = build_optimizer(cfg, net)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3, 1e-2])
    w0 = net.backbone.first_conv().weight.detach().clone()
    gt = torch.zeros(2, 1, 64, 64)
    gt[:, :, 16:48, 16:48] = 1
    batch = {"image": torch.rand(2, 3, 64, 64), "mask": gt, "valid": torch.ones_like(gt),
             "clicks": torch.tensor([[[32.0, 32.0, 1.0]], [[30.0, 30.0, 1.0]]])}
    train_step(cfg, net, None, opt, batch, 0, torch.device("cpu"))
    w1 = net.backbone.first_conv().weight.detach()
    assert torch.equal(w1[:, :3], w0[:, :3])                  # pretrained RGB filters untouched
    assert (w1[:, 3:] - w0[:, 3:]).abs().max() > 5e-3           # click/mask channels moved at lr x 10


def _toy_batch():
    gt = torch.zeros(2, 1, 64, 64)
    gt[:, :, 16:48, 16:48] = 1
    return {"image": torch.rand(2, 3, 64, 64), "mask": gt, "valid": torch.ones_like(gt),
            "clicks": torch.tensor([[[32.0, 32.0, 1.0]], [[30.0, 30.0, 1.0]]])}


def test_frozen_backbone_phase_then_the_whole_network(tmp_path):
    from training.train import build_net, build_optimizer, train_step

    cfg = tiny_config(tmp_path, model={"backbone": "efficientnet-lite2", "input_size": 128,
                                            "aspp_channels": 32, "decoder_channels": 32, "late_fusion": True},
                      focus_view=False, max_sim_rounds=0, pem_weight=0.0, freeze_backbone_steps=1,
                      freeze_backbone_bn=True)
    torch.manual_seed(0)
    net = build_net(cfg)
    opt = build_optimizer(cfg, net)
    bb0 = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    head0 = net.head.weight.detach().clone()
    train_step(cfg, net, None, opt, _toy_batch(), 0, torch.device("cpu"))       # step 0: frozen
    assert all(torch.equal(v, bb0[k]) for k, v in net.backbone.state_dict().items())  # weights and BN stats
    assert not torch.equal(net.head.weight, head0)
    train_step(cfg, net, None, opt, _toy_batch(), 1, torch.device("cpu"))       # step 1: thawed
    after = net.backbone.state_dict()
    changed = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, bb0[k])]
    assert any(k.endswith("weight") for k in changed)                          # the backbone learns now...
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)  # ...on ImageNet BN statistics


def test_resume_takes_hyper_parameters_from_the_config(tmp_path):
    from training.state import load_state, save_state
    from training.train import build_net, build_optimizer

    cfg = tiny_config(tmp_path, pem_weight=0.0)
    net = build_net(cfg)
    opt = build_optimizer(cfg, net)
    save_state(tmp_path / "s.safetensors", net, None, opt, {"step": 5, "config": cfg.to_dict()})
    cfg2 = tiny_config(tmp_path, pem_weight=0.0, backbone_lr_mult=0.3, input_lr_mult=3.0)
    opt2 = build_optimizer(cfg2, net)
    assert load_state(tmp_path / "s.safetensors", net, None, opt2)["step"] == 5
    assert [g["lr_mult"] for g in opt2.param_groups] == [0.3, 1.0, 3.0]


def test_focus_view_on_a_share_of_steps(tmp_path):
    from training.train import build_net, build_optimizer, train_step

    cfg = tiny_config(tmp_path, max_sim_rounds=0, pem_weight=0.0, focus_prob=0.0)
    net = build_net(cfg)
    opt = build_optimizer(cfg, net)
    assert train_step(cfg, net, None, opt, _toy_batch(), 0, torch.device("cpu"))["focus"] == 0.0
    cfg.focus_prob = 1.0
    assert train_step(cfg, net, None, opt, _toy_batch(), 1, torch.device("cpu"))["focus"] > 0.0


@pytest.mark.e2e  # slow (2.3 s of CPU): the unit tier stays within a minute (issue 24)
def test_box_alone_samples_drop_their_simulated_clicks(tmp_path):
    """box_alone_prob: a box sample chosen for it is supervised on the box alone (no clicks, no
    previous mask), also on a step with simulated rounds; without it, the simulated clicks stay."""
    from training.train import build_net, build_optimizer, train_step

    model = {**tiny_config(tmp_path).model, "late_fusion": True, "box_input": True}
    supervised: dict = {}
    for alone in (0.0, 1.0):
        cfg = tiny_config(tmp_path, model=model, focus_view=False, max_sim_rounds=3, pem_weight=0.0,
                          box_prob=1.0, box_alone_prob=alone)
        torch.manual_seed(0)
        net = build_net(cfg)
        opt = build_optimizer(cfg, net)
        decode = net.decode
        seen = supervised.setdefault(alone, [])

        def recording(code, clicks, prev, boxes=None, return_features=False, seen=seen, decode=decode):
            if torch.is_grad_enabled():      # the supervised pass (the simulation runs without grad)
                seen.append((clicks.clone(), prev.clone(), boxes.clone()))
            return decode(code, clicks, prev, boxes, return_features)

        net.decode = recording
        for step in range(6):
            train_step(cfg, net, None, opt, _toy_batch(), step, torch.device("cpu"))
    assert all((boxes[:, 0] >= 0).all() for _, _, boxes in supervised[0.0] + supervised[1.0])
    assert any((clicks[..., 2] != 0).any() for clicks, _, _ in supervised[0.0])   # clicks after the box...
    assert all((clicks[..., 2] == 0).all() and prev.sum() == 0 for clicks, prev, _ in supervised[1.0])  # ...dropped


@pytest.mark.e2e
@needs_data
def test_a_click_model_continued_with_a_box_input_learns_it(tmp_path):
    """A config with init_checkpoint and model {"box_input": true} (cpu-lite2-stage7-box.json): the
    checkpoint's network is grown a box channel, trained on box prompts, and validated on what a
    box alone gives."""
    first = tmp_path / "first"
    train(tiny_config(first, steps=1, model={**tiny_config(first).model, "late_fusion": True}), progress=False)
    second = tmp_path / "second"
    train(tiny_config(second, steps=2, model={"box_input": True}, init_checkpoint=str(first / "last.safetensors"),
                      box_prob=1.0, val_instances=1), progress=False)
    state, config, info = load_checkpoint(second / "last.safetensors")
    assert config.box_input and config.late_fusion and config.decoder_channels == 32
    stem = state["backbone.body.conv_stem.weight"]
    assert not torch.equal(stem[:, -1], stem[:, -2])   # the box channel, grown as the previous mask's copy, learned
    assert 0.0 <= info["metrics"]["train-val"]["box_miou"] <= 1.0
    assert Predictor.load(second / "last.safetensors").accepts_box


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "training" / "configs").glob("*.json")),
                         ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    from model.config import ModelConfig

    cfg = TrainConfig.load(path)
    ModelConfig.from_dict(cfg.model)          # every model key is a real one
    assert cfg.steps > 0 and cfg.crop_size % 32 == 0


def _late_model(**kw):
    return {"backbone": "efficientnet-lite2", "input_size": 128, "aspp_channels": 32, "decoder_channels": 32,
            "fusion": "late", **kw}


@pytest.mark.e2e
@needs_data
def test_late_fusion_trains_several_clicks_per_backbone_pass(tmp_path):
    """Frozen backbone: only the head moves; with the backbone training, the shared pass gets the
    gradient of every supervised click (retain_graph across the points)."""
    from model.network import InteractiveSegNet
    from model.config import ModelConfig

    late = _late_model(boundary_head=True, box_input=True)
    init = InteractiveSegNet(ModelConfig.from_dict(late), pretrained=True).state_dict()
    frozen = tmp_path / "frozen"
    train(tiny_config(frozen, steps=2, model=late, click_points=3, focus_prob=1.0, box_prob=0.5,
                      freeze_backbone_steps=10, freeze_backbone_bn=True), progress=False)
    w = weights(frozen / "state.safetensors")
    assert all(torch.equal(w[f"model.{k}"], v) for k, v in init.items() if k.startswith("backbone."))
    assert not torch.equal(w["model.head.weight"], init["head.weight"])
    assert not torch.equal(w["model.fine.2.weight"], init["fine.2.weight"])   # the boundary head learns
    rows = list(csv.DictReader((frozen / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["focus"]) > 0 for r in rows)

    thawed = tmp_path / "thawed"
    train(tiny_config(thawed, steps=1, checkpoint_every=1, model=_late_model(), click_points=2,
                      freeze_backbone_steps=0), progress=False)
    w = weights(thawed / "state.safetensors")
    moved = [k for k, v in init.items() if k.startswith("backbone.") and v.is_floating_point()
             and "running" not in k and not torch.equal(w[f"model.{k}"], v)]
    assert moved, "the backbone got no gradient"
