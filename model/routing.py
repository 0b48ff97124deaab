"""Which network answers an image: a project's fine-tuned expert, or the model it came from.

A network fine-tuned on one team's images learns their domain and loses part of what it knew
elsewhere (catastrophic forgetting). A routed checkpoint keeps both networks (Expert Gate,
Aljundi et al., CVPR 2017): the expert's weights as usual, the fallback's under the "fallback."
prefix (model.checkpoint.FALLBACK), and a linear router that tells, from one image embedding,
whether an image looks like the project's. Images that do go to the expert; every other image is
answered by the fallback exactly as before the fine-tuning, so nothing is forgotten by
construction, and the promotion gate still checks both sides (holdout and benchmarks).

The embedding is the fallback network's own backbone features of the image squeezed to
EMBED_SIDE, with no click, averaged over space at strides 4 and 16, L2-normalised: one backbone
pass at 224 x 224 per new image, a few milliseconds beside a click's cost.

The card's "routing" entry: {"router": {"weight": [...], "bias": b}, "fallback": {"model": config,
"version": name, "predictor": options}, "validation": {...}}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, cast

import cv2
import numpy as np
import torch

from .checkpoint import FALLBACK
from .images import to_rgb8
from .predictor import Predictor, PredictorOptions, Session

EMBED_SIDE = 224


@torch.inference_mode()
def embedding(predictor: Predictor, rgb: np.ndarray) -> np.ndarray:
    """The router's input for one RGB uint8 image: a unit float32 vector (see the docstring)."""
    net = predictor.net
    small = cv2.resize(to_rgb8(rgb), (EMBED_SIDE, EMBED_SIDE), interpolation=cv2.INTER_AREA)
    x = (predictor.to_tensor(np.ascontiguousarray(small)) - net.mean) / net.std
    # The backbone with no click, no previous mask and no box: an early-fusion network's extra
    # input channels are zero (the channels' "nothing" value), a late-fusion one has none.
    extra = net.backbone.first_conv().in_channels - 3
    if extra:
        x = torch.cat([x, x.new_zeros(1, extra, EMBED_SIDE, EMBED_SIDE)], 1)
    _, s4, s16 = net.backbone(x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x)
    v = torch.cat([t.float().mean((2, 3))[0] for t in (s4, s16)])
    return (v / v.norm().clamp_min(1e-12)).cpu().numpy().astype(np.float32)


def embeddings(predictor, images: Iterable[np.ndarray]) -> np.ndarray:
    return np.stack([embedding(predictor, im) for im in images])


@dataclass(frozen=True)
class Router:
    """Logistic regression on the embedding: score > 0 means "the project's domain"."""
    weight: tuple[float, ...]
    bias: float

    def scores(self, emb: np.ndarray) -> np.ndarray:
        return np.atleast_2d(emb) @ np.asarray(self.weight, dtype=np.float32) + self.bias

    def is_own(self, emb: np.ndarray) -> bool:
        return bool(self.scores(emb)[0] > 0)

    @classmethod
    def fit(cls, own: np.ndarray, other: np.ndarray, l2: float = 1e-3, iters: int = 200) -> "Router":
        """Both classes weigh the same whatever their counts; the L2 term keeps the weights small
        enough that a few hundred images do not make a brittle boundary."""
        if len(own) == 0 or len(other) == 0:
            raise ValueError("the router needs images of both the project and the base data")
        x = torch.from_numpy(np.concatenate([own, other])).double()
        y = torch.cat([torch.ones(len(own)), torch.zeros(len(other))]).double()
        sample_w = torch.cat([torch.full((len(own),), 0.5 / len(own)), torch.full((len(other),), 0.5 / len(other))]).double()
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, weight=sample_w, reduction="sum")
                    + l2 * w.square().sum())
            loss.backward()
            return loss
        opt.step(closure)
        return cls(tuple(float(v) for v in w.detach()), float(b.detach()))

    def to_dict(self) -> dict:
        return {"weight": list(self.weight), "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict) -> "Router":
        return cls(tuple(float(v) for v in d["weight"]), float(d["bias"]))


def validate(router: Router, own: np.ndarray, other: np.ndarray) -> dict:
    """Share of held-out project images routed to the expert, and of held-out base images to the
    fallback."""
    return {"own_to_expert": round(float((router.scores(own) > 0).mean()), 4) if len(own) else None,
            "other_to_fallback": round(float((router.scores(other) <= 0).mean()), 4) if len(other) else None,
            "own": len(own), "other": len(other)}


def fallback_state(init_state: dict, parent_fallback: dict | None) -> dict:
    """The fallback's tensors under the checkpoint's prefix: the parent's own fallback when the
    parent is itself routed (a second round keeps serving other images with the original model),
    else the parent."""
    return {FALLBACK + k: v for k, v in (parent_fallback if parent_fallback is not None else init_state).items()}


def route_card(router: Router, fallback_info: dict, validation: dict) -> dict:
    fb = fallback_info.get("routing", {}).get("fallback") or {
        "model": fallback_info["model"], "version": fallback_info.get("version"),
        "predictor": fallback_info.get("predictor") or {}}
    return {"router": router.to_dict(), "fallback": fb, "validation": validation}


class RoutedPredictor(Predictor):
    """The expert's Predictor, whose open() hands an image unlike the project's to the fallback's.
    Both answer with the same options (the card's "predictor" settings and the caller's)."""

    def __init__(self, expert_net, fallback_net, info: dict, device=None, options: PredictorOptions | None = None,
                 **runtime):
        super().__init__(expert_net, info, device=device, options=options, **runtime)
        routing = info["routing"]
        fb_info = {k: v for k, v in info.items() if k != "routing"}
        fb_info["version"] = routing["fallback"].get("version") or "fallback"
        if fb_info.get("checkpoint_sha256"):      # the converted-network cache's key: not the expert's
            fb_info["checkpoint_sha256"] += "-fallback"
        self.fallback = Predictor(fallback_net, fb_info, device=device, options=self.options, **runtime)
        self.router = Router.from_dict(routing["router"])

    def routes_to_expert(self, image: np.ndarray) -> bool:
        return self.router.is_own(embedding(self.fallback, image))

    def open(self, image: np.ndarray, prior_mask: np.ndarray | None = None) -> Session:
        rgb = to_rgb8(image)
        if self.routes_to_expert(rgb):
            return Session(self, rgb, prior_mask)
        return self.fallback.open(rgb, prior_mask)

    def with_options(self, **changes) -> "Predictor":
        p = cast(RoutedPredictor, super().with_options(**changes))
        p.fallback = self.fallback.with_options(**changes)
        return p
