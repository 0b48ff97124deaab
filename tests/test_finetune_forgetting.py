"""The training levers a fine-tuning job uses against forgetting (training/train.py): the parent's
inference settings kept in the card, rehearsal of the base training data, every BatchNorm on the
parent's statistics, the L2-SP pull toward the parent's weights."""
from __future__ import annotations

import pytest
import torch

from model.checkpoint import read_info, save_checkpoint
from training.config import TrainConfig
from training.data import Mixture
from training.data.sources import InstanceSource, Item

from .conftest import DATASETS


class _Fixed(InstanceSource):
    def __init__(self, name, n, ns):
        super().__init__(name, [Item(f"{i}", f"{ns}:{i}") for i in range(n)])


def test_train_only_sources_keep_every_item_while_the_others_keep_their_split():
    base, own = _Fixed("base", 200, "b"), _Fixed("own", 50, "o")
    alone = Mixture([base], val_fraction=0.1, seed=0)
    mixed = Mixture([own, base], val_fraction=0.1, seed=0, train_only=["own"])
    assert len(mixed.indices("train")[0]) == 50 and len(mixed.indices("val")[0]) == 0
    # the base source's held-out items are exactly those it holds out alone (TrainVal stays held out)
    assert list(mixed.indices("val")[1]) == list(alone.indices("val")[0]) and len(alone.indices("val")[0]) == 20
    with pytest.raises(ValueError, match="train_only"):
        Mixture([base], train_only=["nope"])


@pytest.mark.skipif(not (DATASETS / "train").is_dir(), reason=f"training data not at {DATASETS / 'train'}")
def test_rehearsal_mixes_the_base_sources_at_their_share(tmp_path):
    from training.train import build_mixture

    cfg = TrainConfig(sources=[{"type": "bsds", "root": str(DATASETS / "train" / "BSDS500"), "name": "own"}],
                      rehearsal=0.3, rehearsal_root=str(DATASETS / "train"), val_fraction=0.05, split_seed=0)
    mix = build_mixture(cfg)
    names = [s.name for s in mix.sources]
    p = dict(zip(names, mix.probabilities("train")))
    assert names[0] == "own" and p["own"] == pytest.approx(0.7)
    assert sum(v for k, v in p.items() if k != "own") == pytest.approx(0.3)
    assert len(mix.indices("val")[0]) == 0 and sum(len(i) for i in mix.indices("val")[1:]) > 0
    with pytest.raises(ValueError, match="set sources"):
        build_mixture(TrainConfig(rehearsal=0.3))


def _tiny(tmp_path, **kw):
    return TrainConfig(out_dir=str(tmp_path), model={"backbone": "efficientnet-lite2", "input_size": 128,
                                                     "aspp_channels": 32, "decoder_channels": 32},
                       crop_size=64, steps=3, batch_size=2, num_workers=0, warmup_steps=1, val_instances=0,
                       focus_view=False, max_sim_rounds=0, pem_weight=0.0, pretrained=False, **kw)


def _batch():
    gt = torch.zeros(2, 1, 64, 64)
    gt[:, :, 16:48, 16:48] = 1
    return {"image": torch.rand(2, 3, 64, 64), "mask": gt, "valid": torch.ones_like(gt),
            "clicks": torch.tensor([[[32.0, 32.0, 1.0]], [[30.0, 30.0, 1.0]]])}


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_bn_keeps_every_running_statistic(tmp_path, freeze):
    from training.train import build_net, build_optimizer, train_step

    cfg = _tiny(tmp_path, freeze_bn=freeze, freeze_backbone_bn=True)
    torch.manual_seed(0)
    net = build_net(cfg)
    opt = build_optimizer(cfg, net)
    stats = {k: v.clone() for k, v in net.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    weights0 = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("decoder") and k.endswith("weight")}
    train_step(cfg, net, None, opt, _batch(), 0, torch.device("cpu"))
    moved = [k for k, v in net.state_dict().items() if k in stats and not torch.equal(v, stats[k])]
    head_moved = [k for k in moved if not k.startswith("backbone.")]
    assert not [k for k in moved if k.startswith("backbone.")]            # the backbone's: always kept
    assert (not head_moved) if freeze else head_moved                    # the head's: only with freeze_bn
    assert any(not torch.equal(v, weights0[k]) for k, v in net.state_dict().items() if k in weights0)  # still learns


