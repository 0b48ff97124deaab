"""Routed checkpoints (model/routing.py): a fine-tuned expert beside its fallback, a router on
the image choosing which one answers; and the job's candidate stage (backend/finetune/candidate.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import CheckpointError, DEFAULT_CHECKPOINT, build_model, load_checkpoint, read_info, save_checkpoint
from model.images import load_image
from model.predictor import Predictor
from model.routing import RoutedPredictor, Router, embedding, route_card, validate


def _images(seed: int, n: int, tone: tuple[int, int, int]) -> list[np.ndarray]:
    """n noisy 96 x 128 images around one colour tone (two easily told apart "domains")."""
    rng = np.random.default_rng(seed)
    base = np.array(tone, dtype=np.float32)
    return [np.clip(base + rng.normal(0, 25, (96, 128, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def test_router_learns_two_domains_and_checks_them_on_held_out_images():
    rng = np.random.default_rng(0)
    own = rng.normal(0, 1, (40, 8)) + 3.0
    other = rng.normal(0, 1, (120, 8)) - 1.0
    r = Router.fit(own[:30], other[:90])
    v = validate(r, own[30:], other[90:])
    assert v == {"own_to_expert": 1.0, "other_to_fallback": 1.0, "own": 10, "other": 30}
    assert Router.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(ValueError, match="both"):
        Router.fit(own[:0], other)


@pytest.fixture(scope="module")
def routed_file(tmp_path_factory):
    """A routed checkpoint: the expert is the shipped network with its head negated (it answers
    the opposite mask), the fallback the shipped network; the router learnt reddish (expert)
    against bluish images with the shipped network's embedding."""
    torch.set_num_threads(1)
    base = Predictor.load("default")
    state, config, info = load_checkpoint(DEFAULT_CHECKPOINT)
    expert = dict(state, **{"head.weight": -state["head.weight"], "head.bias": -state["head.bias"]})
    router = Router.fit(np.stack([embedding(base, im) for im in _images(1, 8, (200, 60, 50))]),
                        np.stack([embedding(base, im) for im in _images(2, 8, (50, 70, 200))]))
    path = tmp_path_factory.mktemp("routed") / "routed.safetensors"
    card = dict(info, version="p1-v001",
                routing=route_card(router, dict(info, version="base"), {"own_to_expert": 1.0}))
    save_checkpoint(path, {**expert, **{"fallback." + k: v for k, v in state.items()}}, config, card, half=True)
    return path


@pytest.mark.e2e  # slow (2.5 s of CPU): the unit tier stays within a minute (issue 24)
def test_a_routed_checkpoint_answers_each_image_with_its_network(routed_file):
    p = Predictor.load(str(routed_file))
    base = Predictor.load("default")
    assert isinstance(p, RoutedPredictor) and p.version == "p1-v001" and p.fallback.version == "base"
    assert p.options == base.options                 # the card's predictor settings for both networks
    own, other = _images(3, 1, (200, 60, 50))[0], _images(4, 1, (50, 70, 200))[0]
    assert p.routes_to_expert(own) and not p.routes_to_expert(other)
    click = (64.0, 48.0, True)
    # an image unlike the project's: exactly the fallback's answer
    np.testing.assert_array_equal(p.open(other).add_clicks([click]), base.open(other).add_clicks([click]))
    # the project's kind: the expert's (its head negated: not the base's answer)
    assert not np.array_equal(p.open(own).add_clicks([click]) > 0.5, base.open(own).add_clicks([click]) > 0.5)
    ablated = p.with_options(refine=False)
    assert isinstance(ablated, RoutedPredictor) and not ablated.fallback.options.refine


def test_training_from_a_routed_checkpoint_starts_from_its_expert(routed_file):
    """build_model / load_checkpoint read the expert only; the fallback is its own network."""
    state, _, _ = load_checkpoint(routed_file)
    assert not any(k.startswith("fallback.") for k in state)
    assert torch.equal(state["head.weight"], -load_checkpoint(DEFAULT_CHECKPOINT)[0]["head.weight"].half().float())
    net, info = build_model(routed_file)
    fb, _ = build_model(routed_file, fallback=True)
    assert not torch.equal(net.head.weight, fb.head.weight)
    with pytest.raises(CheckpointError, match="not a routed checkpoint"):
        load_checkpoint(DEFAULT_CHECKPOINT, fallback=True)


