"""One training step (`train_step`): the batch's forward passes, losses and optimiser step.

Each step (method.md, issue 4): a batch of augmented crops with initial clicks from the gt; 0..N
rounds of clicks placed on the model's own errors without gradient (RITM), the previous mask fed
back; then one loss on the global view and one on a focus-view crop around the latest click, both
through the ONE network, plus PEM's prototype loss on the click vectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from training.data import (PAD_CLICK, add_next_clicks, focus_view, last_clicks, remap_boxes, sample_boxes,
                           sample_focus_boxes)

from . import distributed
from .config import TrainConfig
from .losses import LOSSES, distill_loss

LOSS_PARTS = ("loss", "seg", "focus", "pem", "kd")


def set_train_mode(cfg: TrainConfig, net, step: int) -> None:
    """Training mode, except that during the first `freeze_backbone_steps` the backbone is frozen:
    no gradient (so no backward pass through it: a step costs about half) and BatchNorm on its
    ImageNet statistics. The head learns to read the pretrained features and the late click maps
    first; then the whole network, click channels of the first conv included, is trained."""
    frozen = step < cfg.freeze_backbone_steps
    net.train()
    net.backbone.requires_grad_(not frozen)
    if frozen or cfg.freeze_backbone_bn:
        # BatchNorm statistics of a batch of 8 are noisy; the ImageNet ones are a steadier base
        # (and switching from them to batch statistics when the backbone thaws would jolt it).
        net.backbone.eval()
    if cfg.freeze_bn:
        # Fine-tuning on one domain: batch statistics of its images would become every BatchNorm's
        # running statistics, and the network would then normalise every other image as if it
        # were of that domain.
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


@dataclass
class _Step:
    """What every forward pass of one step shares: the batch on the device, the encoded image, the
    box prompts, the rehearsal samples, and the step's settings."""
    cfg: TrainConfig
    net: Any
    pem: Any
    teacher: Any
    image: torch.Tensor
    gt: torch.Tensor
    valid: torch.Tensor
    code: Any
    boxes: Optional[torch.Tensor]
    rehearse: Optional[torch.Tensor]
    autocast: Any
    device: torch.device
    rng: np.random.Generator

    def predict(self, clicks, prev) -> torch.Tensor:
        """The binary answer to (clicks, previous mask), no gradient asked."""
        logits = self.net.decode(self.code, clicks, prev, self.boxes).logits
        return (torch.sigmoid(logits.float()) > 0.5).float() * self.valid

    def next_clicks(self, clicks, prev) -> torch.Tensor:
        """The user's next click: on the errors of `prev`."""
        return add_next_clicks(clicks, self.gt > 0.5, prev > 0.5, self.valid > 0.5, self.rng, self.cfg.sim_inner_ratio)


