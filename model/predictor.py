"""Click-by-click prediction with the two-stage network.

    predictor = Predictor.load("default")          # or a .safetensors path
    session = predictor.open(image)                # H x W x 3 uint8 RGB (see model.images)
    prob = session.add_click(x=120, y=80, positive=True)   # float32 H x W in [0, 1], full resolution
    session.undo(); session.reset()

Per click: a coarse pass on the whole image (long side `coarse_size`), then the IAM focus view:
crop around what the click changed, refine with the same network, paste back, and repeat on a
shrinking crop while the refinement still changes the mask. The session keeps the mask at a
bounded working resolution (long side <= `max_work_side`) and answers at full resolution.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, cast

import cv2
import numpy as np
import torch

from . import focus, zoom
from .box_seed import deepest_point, grabcut_seed
from .checkpoint import CheckpointError, build_model, file_sha256, resolve
from .clicks import Click
from .config import ModelConfig, check_types
from .fold import fold_batchnorm
from .guided_filter import guided_filter
from .images import to_rgb8
from .runtime import CompiledNet, choose, compile_net, default_cache, graph_inputs
from .settings import INFERENCE_RUNTIME, INFERENCE_THREADS
from .views import Box, Prompt, View, inside, round32

if TYPE_CHECKING:
    from .network import InteractiveSegNet

log = logging.getLogger("simclick.predictor")


@dataclass(frozen=True)
class PredictorOptions:
    coarse: bool = True            # stage 1: whole image
    refine: bool = True            # stage 2: IAM focus view
    coarse_size: int = 384         # long side of the coarse view (rounded to a multiple of 32)
    focus_size: int = 0            # side of the focus crop given to the network; 0 = model input_size
    focus_expand: float = 1.75     # crop side = (2r + 1) * expand
    focus_min_radius: float = 5.0  # px at working resolution (method.md)
    focus_min_side: int = 48       # smallest crop, px at working resolution
    focus_passes: int = 2          # progressive focus: at most this many refinements per click
    focus_shrink: float = 0.6      # each further pass shrinks the crop by this factor
    focus_tolerance: float = 0.005  # stop refining when a pass flips fewer than this fraction of the crop
    intention: bool = True         # refined pixels move only in the click's direction (outside the changed region)
    max_work_side: int = 2048      # working resolution bound (memory/time on 8000 x 6000 photos)
    threshold: float = 0.5
    max_history: int = 64          # undo depth
    # Guided filter on the answer (model.guided_filter): radius in pixels of the coarse view (scaled to
    # the working resolution), 0 = off; eps is the guide variance below which edges are smoothed over.
    edge_radius: float = 0.0
    edge_eps: float = 1e-3
    # Zoom-in (RITM's): from click `zoom_skip_clicks + 1` on, the coarse view is the box around the
    # current mask and the positive clicks, each side grown by `zoom_expand`, at least
    # `zoom_min_side` working pixels, instead of the whole image: small objects get more pixels.
    zoom_in: bool = False
    zoom_skip_clicks: int = 1
    zoom_expand: float = 1.4
    zoom_min_side: int = 200
    # A box alone (box-trained models): after the coarse view, this many passes on the square around
    # the box, each fed the answer before it (chosen on TrainVal: the model card's "Box prompts").
    box_passes: int = 2

    def __post_init__(self):
        if not (self.coarse or self.refine):
            raise ValueError("at least one of the coarse and refine stages must be enabled")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Holds one network in eval mode; sessions share it. Thread-safe: the weights are read-only
    under inference_mode and each session serialises its own calls.

    `runtime` (CPU only): "torch", or "openvino" / "onnxruntime" / "auto" to serve the network through
    that runtime (model/runtime.py), converted here (or read from the cache under the checkpoint's
    sha256 in `info`); if that fails, the reason is logged and PyTorch serves. `self.runtime` is what
    serves."""

    def __init__(self, net: torch.nn.Module, info: dict | None = None, device=None,
                 options: PredictorOptions | None = None, runtime: str = "torch", threads: int = 0,
                 cache=None):
        self.device = pick_device(device)
        self.info = info or {}
        self.options = options or PredictorOptions()
        self.config: ModelConfig = cast(ModelConfig, net.config)
        # A folded copy: BN costs nothing at inference, and a network still being trained is untouched.
        net = fold_batchnorm(net).to(self.device)
        self.compiled: CompiledNet | None = None
        wanted = choose(runtime) if self.device.type == "cpu" else "torch"
        if wanted != "torch":
            try:
                # as many threads as the PyTorch path would use (evaluation workers set it to 1)
                self.compiled = compile_net(cast("InteractiveSegNet", net), wanted, cache,
                                            self.info.get("checkpoint_sha256"), threads or torch.get_num_threads())
            except Exception as e:   # any failure of a converter: serve with PyTorch rather than not at all
                log.warning("inference runtime %s unavailable for %s, serving with PyTorch: %s: %s", wanted,
                            self.info.get("version", "this network"), type(e).__name__, e)
        if self.device.type == "cpu":
            net = net.to(memory_format=torch.channels_last)  # faster oneDNN convolutions
        self.net: InteractiveSegNet = cast("InteractiveSegNet", net)
        self.version = str(self.info.get("version", "unversioned"))

    @property
    def runtime(self) -> str:
        """What runs the network: "torch", "openvino" or "onnxruntime"."""
        return self.compiled.runtime if self.compiled is not None else "torch"

    @classmethod
    def load(cls, checkpoint: str | None = "default", device=None, runtime: str | None = None,
             **options) -> "Predictor":
        """runtime: see the class; None = INFERENCE_RUNTIME (default auto), with INFERENCE_THREADS and
        INFERENCE_CACHE."""
        path = resolve(checkpoint)
        net, info = build_model(path)
        info = dict(info, checkpoint_path=str(path), checkpoint_sha256=file_sha256(path))
        # The card's "predictor" entry holds the inference settings chosen for these weights (on the
        # validation split); explicit options override them.
        known = {f.name for f in fields(PredictorOptions)}
        card = info.get("predictor") or {}
        if not isinstance(card, dict):
            raise CheckpointError(f"{path}: the card's 'predictor' is not an object")
        chosen = {k: v for k, v in card.items() if k in known}
        try:
            check_types(PredictorOptions, chosen, "the card's predictor option")
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        runtime = INFERENCE_RUNTIME.parse(runtime) if runtime else INFERENCE_RUNTIME.read()
        kw = dict(device=device, options=PredictorOptions(**{**chosen, **options}), runtime=runtime,
                  threads=INFERENCE_THREADS.read(), cache=default_cache())
        if "routing" in info:      # a fine-tuned expert with its fallback (model.routing)
            from .routing import RoutedPredictor
            try:
                return RoutedPredictor(net, build_model(path, fallback=True)[0], info, **kw)
            except (KeyError, TypeError, ValueError) as e:     # a malformed routing entry
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"{path}: bad routing entry in its card: {e!r}") from None
        return cls(net, info, **kw)

    def with_options(self, **changes) -> "Predictor":
        """Same weights, other options (ablations: coarse/refine/intention on or off)."""
        p = type(self).__new__(type(self))
        p.__dict__.update(self.__dict__)
        p.options = replace(self.options, **changes)
        return p

    def open(self, image: np.ndarray, prior_mask: np.ndarray | None = None) -> "Session":
        return Session(self, to_rgb8(image), prior_mask)

    @torch.inference_mode()
    def encode(self, image: torch.Tensor):
        """The click-free part of the network for one view (1, 3, h, w) in [0, 1] on the device:
        computed once per view and reused by every click on it (model.network.ImageCode)."""
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.net.encode(image)
        return self.net.encode(image.contiguous(memory_format=torch.channels_last))

    @property
    def accepts_box(self) -> bool:
        """Whether the network was trained with box prompts (Session.set_box)."""
        return bool(getattr(self.config, "box_input", False))

    @torch.inference_mode()
    def run_net(self, code, clicks: list[tuple[float, float, bool]], prev: np.ndarray,
                box: tuple[float, float, float, float] | None = None) -> np.ndarray:
        """One head pass on an encoded view (`encode`). clicks (y, x, pos) in the view's pixel
        coordinates (may be empty when there is a box); prev (h, w) bool; box (y0, x0, y1, x1) in
        the view's pixels or None. Returns the (h, w) float32 probability."""
        rows = [(y, x, 1.0 if p else -1.0) for y, x, p in clicks] or [(-1.0, -1.0, 0.0)]
        cl = torch.tensor([rows], dtype=torch.float32, device=self.device)
        prev_t = torch.from_numpy(prev.astype(np.float32))[None, None].to(self.device)
        boxes = torch.tensor([box], dtype=torch.float32, device=self.device) if box is not None else None
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = self.net.decode(code, cl, prev_t, boxes).logits
            return torch.sigmoid(logits.float())[0, 0].cpu().numpy()
        compiled = self.compiled
        if compiled is not None:
            try:
                return compiled.run(graph_inputs(self.net, code, cl, self.net.prompt_maps(code, cl, prev_t, boxes)))
            except Exception as e:   # a runtime failing at run time: this and later clicks run in PyTorch
                log.warning("inference runtime %s failed, serving with PyTorch from now on: %s: %s",
                            compiled.runtime, type(e).__name__, e)
                self.compiled = None
        logits = self.net.decode(code, cl, prev_t, boxes).logits
        return torch.sigmoid(logits.float())[0, 0].cpu().numpy()

    def to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float().div_(255.0)