def test_a_malformed_routing_entry_is_a_checkpoint_error(routed_file, tmp_path):
    state, config, info = load_checkpoint(routed_file)
    fb = load_checkpoint(routed_file, fallback=True)[0]
    bad = tmp_path / "bad.safetensors"
    card = dict(info, routing=dict(info["routing"], router={"weight": "x"}))
    save_checkpoint(bad, {**state, **{"fallback." + k: v for k, v in fb.items()}}, config, card)
    with pytest.raises(CheckpointError, match="routing"):
        Predictor.load(str(bad))
    assert read_info(bad)["routing"]["router"] == {"weight": "x"}


PH2 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "domain" / "PH2"


def _pulled(tmp_path, names: list[str], holdout: int) -> Path:
    """A pulled project folder as backend.labelstudio.pull writes it (images/, train.json, holdout.json)."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    tasks = []
    for k, name in enumerate(names):
        shutil.copy(PH2 / "images" / name, data / "images" / name)
        tasks.append({"id": k + 1, "data": {"image": name}})
    (data / "train.json").write_text(json.dumps(tasks[holdout:]))
    (data / "holdout.json").write_text(json.dumps(tasks[:holdout]))
    return data


@pytest.mark.e2e  # a few hundred real images through the backbone
@pytest.mark.skipif(not PH2.is_dir(), reason=f"no PH2 data set at {PH2}")
def test_the_job_routes_a_new_domain_and_a_second_round_keeps_the_first_fallback(tmp_path, monkeypatch):
    """Dermoscopy images against the base training data: the router tells them apart on held-out
    images of both, the candidate is routed with the parent as fallback; a second round from that
    candidate keeps the original model as the fallback. Without routing: the WiSE interpolation."""
    from backend.finetune import candidate as cand
    from backend.finetune.settings import FinetuneSettings

    monkeypatch.setattr(cand, "ROUTER_FIT_BASE", 150)      # a test's size: 150 + 20 base images
    monkeypatch.setattr(cand, "ROUTER_CHECK_BASE", 20)
    torch.set_num_threads(1)
    names = sorted(p.name for p in (PH2 / "images").iterdir())[:12]
    data = _pulled(tmp_path, names, holdout=3)
    state, config, info = load_checkpoint(DEFAULT_CHECKPOINT)
    trained = tmp_path / "train" / "last.safetensors"
    save_checkpoint(trained, {k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, config,
                    dict(info, version="p7-v001"))
    settings = FinetuneSettings.from_env({}, routing=True, route_min=0.9)
    routing = cand.plan_routing(DEFAULT_CHECKPOINT, data, settings)
    assert routing is not None and routing.usable
    path, made = cand.make_candidate(trained, DEFAULT_CHECKPOINT, "base-v", routing, settings)
    assert made["kind"] == "routed" and made["routing"]["used"], made
    assert made["routing"]["own"] == 3 and made["routing"]["other"] == 20
    p = Predictor.load(str(path))
    assert isinstance(p, RoutedPredictor) and p.version == "p7-v001" and p.fallback.version == "base-v"
    assert p.routes_to_expert(load_image(PH2 / "images" / sorted(p.name for p in (PH2 / "images").iterdir())[-1]))

    # round 2: from the routed version; the fallback stays the original model, not the first expert
    trained2 = tmp_path / "train2" / "last.safetensors"
    save_checkpoint(trained2, state, config, dict(info, version="p7-v002"))
    path2, made2 = cand.make_candidate(trained2, path, "p7-v001", cand.plan_routing(path, data, settings), settings)
    assert made2["kind"] == "routed"
    fb2 = load_checkpoint(path2, fallback=True)[0]
    np.testing.assert_array_equal(fb2["head.weight"].numpy(), state["head.weight"].half().float().numpy())
    assert read_info(path2)["routing"]["fallback"]["version"] == "base-v"

    # routing off: parent + 0.5 x (trained - parent)
    off = FinetuneSettings.from_env({}, routing=False, interpolate=0.5)
    assert cand.plan_routing(DEFAULT_CHECKPOINT, data, off) is None
    path3, made3 = cand.make_candidate(trained, DEFAULT_CHECKPOINT, "base-v", None, off)
    assert made3 == {"kind": "interpolated", "routing": None}
    w = load_checkpoint(path3)[0]["head.weight"]
    torch.testing.assert_close(w, state["head.weight"] * 1.005)