def train_step(cfg: TrainConfig, net, pem, optimizer, batch, step: int, device,
               dctx: distributed.Dist = distributed.Dist(), teacher=None) -> dict:
    """One optimiser step on a batch.

    The image is encoded once (with late fusion that is the backbone pass; with early fusion only
    the normalisation). Then 0..max_sim_rounds clicks are added on the model's own errors without
    gradient (RITM), and `click_points` predictions are supervised one after the other, each next
    click placed on the errors of the prediction before it (the user's next click) with that
    prediction fed back as the previous mask. With late fusion the points share the backbone pass,
    which is what makes more than one per crop cheap.

    With a `teacher` (the initial model, cfg.distill > 0), the rehearsal samples of the batch
    (drawn from the base training data) also learn its answers, global and focus view alike.
    """
    # One process: the streams as they always were. Several: per-sample draws (clicks, boxes,
    # dropout) from a per-rank stream, so ranks do not repeat each other's noise; what decides
    # how many forward passes run (simulation rounds, focus view) from streams every rank shares.
    rng = np.random.default_rng([cfg.seed, step, 7] if not dctx.enabled else [cfg.seed, step, 7, dctx.rank])
    torch.manual_seed(cfg.seed * 1_000_003 + step + 7_919 * dctx.rank)  # dropout masks reproducible on resume
    image = batch["image"].to(device)
    if device.type == "cpu":
        image = image.contiguous(memory_format=torch.channels_last)
    gt, valid, clicks = batch["mask"].to(device), batch["valid"].to(device), batch["clicks"].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    set_train_mode(cfg, net, step)
    backbone_trains = any(p.requires_grad for p in net.backbone.parameters())
    with torch.set_grad_enabled(backbone_trains), autocast:
        code = net.encode(image)
    boxes, box_alone, clicks = _box_prompts(cfg, net, gt, valid, clicks, rng, device)
    # Which samples rehearse the base data: the rehearsal sources follow the run's own in the mixture.
    rehearse = (batch["source"].to(device) >= len(cfg.sources or ())) if teacher is not None else None
    if rehearse is not None and not rehearse.any():
        rehearse = None
    s = _Step(cfg, net, pem, teacher, image, gt, valid, code, boxes, rehearse, autocast, device, rng)
    rounds_rng = rng if not dctx.enabled else np.random.default_rng([cfg.seed, step, 13])
    clicks, prev = _simulate(s, clicks, int(rounds_rng.integers(0, cfg.max_sim_rounds + 1)), box_alone, step)

    optimizer.zero_grad(set_to_none=True)
    points = max(1, cfg.click_points)
    # Own random stream: switching the focus view off for a step leaves the other draws alone.
    with_focus = cfg.focus_view and np.random.default_rng([cfg.seed, step, 11]).random() < cfg.focus_prob
    totals = dict.fromkeys((*LOSS_PARTS, "iou"), 0.0)
    for k in range(points):
        last = k == points - 1
        with autocast:
            parts, logits = _losses(s, clicks, prev, focus=last and with_focus)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()}; lower the learning rate")
        # Backward per point: the point's head graph is freed at once; the shared backbone graph
        # (when it trains) is kept until the last point.
        (loss / points).backward(retain_graph=backbone_trains and not last)
        for name, v in parts.items():
            totals[name] += float(v.detach()) / points
        totals["iou"] += _batch_iou(logits, gt, valid) / points
        if not last:
            prev = (torch.sigmoid(logits.detach().float()) > 0.5).float() * valid
            clicks = s.next_clicks(clicks, prev)
    distributed.average_gradients(dctx, net.parameters())   # several processes: the global batch's gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
    optimizer.step()
    distributed.average_buffers(dctx, net, pem)              # BN statistics, PEM prototype: one model state
    return distributed.mean_stats(dctx, {**totals, "grad_norm": float(grad_norm)})


def _box_prompts(cfg: TrainConfig, net, gt, valid, clicks, rng, device):
    """(boxes, box_alone, clicks). Box prompts (a model with box_input): on a share of the samples
    the user starts with a box around the object instead of the initial clicks; the box stays for
    the later clicks. `box_alone`: the samples supervised on the box alone (no simulated clicks)."""
    if not net.config.box_input:
        return None, None, clicks
    use = rng.random(gt.shape[0]) < cfg.box_prob
    drawn = sample_boxes(gt.cpu(), rng, cfg.box_noise, valid=valid.cpu())
    drawn[~use] = -1.0
    boxes = torch.from_numpy(drawn).to(device)
    if use.any():
        clicks = clicks.clone()
        clicks[torch.from_numpy(use).to(device)] = torch.tensor(PAD_CLICK, device=device, dtype=clicks.dtype)
    box_alone = None
    # Why a share of its own: with the box alone supervised only on the steps without simulated
    # rounds, the box + clicks samples taught the network to lean on the clicks, and the box alone
    # got worse as training went on (measured: model/weights/README.md, "Box prompts").
    if cfg.box_alone_prob > 0:
        box_alone = torch.from_numpy(use & (rng.random(gt.shape[0]) < cfg.box_alone_prob)).to(device)
    return boxes, box_alone, clicks


def _simulate(s: _Step, clicks, rounds: int, box_alone, step: int):
    """(clicks, prev) after `rounds` of iterative click simulation: the model's own errors decide
    the next clicks (no gradient)."""
    prev = torch.zeros_like(s.gt)
    if not rounds:
        return clicks, prev
    s.net.eval()
    with torch.no_grad(), s.autocast:
        for _ in range(rounds):
            prev = s.predict(clicks, prev)
            clicks = s.next_clicks(clicks, prev)
    set_train_mode(s.cfg, s.net, step)
    if box_alone is not None and box_alone.any():   # these samples: back to the box alone
        clicks = clicks.clone()
        clicks[box_alone] = torch.tensor(PAD_CLICK, device=s.device, dtype=clicks.dtype)
        prev[box_alone] = 0
    return clicks, prev