def test_l2sp_pulls_every_weight_back_toward_the_parent():
    from training.train import pull_toward

    net = torch.nn.Linear(3, 2)
    anchors = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    pull_toward(net, anchors, 0.25)
    for n, p in net.named_parameters():
        assert torch.allclose(p, anchors[n] + 0.75)


def test_a_model_trained_from_a_checkpoint_keeps_its_inference_settings(tmp_path):
    """A fine-tuned model is evaluated and served with the parent's zoom-in and edge snapping
    (the card's "predictor" entry), not with the predictor's bare defaults."""
    from training.train import card, inherited_card

    cfg0 = _tiny(tmp_path)
    from training.train import build_net
    net = build_net(cfg0)
    parent = save_checkpoint(tmp_path / "parent.safetensors", net.state_dict(), net.config,
                             {"version": "p", "predictor": {"zoom_in": True, "edge_radius": 2.0}})
    cfg = _tiny(tmp_path, init_checkpoint=str(parent))
    assert inherited_card(cfg) == {"predictor": {"zoom_in": True, "edge_radius": 2.0}}
    mix = Mixture([_Fixed("x", 4, "x")], val_fraction=0.0)
    child = save_checkpoint(tmp_path / "child.safetensors", net.state_dict(), net.config,
                            card(cfg, mix, 3, 1.0, torch.device("cpu"), None))
    assert read_info(child)["predictor"] == {"zoom_in": True, "edge_radius": 2.0}
    assert "predictor" not in card(cfg0, mix, 3, 1.0, torch.device("cpu"), None)


def test_distill_loss_is_zero_when_the_student_answers_as_the_teacher():
    from training.losses import distill_loss

    t = torch.randn(2, 1, 8, 8)
    assert distill_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(t + 1.0, t).item() > 0.01
    valid = torch.zeros(2, 1, 8, 8)
    valid[:, :, :4] = 1
    off = t.clone()
    off[:, :, 4:] += 5.0                                    # a difference only where nothing counts
    assert distill_loss(off, t, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_rehearsal_samples_learn_the_teachers_answers(tmp_path):
    """cfg.distill: the samples of the rehearsal sources (after the run's own in the mixture) get a
    KL term toward the initial model's answer; the run's own samples do not."""
    from training.train import build_net, build_optimizer, build_teacher, train_step

    cfg0 = _tiny(tmp_path)
    torch.manual_seed(0)
    net0 = build_net(cfg0)
    parent = save_checkpoint(tmp_path / "parent.safetensors", net0.state_dict(), net0.config, {"version": "p"})
    cfg = _tiny(tmp_path, init_checkpoint=str(parent), sources=[{"type": "labelstudio", "export": "x"}],
                rehearsal=0.5, distill=1.0, freeze_bn=True)
    net, teacher = build_net(cfg), build_teacher(cfg, torch.device("cpu"))
    with torch.no_grad():                                   # the student has drifted from its parent
        for p in net.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opt = build_optimizer(cfg, net)
    own = {**_batch(), "source": torch.tensor([0, 0])}
    assert train_step(cfg, net, None, opt, own, 0, torch.device("cpu"), teacher=teacher)["kd"] == 0.0
    mixed = {**_batch(), "source": torch.tensor([0, 1])}
    assert train_step(cfg, net, None, opt, mixed, 1, torch.device("cpu"), teacher=teacher)["kd"] > 0.0
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="distill needs"):
        build_teacher(_tiny(tmp_path, distill=1.0), torch.device("cpu"))


def test_interpolated_weights_lie_between_the_parent_and_the_trained_model():
    from training.train import interpolated

    init = {"w": torch.zeros(3), "n": torch.tensor(0)}
    trained = {"w": torch.tensor([2.0, 4.0, -2.0]), "n": torch.tensor(7)}
    mixed = interpolated(init, trained, 0.5)
    assert torch.equal(mixed["w"], torch.tensor([1.0, 2.0, -1.0])) and int(mixed["n"]) == 7
    assert torch.equal(interpolated(init, trained, 1.0)["w"], trained["w"])


def test_finetune_settings_refuse_distillation_without_rehearsal():
    from backend.finetune import FinetuneSettings

    with pytest.raises(ValueError, match="FINETUNE_DISTILL > 0 needs FINETUNE_REHEARSAL"):
        FinetuneSettings.from_env({}, rehearsal=0.0)
    assert FinetuneSettings.from_env({}, rehearsal=0.0, distill=0.0).interpolate == 0.5
    with pytest.raises(ValueError, match="FINETUNE_INTERPOLATE"):
        FinetuneSettings.from_env({"FINETUNE_INTERPOLATE": "0"})
