"""Stage route (before training) and the candidate a job evaluates, made from the trained weights.

With FINETUNE_ROUTING (the default) the candidate is a routed checkpoint (model/routing.py): the
trained network answers images like the project's, the parent's network (the parent's own
fallback, when the parent is routed itself) every other image, so what the parent did well
elsewhere is kept as it was. The router learns from the project's training images against base
training images, and is used only if it sends held-out images of both kinds the right way
(FINETUNE_ROUTE_MIN): the holdout to the trained network, base images it never saw to the parent.
The router needs only the parent's backbone, so it is fitted before training, and its answer
decides how the network trains: a network that will answer only the project's images learns from
them alone (FINETUNE_ROUTED_REHEARSAL, 0), one that will answer every image also rehearses the
base data (FINETUNE_REHEARSAL). Otherwise (a project whose images look like the base data, or
routing off) the candidate is the parent moved FINETUNE_INTERPOLATE of the way to the trained
weights (WiSE-FT).

Either way the promotion gate then judges the candidate on the holdout and the benchmarks.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional

import numpy as np

log = logging.getLogger(__name__)

ROUTER_FIT_BASE = 300      # base training images the router learns "not the project's" from
ROUTER_CHECK_BASE = 100    # further base images it is checked on
ROUTER_L2 = 1e-4


def project_images(data: Path, split: str) -> Iterator[np.ndarray]:
    """The RGB images of the pulled tasks of `split` ("train" or "holdout"; backend.labelstudio.pull)."""
    from model.images import load_image  # imports torch: not on the enqueue path

    for task in json.loads((data / f"{split}.json").read_text()):
        yield load_image(data / "images" / task["data"]["image"])


def base_images() -> tuple[List[Path], List[Path]]:
    """(fit, check): base training images drawn at random (seed 0) from every source, disjoint."""
    from training.data.catalog import base_image_files

    files = base_image_files()
    order = np.random.default_rng(0).permutation(len(files))
    return ([files[i] for i in order[:ROUTER_FIT_BASE]],
            [files[i] for i in order[ROUTER_FIT_BASE:ROUTER_FIT_BASE + ROUTER_CHECK_BASE]])


def fit_router(fallback, data: Path, route_min: float):
    """(router, validation, usable) for a fallback Predictor and the pulled project `data`."""
    from model.images import load_image
    from model.routing import Router, embeddings, validate

    fit, check = base_images()
    own = embeddings(fallback, project_images(data, "train"))
    router = Router.fit(own, embeddings(fallback, (load_image(p) for p in fit)), l2=ROUTER_L2)
    validation = validate(router, embeddings(fallback, project_images(data, "holdout")),
                          embeddings(fallback, (load_image(p) for p in check)))
    usable = bool(validation["own"] and validation["other"] and validation["own_to_expert"] >= route_min
                  and validation["other_to_fallback"] >= route_min)
    return router, validation, usable


@dataclass
class Routing:
    """The router a job fitted before training, and whether the candidate will use it."""
    router: Any
    validation: dict
    usable: bool


def plan_routing(parent: Path, data: Path, settings) -> Optional[Routing]:
    """The router for the parent and the pulled project `data` (None with routing off). It reads
    only the parent's backbone, not the trained weights: fitted before training, it decides how
    the network trains (a routed network answers only images like the project's)."""
    from model.predictor import Predictor

    if not settings.routing:
        return None
    # the router reads the PyTorch backbone only: no runtime conversion of the parent here
    loaded = Predictor.load(str(parent), runtime="torch")
    fallback = getattr(loaded, "fallback", loaded)       # a routed parent: embed with its own fallback
    router, validation, usable = fit_router(fallback, data, settings.route_min)
    log.info("router: %s", dict(validation, used=usable))
    return Routing(router, validation, usable)


def make_candidate(trained: Path, parent: Path, parent_name: str, routing: Optional[Routing],
                   settings) -> tuple[Path, dict]:
    """-> (the candidate checkpoint, what was made: {"kind": "routed" | "interpolated" | "trained",
    "routing": the router's validation or None})."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.routing import fallback_state, route_card
    from training.train import interpolated

    state, config, info = load_checkpoint(trained)
    parent_state, _, parent_info = load_checkpoint(parent)
    out = trained.with_name("candidate.safetensors")
    made: dict = {"kind": "trained", "routing": None if routing is None else dict(routing.validation,
                                                                                  used=routing.usable)}
    if routing is not None and routing.usable:
        parent_fallback = load_checkpoint(parent, fallback=True)[0] if "routing" in parent_info else None
        if parent_fallback is None:
            parent_info = dict(parent_info, version=parent_name)
        card = dict(info, routing=route_card(routing.router, parent_info, routing.validation))
        save_checkpoint(out, {**state, **fallback_state(parent_state, parent_fallback)}, config, card, half=True)
        return out, dict(made, kind="routed")
    if settings.interpolate < 1:
        card = dict(info, interpolated={"alpha": settings.interpolate, "parent": parent_name})
        save_checkpoint(out, interpolated(parent_state, state, settings.interpolate), config, card)
        return out, dict(made, kind="interpolated")
    return trained, made