def _losses(s: _Step, clicks, prev, focus: bool) -> tuple[dict, torch.Tensor]:
    """({loss, seg, focus, pem, kd}, the global view's logits) of one supervised point."""
    cfg, seg_loss = s.cfg, LOSSES[s.cfg.loss]
    out = s.net.decode(s.code, clicks, prev, s.boxes, return_features=True)
    loss_seg = seg_loss(out.logits, s.gt, s.valid)
    if out.coarse_logits is not None:   # deep supervision of the stride-4 answer the boundary head refines
        coarse_up = torch.nn.functional.interpolate(out.coarse_logits, size=s.gt.shape[-2:], mode="bilinear",
                                                    align_corners=False)
        loss_seg = loss_seg + cfg.coarse_loss_weight * seg_loss(coarse_up, s.gt, s.valid)
    zero = torch.zeros((), device=s.device)
    loss_pem = s.pem(out.features, s.gt, out.click_feats, clicks[..., 2]) if s.pem is not None else zero
    loss_kd = zero
    if s.rehearse is not None:
        loss_kd = _distilled(s.teacher, out.logits, s.rehearse, s.image, clicks, prev, s.boxes, s.valid)
    loss_focus = zero
    if focus:
        loss_focus, loss_pem, loss_kd = _focus_losses(s, out, clicks, prev, loss_pem, loss_kd)
    loss = loss_seg + loss_focus + cfg.pem_weight * loss_pem + cfg.distill * loss_kd
    return dict(zip(LOSS_PARTS, (loss, loss_seg, loss_focus, loss_pem, loss_kd))), out.logits


def _focus_losses(s: _Step, out, clicks, prev, loss_pem, loss_kd):
    """(focus loss, PEM loss, distillation loss) with the second view: a crop around the latest
    click, fed the global prediction as its previous mask, as the predictor's refine stage does at
    inference. The PEM loss is averaged over both views, the distillation loss summed."""
    gt, valid, device = s.gt, s.valid, s.device
    crops = sample_focus_boxes(last_clicks(clicks).cpu(), gt.shape[-2], gt.shape[-1], s.rng, valid=valid.cpu())
    coarse = (torch.sigmoid(out.logits.detach().float()) > 0.5).float()
    fv = focus_view(crops, s.image, gt, prev=coarse, clicks=clicks, valid=valid, out_size=gt.shape[-1])
    fimg = fv["image"].contiguous(memory_format=torch.channels_last) if device.type == "cpu" else fv["image"]
    fboxes = None if s.boxes is None else torch.from_numpy(remap_boxes(s.boxes.cpu(), crops, gt.shape[-1])).to(device)
    out2 = s.net(fimg, fv["clicks"].to(device), fv["prev"], return_features=True, boxes=fboxes)
    loss_focus = LOSSES[s.cfg.loss](out2.logits, fv["mask"], fv["valid"])
    if s.rehearse is not None:
        loss_kd = loss_kd + _distilled(s.teacher, out2.logits, s.rehearse, fimg, fv["clicks"].to(device),
                                       fv["prev"], fboxes, fv["valid"])
    if s.pem is not None:
        loss_pem = 0.5 * (loss_pem + s.pem(out2.features, fv["mask"], out2.click_feats, fv["clicks"][..., 2].to(device)))
    return loss_focus, loss_pem, loss_kd


def _batch_iou(logits, gt, valid) -> float:
    """IoU of the global view's answer: a readable progress signal (the NFL value is not)."""
    with torch.no_grad():
        pred = (logits.detach().float() > 0) & (valid > 0.5)
        truth = (gt > 0.5) & (valid > 0.5)
        return ((pred & truth).sum((1, 2, 3)) / (pred | truth).sum((1, 2, 3)).clamp_min(1)).mean().item()


def _distilled(teacher, logits, rehearse, image, clicks, prev, boxes, valid) -> torch.Tensor:
    """distill_loss of the rehearsal samples' logits against the teacher's on the same input."""
    idx = rehearse.nonzero().flatten()
    with torch.no_grad():
        target = teacher(image[idx], clicks[idx], prev[idx], boxes=None if boxes is None else boxes[idx]).logits
    return distill_loss(logits[idx], target, valid[idx])