class Session:
    """One image being annotated: its clicks, its current mask, its undo history."""

    def __init__(self, predictor: Predictor, image: np.ndarray, prior_mask: np.ndarray | None = None):
        self.predictor = predictor
        opt = predictor.options
        self.height, self.width = image.shape[:2]
        # Working resolution: bounded so 8000 x 6000 photos cost what a 2 MP photo costs.
        self.scale = min(1.0, opt.max_work_side / max(self.height, self.width))
        if self.scale < 1.0:
            wh = (max(1, round(self.width * self.scale)), max(1, round(self.height * self.scale)))
            self.work = cv2.resize(image, wh, interpolation=cv2.INTER_AREA)
        else:
            self.work = image
        self.wh, self.ww = self.work.shape[:2]
        # Coarse view, computed once per image (the per-image cache).
        s = opt.coarse_size / max(self.wh, self.ww)
        self.coarse_hw = (round32(self.wh * s), round32(self.ww * s))
        coarse = cv2.resize(self.work, self.coarse_hw[::-1], interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        self.coarse_tensor = predictor.to_tensor(coarse)
        self._coarse_code = None   # the coarse view's encoding, computed at the first click
        self.focus_size = opt.focus_size or predictor.config.input_size
        self._lock = threading.Lock()
        self._prior = None
        if prior_mask is not None:
            prior_mask = np.asarray(prior_mask)
            if prior_mask.shape[:2] != (self.height, self.width):
                raise ValueError(f"prior mask is {prior_mask.shape[:2]}, image is {(self.height, self.width)}")
            self._prior = self._to_work(prior_mask.astype(np.float32))
        self.clicks: list[Click] = []
        self.box: tuple[float, float, float, float] | None = None   # (y0, x0, y1, x1), working pixels
        self.seed: list[Click] = []   # click-only model with a box: the seed's implicit first click
        self._group: list[int] = []   # clicks added by each add_clicks call (undo removes a group)
        self.last_timing: dict = {}
        self._touched: np.ndarray | None = None   # see _predict
        self._history: list[np.ndarray] = []
        self.prob = self._initial_prob()

    # -- public API ---------------------------------------------------------------------------
    def add_click(self, x: float, y: float, positive: bool) -> np.ndarray:
        """Add a click at full-resolution (x, y) and return the full-resolution probability map."""
        return self.add_clicks([(x, y, positive)])

    def add_clicks(self, clicks) -> np.ndarray:
        """Add several clicks [(x, y, positive), ...] in ONE prediction (a brush stroke's points):
        the coarse pass sees them all, the focus view follows the last. One undo step removes them all."""
        new = []
        for x, y, positive in clicks:
            x, y = float(x), float(y)
            if not (np.isfinite(x) and np.isfinite(y)) or not (0 <= x <= self.width and 0 <= y <= self.height):
                raise ValueError(f"click ({x:g}, {y:g}) is outside the {self.width}x{self.height} image")
            new.append(Click(x, y, bool(positive)))
        if not new:
            raise ValueError("no clicks given")
        with self._lock:
            self._history.append(self._history_copy())
            if len(self._history) > self.predictor.options.max_history:
                self._history.pop(0)
            self._group.append(len(new))
            self.clicks.extend(new)
            self.prob = self._snap_edges(self._predict(self.prob))
            return self.full_prob()

    def set_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Start from a box around the object (full-resolution pixels, x1/y1 exclusive) and return the
        full-resolution probability map; later clicks refine it. Before the first click. A model
        trained with boxes (`Predictor.accepts_box`) reads the box itself and keeps it as a prompt;
        for a click-only model GrabCut seeds the mask from the box (model.box_seed) and the network
        refines that seed as its previous mask, with an implicit positive click at its deepest point."""
        vals = [float(v) for v in (x0, y0, x1, y1)]
        if not all(np.isfinite(vals)):
            raise ValueError("box coordinates must be finite numbers")
        x0, y0 = max(0.0, min(vals[0], vals[2])), max(0.0, min(vals[1], vals[3]))
        x1, y1 = min(float(self.width), max(vals[0], vals[2])), min(float(self.height), max(vals[1], vals[3]))
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise ValueError(f"box ({vals[0]:g}, {vals[1]:g}, {vals[2]:g}, {vals[3]:g}) covers no pixel of the "
                             f"{self.width}x{self.height} image")
        with self._lock:
            if self.clicks or self.box is not None:
                raise ValueError("set the box before any click (reset() the session to start over)")
            self._history.append(self._history_copy())
            s = self.scale
            self.box = (y0 * s, x0 * s, y1 * s, x1 * s)
            if self.predictor.accepts_box:
                self.prob = self._snap_edges(self._predict_box())
            else:
                t0 = time.perf_counter()
                seeded = grabcut_seed(self.work, self.box)
                seed_ms = (time.perf_counter() - t0) * 1000
                y, x = View.scaled(1 / s).point(*deepest_point(seeded))     # back to full resolution
                self.seed = [Click(x, y, True)]
                self.prob = self._snap_edges(self._predict(seeded.astype(np.float32)))
                self.last_timing["seed_ms"] = seed_ms
            return self.full_prob()

    def undo(self) -> np.ndarray | None:
        """Remove the last click, or the clicks of the last add_clicks call (when no click is left,
        the box); returns the restored probability map (None if there was nothing to undo)."""
        with self._lock:
            if self.clicks:
                del self.clicks[len(self.clicks) - self._group.pop():]
            elif self.box is not None:
                self.box = None
                self.seed = []
            else:
                return None
            self.prob = self._history.pop().astype(np.float32) if self._history else self._initial_prob()
            return self.full_prob()

    def reset(self) -> None:
        with self._lock:
            self.clicks.clear()
            self._group.clear()
            self.box = None
            self.seed = []
            self._history.clear()
            self.prob = self._initial_prob()

    def _history_copy(self) -> np.ndarray:
        """The current map for the undo history, in float16. float16 keeps 11 bits, so a value within
        its rounding of the threshold could change sides: an undo would then answer another mask
        than the one shown before (and than replaying the clicks gives). Those values are nudged
        one float16 step back to their side."""
        thr = self.predictor.options.threshold
        h = self.prob.astype(np.float16)
        above = self.prob > thr
        wrong = (h.astype(np.float32) > thr) != above
        if wrong.any():
            up, down = wrong & above, wrong & ~above
            h[up] = np.nextafter(h[up], np.float16(np.inf))
            h[down] = np.nextafter(h[down], np.float16(-np.inf))
        return h

    # -- continuation elsewhere (the backend's replicas share this through Redis) -------------------
    @property
    def restorable(self) -> bool:
        """A continuation from `state()` is exact: with the coarse pass on, a prediction reads the
        previous answer only as a mask (prob > threshold); the refine-only ablation reads it as
        probabilities."""
        return bool(self.predictor.options.coarse)

    def state(self) -> dict:
        """What the next click needs: clicks (full resolution), their add_clicks groups, the box
        (working pixels) and the current mask at working resolution (packed bits)."""
        with self._lock:
            return {"clicks": [[c.x, c.y, c.positive] for c in self.clicks], "groups": list(self._group),
                    "box": list(self.box) if self.box is not None else None, "shape": [self.wh, self.ww],
                    "seed": [[c.x, c.y, c.positive] for c in self.seed],
                    "mask": np.packbits(self.prob > self.predictor.options.threshold)}

    def restore(self, state: dict) -> None:
        """Continue from another session's `state()` on the same image without running the network
        for it; the next click gives what it gives in that session (when `restorable`). The undo
        history is empty: an undo back into the restored clicks needs a replay."""
        shape = tuple(int(v) for v in state["shape"])
        if shape != (self.wh, self.ww):
            raise ValueError(f"state of a {shape} working image, this one is {(self.wh, self.ww)}")
        groups = [int(g) for g in state["groups"]]
        if sum(groups) != len(state["clicks"]):
            raise ValueError("state: click groups do not add up to the clicks")
        mask = np.unpackbits(np.asarray(state["mask"], np.uint8), count=self.wh * self.ww).reshape(self.wh, self.ww)
        with self._lock:
            self.clicks = [Click(float(x), float(y), bool(pos)) for x, y, pos in state["clicks"]]
            self._group = groups
            if state.get("box") is not None:
                y0, x0, y1, x1 = (float(v) for v in state["box"])
                self.box = (y0, x0, y1, x1)
            else:
                self.box = None
            self.seed = [Click(float(x), float(y), bool(pos)) for x, y, pos in state.get("seed", [])]
            self._history = []
            self.prob = mask.astype(np.float32)

    def full_prob(self) -> np.ndarray:
        if self.scale < 1.0:
            return cv2.resize(self.prob, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        return self.prob.copy()

    def mask(self) -> np.ndarray:
        return self.full_prob() > self.predictor.options.threshold

    # -- internals ----------------------------------------------------------------------------
    def _initial_prob(self) -> np.ndarray:
        if self._prior is not None:
            return self._prior.copy()
        return np.zeros((self.wh, self.ww), np.float32)

    def _to_work(self, a: np.ndarray) -> np.ndarray:
        if a.shape[:2] == (self.wh, self.ww):
            return a.astype(np.float32)
        return cv2.resize(a.astype(np.float32), (self.ww, self.wh), interpolation=cv2.INTER_AREA)

    def _work_clicks(self) -> list[Prompt]:
        """The seed and the clicks as (y, x, positive) at working resolution (model.views)."""
        return View.scaled(self.scale).prompts((c.y, c.x, c.positive) for c in self.seed + self.clicks)

    def _predict(self, prev_prob: np.ndarray) -> np.ndarray:
        p = self.predictor
        opt = p.options
        thr = opt.threshold
        prev = prev_prob > thr
        clicks = self._work_clicks()
        cy, cx, positive = clicks[-1]
        iy = int(min(max(round(cy), 0), self.wh - 1))
        ix = int(min(max(round(cx), 0), self.ww - 1))

        prob = prev_prob
        # Where this prediction wrote new values: the edge snapping filters only there (filtering
        # kept values again at every click would smooth them a little more each time).
        self._touched = None
        t0 = time.perf_counter()
        coarse_scale = 0.0   # network pixels per working pixel of the coarse (or zoom-in) view
        if opt.coarse:
            view = zoom.view(prev, clicks, self.box, opt) if opt.zoom_in else None
            if view is None:
                h, w = self.coarse_hw
                net_clicks = View.of((0, 0, self.wh, self.ww), h, w).prompts(clicks)
                prev_small = cv2.resize(prev.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
                prob = self._coarse_pass(net_clicks, prev_small)
                coarse_scale = max(self.coarse_hw) / max(self.wh, self.ww)
            else:
                prob, coarse_scale = zoom.coarse_pass(p, self.work, view, clicks, prev, prev_prob, self._view_box)
                self._touched = np.zeros(prev.shape, bool)
                self._touched[view[0]:view[2], view[1]:view[3]] = True
        t1 = time.perf_counter()
        self.last_timing = {"coarse_ms": (t1 - t0) * 1000, "refine_ms": 0.0, "refine_passes": 0}
        if not opt.refine:
            return prob

        region = focus.changed_region(prev, prob > thr, iy, ix)
        r = focus.focus_radius(prev, region, iy, ix, opt.focus_min_radius)
        if not opt.coarse and not region.any() and not prev.any():
            r = max(r, 0.25 * max(self.wh, self.ww))  # refine-only, nothing known yet: a wide first look
        half = max(r * opt.focus_expand, opt.focus_min_side / 2)
        for _ in range(opt.focus_passes):
            box = focus.focus_box(cy, cx, half, self.wh, self.ww)
            y0, x0, y1, x1 = box
            side = max(y1 - y0, x1 - x0)
            # A crop that is not zoomed in beyond the coarse view adds nothing but time.
            if self.focus_size / side <= 1.2 * coarse_scale:
                break
            refined = self._refine(box, clicks, prob > thr)
            self.last_timing["refine_passes"] += 1
            before = prob[y0:y1, x0:x1] > thr
            prob = focus.paste(prob, refined, box, positive, region if region.any() else None, opt.intention)
            if self._touched is not None:
                self._touched[y0:y1, x0:x1] = True
            flipped = np.count_nonzero(before != (prob[y0:y1, x0:x1] > thr)) / before.size
            if flipped < opt.focus_tolerance:
                break
            half *= opt.focus_shrink
            if 2 * half + 1 < opt.focus_min_side:
                break
        self.last_timing["refine_ms"] = (time.perf_counter() - t1) * 1000
        return prob

    def _coarse_pass(self, net_clicks, prev_small: np.ndarray) -> np.ndarray:
        """The whole image at the coarse size (its encoding cached); answer at working resolution."""
        p = self.predictor
        h, w = self.coarse_hw
        if self._coarse_code is None:
            self._coarse_code = p.encode(self.coarse_tensor)
        coarse = p.run_net(self._coarse_code, net_clicks, prev_small, self._view_box(View.of((0, 0, self.wh, self.ww), h, w)))
        return cv2.resize(coarse, (self.ww, self.wh), interpolation=cv2.INTER_LINEAR)

    def _view_box(self, view: View) -> Box | None:
        """The session's box in a view's pixels (a click-only model's box is in its seed instead)."""
        return view.box(self.box) if self.box is not None and self.predictor.accepts_box else None

    def _predict_box(self) -> np.ndarray:
        """A box alone: the coarse view, then `box_passes` focus passes on a square around the box
        (the box and 40% around it), each fed the answer before it, pasted back without the click
        intention rule."""
        opt = self.predictor.options
        h, w = self.coarse_hw
        empty = np.zeros((h, w), bool)
        t0 = time.perf_counter()
        prob = self._coarse_pass([], empty)
        t1 = time.perf_counter()
        by0, bx0, by1, bx1 = cast(tuple, self.box)      # called by set_box, after it set the box
        half = max(by1 - by0, bx1 - bx0) * 0.5 * 1.4
        crop = focus.focus_box((by0 + by1) / 2, (bx0 + bx1) / 2, max(half, opt.focus_min_side / 2), self.wh, self.ww)
        passes = opt.box_passes if opt.refine else 0
        for _ in range(passes):
            refined = self._refine(crop, [], prob > opt.threshold)
            prob = focus.paste(prob, refined, crop, True, None, intention=False)
        self.last_timing = {"coarse_ms": (t1 - t0) * 1000, "refine_ms": (time.perf_counter() - t1) * 1000,
                            "refine_passes": passes}
        return prob

    def _snap_edges(self, prob: np.ndarray) -> np.ndarray:
        opt = self.predictor.options
        touched, self._touched = self._touched, None
        if opt.edge_radius <= 0:
            return prob
        radius = int(round(opt.edge_radius * max(self.wh, self.ww) / max(self.coarse_hw)))
        snapped = np.clip(guided_filter(self.work, prob, radius, opt.edge_eps), 0.0, 1.0)
        return snapped if touched is None else np.where(touched, snapped, prob)

    def _refine(self, box, clicks, current: np.ndarray) -> np.ndarray:
        """Predict the crop `box` of the working image at the network's focus size."""
        y0, x0, y1, x1 = box
        ch, cw = y1 - y0, x1 - x0
        # Square crops keep the aspect; crops clipped by the border are stretched to the square.
        s = self.focus_size
        crop = cv2.resize(self.work[y0:y1, x0:x1], (s, s),
                          interpolation=cv2.INTER_AREA if max(ch, cw) > s else cv2.INTER_LINEAR)
        to_view = View.of(box, s, s)
        kept = [c for c in clicks[:-1] if inside(c[:2], box)]
        if clicks:
            ly, lx, lpos = clicks[-1]  # the latest click is the crop's reason to exist: always in it
            kept.append((min(max(ly, y0), y1 - 1), min(max(lx, x0), x1 - 1), lpos))
        net_clicks = to_view.prompts(kept)
        prev = cv2.resize(current[y0:y1, x0:x1].astype(np.uint8), (s, s), interpolation=cv2.INTER_NEAREST).astype(bool)
        p = self.predictor
        out = p.run_net(p.encode(p.to_tensor(crop)), net_clicks, prev, self._view_box(to_view))
        return cv2.resize(out, (cw, ch), interpolation=cv2.INTER_LINEAR)
