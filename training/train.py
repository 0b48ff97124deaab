"""Train the interactive segmentation network.

    python -m training.train --config training/configs/cpu-lite2.json [--resume] [--steps N]
    torchrun --nproc_per_node N -m training.train --config ...   # data-parallel (training/distributed.py)

Each step (method.md, issue 4): a batch of augmented crops with initial clicks from the gt; 0..N
rounds of clicks placed on the model's own errors without gradient (RITM), the previous mask fed
back; then one loss on the global view and one on a focus-view crop around the latest click, both
through the ONE network, plus PEM's prototype loss on the click vectors.

Outputs in out_dir: state.safetensors (resumable, atomic, every `checkpoint_every` steps),
log.csv, loss.png, val.csv, last.safetensors / best.safetensors / step<N>.safetensors at each validation
(inference checkpoints), card.json.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Protocol

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import build_model, read_info, save_checkpoint
from model.config import ModelConfig
from model.network import InteractiveSegNet, grow
from model.pem import PrototypeLoss
from model.predictor import Predictor, pick_device
from training.data import (DEFAULT_WEIGHTS, PAD_CLICK, AugmentConfig, ClickSegDataset, Mixture, add_next_clicks, collate,
                           default_sources, focus_view, last_clicks, remap_boxes, sample_boxes, sample_focus_boxes,
                           source_from_spec, worker_init_fn)
from training.evaluation.datasets import mixture_val_samples
from training.evaluation.runner import box_only_miou, evaluate_dataset

from . import distributed
from .config import TrainConfig
from .losses import LOSSES, distill_loss
from .state import load_state, save_state

LOG_FIELDS = ["step", "epoch", "loss", "seg", "focus", "pem", "kd", "iou", "lr", "grad_norm", "sec_per_step",
              "elapsed_h"]


class OnStep(Protocol):
    """Progress of a training run: called after each step with the steps done (1-based, the
    `step` of log.csv), the steps of the run (cfg.steps) and that step's log.csv numbers (every
    LOG_FIELDS column but `step`, as floats). With several processes only rank 0 calls it."""

    def __call__(self, step: int, total: int, stats: Dict[str, float], /) -> None: ...


# -- data --------------------------------------------------------------------------------------
def build_mixture(cfg: TrainConfig):
    if cfg.sources:
        sources = [source_from_spec(spec, cfg.data_root) for spec in cfg.sources]
    else:
        sources = default_sources(cfg.data_root)
    if cfg.rehearsal <= 0:
        return Mixture(sources, weights=cfg.source_weights, val_fraction=cfg.val_fraction, seed=split_seed(cfg))
    return rehearsal_mixture(cfg, sources)


def rehearsal_mixture(cfg: TrainConfig, own: list):
    """`own` sources (all of their items train) mixed with the default training sources at a share
    `cfg.rehearsal` of the draws: a fine-tuning run keeps seeing what the model learnt before (the
    lever against forgetting). The default sources keep their split (val_fraction, split seed),
    so `--datasets TrainVal` stays held out."""
    if not cfg.sources:
        raise ValueError("rehearsal mixes the default training sources into `sources`: set sources")
    if not 0 < cfg.rehearsal < 1:
        raise ValueError(f"rehearsal must be in (0, 1), not {cfg.rehearsal}")
    base = default_sources(cfg.rehearsal_root)
    clash = {s.name for s in own} & {s.name for s in base}
    if clash:
        raise ValueError(f"source names {sorted(clash)} are taken by the rehearsal sources: rename them")
    own_w = np.array([float((cfg.source_weights or {}).get(s.name, DEFAULT_WEIGHTS.get(s.name, 1.0))) for s in own])
    base_w = np.array([DEFAULT_WEIGHTS.get(s.name, 1.0) for s in base])
    weights = np.concatenate([(1 - cfg.rehearsal) * own_w / own_w.sum(), cfg.rehearsal * base_w / base_w.sum()])
    return Mixture(own + base, weights=weights, val_fraction=cfg.val_fraction, seed=split_seed(cfg),
                   train_only=[s.name for s in own])


def split_seed(cfg: TrainConfig) -> int:
    return cfg.seed if cfg.split_seed is None else cfg.split_seed


def train_batches(cfg: TrainConfig, mixture, start_step: int, rank: int = 0, world: int = 1):
    """Yields (step, epoch, batch) from start_step on. A batch depends only on (seed, epoch, index), so a
    resumed run sees exactly the batches the killed run would have seen. With `world` processes,
    rank r gets samples r, r+world, ... of each global batch (the global batch does not depend on
    the world size)."""
    per_epoch = 1000
    ds = ClickSegDataset(mixture, "train", length=per_epoch * cfg.batch_size,
                         augment_cfg=augment_config(cfg), seed=cfg.seed)
    step = start_step
    while step < cfg.steps:
        epoch, offset = divmod(step, per_epoch)
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size // world,
            sampler=distributed.ShardSampler(offset * cfg.batch_size, len(ds), cfg.batch_size, rank, world),
            num_workers=cfg.num_workers, collate_fn=collate, drop_last=True,
            worker_init_fn=worker_init_fn if cfg.num_workers > 0 else None,
            persistent_workers=False, prefetch_factor=2 if cfg.num_workers > 0 else None)
        for batch in loader:
            yield step, epoch, batch
            step += 1
            if step >= cfg.steps:
                return


def augment_config(cfg: TrainConfig):
    extra = dict(cfg.augment)
    if "scale_range" in extra:
        extra["scale_range"] = tuple(extra["scale_range"])
    return AugmentConfig(crop_size=cfg.crop_size, **extra)


# -- model and optimiser -----------------------------------------------------------------------
def build_net(cfg: TrainConfig) -> InteractiveSegNet:
    if cfg.init_checkpoint:
        net, info = build_model(cfg.init_checkpoint)
        if cfg.model:   # e.g. {"box_input": true}: the checkpoint's network taught a new input
            net = grow(net, ModelConfig.from_dict({**net.config.to_dict(), **cfg.model}))
        return net
    return InteractiveSegNet(ModelConfig.from_dict(cfg.model), pretrained=cfg.pretrained)


def build_teacher(cfg: TrainConfig, device) -> InteractiveSegNet:
    """The initial model, frozen, for distillation (cfg.distill): what the rehearsal samples learn
    to keep answering."""
    if not cfg.init_checkpoint or cfg.rehearsal <= 0:
        raise ValueError("distill needs init_checkpoint (the teacher) and rehearsal > 0 (the samples it teaches on)")
    teacher = build_net(cfg).to(device).eval()
    if device.type == "cpu":
        teacher = teacher.to(memory_format=torch.channels_last)
    teacher.requires_grad_(False)
    return teacher


def build_optimizer(cfg: TrainConfig, net: InteractiveSegNet):
    """Three groups: the pretrained backbone at lr x backbone_lr_mult (FocusCut/RITM practice), the
    new head at lr, and the click inputs at lr x input_lr_mult.

    Why the click inputs get their own, higher rate: the widened first conv starts its click and
    mask channels at zero (and SPM's sign embedding near zero), and Adam moves a weight by at most
    about lr per step, so at lr 5e-4 they need thousands of steps to matter next to the RGB filters
    (measured: after 300 CPU steps the click weights were 1% of the RGB ones and the logit at a
    positive click was still negative). The RGB filters of that conv stay as pretrained: a
    gradient hook zeroes their part, so the high rate only moves the new channels.
    """
    first = net.backbone.first_conv().weight
    inputs = [first] + ([net.spm.sign_embed.weight] if net.spm is not None else [])
    taken = {id(p) for p in inputs}
    backbone = [p for p in net.backbone.parameters() if id(p) not in taken]
    head = [p for n, p in net.named_parameters() if not n.startswith("backbone.") and id(p) not in taken]
    if cfg.freeze_rgb_stem and cfg.pretrained:
        first.register_hook(_zero_rgb_grad)
    groups = [{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult, "lr_mult": cfg.backbone_lr_mult},
              {"params": head, "lr": cfg.lr, "lr_mult": 1.0},
              # No weight decay here: it would shrink the frozen RGB filters that share this tensor.
              {"params": inputs, "lr": cfg.lr * cfg.input_lr_mult, "lr_mult": cfg.input_lr_mult, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {cfg.optimizer!r}")


def pull_toward(net, anchors: Dict[str, torch.Tensor], fraction: float) -> None:
    """Move every parameter `fraction` of the way back to its anchor (decoupled L2-SP: the same
    on every rank, so ranks stay identical)."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.lerp_(anchors[name], fraction)


def interpolated(init: Dict[str, torch.Tensor], trained: Dict[str, torch.Tensor], alpha: float) -> Dict[str, torch.Tensor]:
    """init + alpha x (trained - init) for every floating tensor (weight-space ensembling, WiSE-FT:
    a fine-tuned model mixed with the one it started from keeps more of what that one knew, at a
    part of the gain). Integer buffers (BatchNorm's batch counter) are the trained ones."""
    return {k: torch.lerp(init[k], v, alpha) if v.is_floating_point() else v for k, v in trained.items()}


def _zero_rgb_grad(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[:, :3] = 0
    return grad


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


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 1% of the base rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# -- one step ----------------------------------------------------------------------------------
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
    gt = batch["mask"].to(device)
    valid = batch["valid"].to(device)
    clicks = batch["clicks"].to(device)
    seg_loss = LOSSES[cfg.loss]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    set_train_mode(cfg, net, step)
    backbone_trains = any(p.requires_grad for p in net.backbone.parameters())
    with torch.set_grad_enabled(backbone_trains), autocast:
        code = net.encode(image)

    # Box prompts (a model with box_input): on a share of the samples the user starts with a box
    # around the object instead of the initial clicks; the box stays for the later clicks.
    boxes, box_alone = None, None
    if net.config.box_input:
        use = rng.random(gt.shape[0]) < cfg.box_prob
        drawn = sample_boxes(gt.cpu(), rng, cfg.box_noise, valid=valid.cpu())
        drawn[~use] = -1.0
        boxes = torch.from_numpy(drawn).to(device)
        if use.any():
            clicks = clicks.clone()
            clicks[torch.from_numpy(use).to(device)] = torch.tensor(PAD_CLICK, device=device, dtype=clicks.dtype)
        # Why: with the box alone supervised only on the steps without simulated rounds (a quarter),
        # the box + clicks samples taught the network to lean on the clicks, and the box alone got
        # worse as training went on (TrainVal box-only mIoU 0.61 -> 0.49 in 250 steps).
        if cfg.box_alone_prob > 0:
            box_alone = torch.from_numpy(use & (rng.random(gt.shape[0]) < cfg.box_alone_prob)).to(device)

    def predict(clicks, prev):
        return (torch.sigmoid(net.decode(code, clicks, prev, boxes).logits.float()) > 0.5).float() * valid

    # Iterative click simulation: the model's own errors decide the next clicks (no gradient).
    prev = torch.zeros_like(gt)
    rounds = int((rng if not dctx.enabled else np.random.default_rng([cfg.seed, step, 13])).integers(0, cfg.max_sim_rounds + 1))
    if rounds:
        net.eval()
        with torch.no_grad(), autocast:
            for _ in range(rounds):
                prev = predict(clicks, prev)
                clicks = add_next_clicks(clicks, gt > 0.5, prev > 0.5, valid > 0.5, rng, cfg.sim_inner_ratio)
        set_train_mode(cfg, net, step)
        if box_alone is not None and box_alone.any():   # these samples: back to the box alone
            clicks = clicks.clone()
            clicks[box_alone] = torch.tensor(PAD_CLICK, device=device, dtype=clicks.dtype)
            prev[box_alone] = 0

    optimizer.zero_grad(set_to_none=True)
    points = max(1, cfg.click_points)
    # Own random stream: switching the focus view off for a step leaves the other draws alone.
    with_focus = cfg.focus_view and np.random.default_rng([cfg.seed, step, 11]).random() < cfg.focus_prob
    totals = {"loss": 0.0, "seg": 0.0, "focus": 0.0, "pem": 0.0, "kd": 0.0, "iou": 0.0}
    # Which samples rehearse the base data: the rehearsal sources follow the run's own in the mixture.
    rehearse = (batch["source"].to(device) >= len(cfg.sources or ())) if teacher is not None else None
    if rehearse is not None and not rehearse.any():
        rehearse = None
    for k in range(points):
        last = k == points - 1
        with autocast:
            out = net.decode(code, clicks, prev, boxes, return_features=True)
            loss_seg = seg_loss(out.logits, gt, valid)
            if out.coarse_logits is not None:   # deep supervision of the stride-4 answer the boundary head refines
                coarse_up = torch.nn.functional.interpolate(out.coarse_logits, size=gt.shape[-2:], mode="bilinear",
                                                            align_corners=False)
                loss_seg = loss_seg + cfg.coarse_loss_weight * seg_loss(coarse_up, gt, valid)
            loss_pem = pem(out.features, gt, out.click_feats, clicks[..., 2]) if pem is not None else torch.zeros((), device=device)
            loss_focus = torch.zeros((), device=device)
            loss_kd = torch.zeros((), device=device)
            if rehearse is not None:
                loss_kd = _distilled(teacher, out.logits, rehearse, image, clicks, prev, boxes, valid)
            if last and with_focus:
                # Second view: a crop around the latest click, fed the global prediction as its previous
                # mask, as the predictor's refine stage does at inference.
                crops = sample_focus_boxes(last_clicks(clicks).cpu(), gt.shape[-2], gt.shape[-1], rng, valid=valid.cpu())
                coarse = (torch.sigmoid(out.logits.detach().float()) > 0.5).float()
                fv = focus_view(crops, image, gt, prev=coarse, clicks=clicks, valid=valid, out_size=gt.shape[-1])
                fimg = fv["image"].contiguous(memory_format=torch.channels_last) if device.type == "cpu" else fv["image"]
                fboxes = None if boxes is None else torch.from_numpy(remap_boxes(boxes.cpu(), crops, gt.shape[-1])).to(device)
                out2 = net(fimg, fv["clicks"].to(device), fv["prev"], return_features=True, boxes=fboxes)
                loss_focus = seg_loss(out2.logits, fv["mask"], fv["valid"])
                if rehearse is not None:
                    loss_kd = loss_kd + _distilled(teacher, out2.logits, rehearse, fimg, fv["clicks"].to(device),
                                                   fv["prev"], fboxes, fv["valid"])
                if pem is not None:
                    loss_pem = 0.5 * (loss_pem + pem(out2.features, fv["mask"], out2.click_feats, fv["clicks"][..., 2].to(device)))
            loss = loss_seg + loss_focus + cfg.pem_weight * loss_pem + cfg.distill * loss_kd
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()}; lower the learning rate")
        # Backward per point: the point's head graph is freed at once; the shared backbone graph
        # (when it trains) is kept until the last point.
        (loss / points).backward(retain_graph=backbone_trains and not last)
        with torch.no_grad():  # IoU of the global view's answer: a readable progress signal (the NFL value is not)
            pred = (out.logits.detach().float() > 0) & (valid > 0.5)
            truth = (gt > 0.5) & (valid > 0.5)
            iou = ((pred & truth).sum((1, 2, 3)) / (pred | truth).sum((1, 2, 3)).clamp_min(1)).mean().item()
        for name, v in (("loss", loss), ("seg", loss_seg), ("focus", loss_focus), ("pem", loss_pem), ("kd", loss_kd)):
            totals[name] += float(v.detach()) / points
        totals["iou"] += iou / points
        if not last:
            prev = (torch.sigmoid(out.logits.detach().float()) > 0.5).float() * valid
            clicks = add_next_clicks(clicks, gt > 0.5, prev > 0.5, valid > 0.5, rng, cfg.sim_inner_ratio)
    distributed.average_gradients(dctx, net.parameters())   # several processes: the global batch's gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
    optimizer.step()
    distributed.average_buffers(dctx, net, pem)              # BN statistics, PEM prototype: one model state
    return distributed.mean_stats(dctx, {**totals, "grad_norm": float(grad_norm)})


def _distilled(teacher, logits, rehearse, image, clicks, prev, boxes, valid) -> torch.Tensor:
    """distill_loss of the rehearsal samples' logits against the teacher's on the same input."""
    idx = rehearse.nonzero().flatten()
    with torch.no_grad():
        target = teacher(image[idx], clicks[idx], prev[idx], boxes=None if boxes is None else boxes[idx]).logits
    return distill_loss(logits[idx], target, valid[idx])


# -- validation, export ------------------------------------------------------------------------
def validation_samples(cfg: TrainConfig, mixture) -> list:
    """The first `val_instances` held-out instances at full resolution, sources interleaved: for a
    config on the default sources, the first instances of `--datasets TrainVal` with this seed."""
    return list(itertools.islice(mixture_val_samples(mixture, split_seed(cfg)), cfg.val_instances))


def validate(net, info: dict, samples: list, device) -> dict:
    was_training = net.training
    if any(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules()):
        net = plain_copy(net, device)   # the predictor folds plain BatchNorm2d
    predictor = Predictor(net, info, device=device)
    result = evaluate_dataset(predictor, samples, dataset="train-val", progress=False)
    m = result.metrics()
    out: dict[str, float] = {k: m[k] for k in ("noc85", "noc90", "nof90", "spc") if k in m}
    if predictor.accepts_box:   # a box-trained model: also what a box alone gives
        out["box_miou"] = box_only_miou(predictor, samples)
    net.train(was_training)
    return out


def plain_copy(net, device) -> InteractiveSegNet:
    """The same weights in a network with plain BatchNorm (no SyncBatchNorm), in eval mode."""
    plain = InteractiveSegNet(net.config, pretrained=False)
    plain.load_state_dict(net.state_dict())
    return plain.to(device).eval()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def inherited_card(cfg: TrainConfig) -> dict:
    """What a model trained from `init_checkpoint` keeps of that checkpoint's card: the inference
    settings chosen for its weights (the "predictor" entry: zoom-in, edge snapping). Without them
    a fine-tuned model would be evaluated and served with the predictor's bare defaults."""
    if not cfg.init_checkpoint:
        return {}
    predictor = read_info(cfg.init_checkpoint).get("predictor")
    return {"predictor": dict(predictor)} if predictor else {}


def card(cfg: TrainConfig, mixture, step: int, seconds: float, device, metrics: dict | None) -> dict:
    return {
        **inherited_card(cfg),
        **({"interpolated": {"alpha": cfg.interpolate, "init": cfg.init_checkpoint}} if cfg.interpolate < 1 else {}),
        "version": cfg.version or f"{Path(cfg.out_dir).name}-s{step}",
        "training": {
            "config": cfg.to_dict(), "steps": step, "hours": round(seconds / 3600, 3),
            "device": device_name(device), "data": mixture.summary(), "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "metrics": {"train-val": metrics} if metrics else {},
    }


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def plot_losses(log_path: Path, out_png: Path) -> None:
    # matplotlib takes ~0.8 s to import and must get its Agg backend before pyplot: only the plot needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(log_path.open()))
    if len(rows) < 2:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for key in ("loss", "seg", "focus", "pem", "kd", "iou"):
        have = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if len(have) < 2:
            continue
        x, v = np.array(have).T
        k = max(1, len(v) // 30)  # moving average so the trend is readable
        smooth = np.convolve(v, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1:], smooth, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss / batch IoU (moving average)")
    ax.set_title(f"training loss - {log_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)


# -- main loop ---------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, on_step: Optional[OnStep] = None) -> dict:
    """Train `cfg`; rank 0's summary (or the rank's, with several processes). `progress`: the
    terminal progress bar; `on_step(step, total, stats)`: called after every step (OnStep)."""
    device = pick_device(None if cfg.device == "auto" else cfg.device)
    dctx = distributed.setup(device.type)     # torchrun: one process per GPU (or CPU share); else world 1
    ok = False
    try:
        summary = _train(cfg, resume, progress, device, dctx, on_step)
        ok = True
        return summary
    finally:
        distributed.teardown(dctx, wait=ok)   # no barrier after a failure: the other ranks may never get there


def _train(cfg: TrainConfig, resume: bool, progress: bool, device, dctx: distributed.Dist,
           on_step: Optional[OnStep] = None) -> dict:
    if dctx.enabled and device.type == "cuda":
        device = torch.device("cuda", dctx.local_rank)
    distributed.check_batch(cfg.batch_size, dctx)
    main = dctx.main                          # rank 0 alone writes logs, checkpoints, validates
    out = Path(cfg.out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    net = build_net(cfg).to(device).train()
    if cfg.sync_bn and dctx.enabled:
        net = distributed.convert_sync_batchnorm(net, device)
    if device.type == "cpu":
        # oneDNN's convolutions (forward and backward) run faster in NHWC on an x86 CPU (measured on
        # 2 AVX2 cores: lite2 at 352 px, batch 8, 4.07 -> 2.74 s per forward+backward)
        net = net.to(memory_format=torch.channels_last)
    pem = PrototypeLoss(net.config.decoder_channels, cfg.pem_beta).to(device) if cfg.pem_weight > 0 else None
    distributed.broadcast_model(dctx, net, pem)
    # L2-SP: the initial weights (also on resume: build_net loads the same init_checkpoint)
    anchors = {n: p.detach().clone() for n, p in net.named_parameters()} if cfg.l2sp > 0 else {}
    teacher = build_teacher(cfg, device) if cfg.distill > 0 else None
    if not 0 < cfg.interpolate <= 1:
        raise ValueError(f"interpolate must be in (0, 1], not {cfg.interpolate}")
    # WiSE-FT: the initial weights, to export init + interpolate x (trained - init)
    init_state = ({k: v.detach().clone() for k, v in net.state_dict().items()}
                  if cfg.interpolate < 1 and cfg.init_checkpoint else None)
    optimizer = build_optimizer(cfg, net)
    mixture = build_mixture(cfg)
    state_path = out / "state.safetensors"
    log_path = out / "log.csv"
    start, elapsed, best = 0, 0.0, None
    # Resume: every rank reads the state (out_dir on storage all ranks see, or a copy on each
    # machine). The state is the whole model and optimizer, not a shard, and the global batch of a
    # step does not depend on the world size, so a resume with another number of processes works
    # (only the per-rank click-noise streams differ from a run that kept the old number).
    if resume and not distributed.all_equal(dctx, int(state_path.exists())):
        raise RuntimeError(f"--resume: {state_path} exists on some ranks only; every rank needs the state "
                           "(put out_dir on shared storage or copy it to each machine)")
    if resume and state_path.exists():
        header = load_state(state_path, net, pem, optimizer)
        start, elapsed, best = header["step"], header["elapsed"], header.get("best")
        if not distributed.all_equal(dctx, int(start)):
            raise RuntimeError(f"--resume: the ranks read different steps from {state_path} (copies out of date?)")
        if main:
            _truncate_log(log_path, start)
            was = int(header.get("world_size", 1))
            note = f" (saved by {was} process(es), continued by {dctx.world})" if was != dctx.world else ""
            print(f"resumed from {state_path} at step {start}{note}", file=sys.stderr)
    elif main and (not log_path.exists() or not resume):
        with log_path.open("w", newline="") as f:
            csv.writer(f).writerow(LOG_FIELDS)
    if main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    val_samples = validation_samples(cfg, mixture) if cfg.val_instances > 0 and main else []

    def checkpoint(step: int) -> None:
        if not main:
            return
        save_state(state_path, net, pem, optimizer,
                   {"step": step, "elapsed": elapsed, "best": best, "config": cfg.to_dict(),
                    "world_size": dctx.world})
        plot_losses(log_path, out / "loss.png")

    def export(step: int, metrics: dict | None, name: str) -> Path:
        state = net.state_dict() if init_state is None else interpolated(init_state, net.state_dict(), cfg.interpolate)
        return save_checkpoint(out / name, state, net.config, card(cfg, mixture, step, elapsed, device, metrics))

    def run_validation(step: int) -> dict:
        nonlocal best
        model = net
        if init_state is not None:      # validate what is exported: the interpolated weights
            model = plain_copy(net, device)
            model.load_state_dict(interpolated(init_state, net.state_dict(), cfg.interpolate))
        metrics = validate(model, card(cfg, mixture, step, elapsed, device, None), val_samples, device)
        with (out / "val.csv").open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        # Every validated step stays loadable: the shipped choice is made later, with the inference
        # settings (zoom-in, edge snapping) the in-loop validation does not use.
        export(step, metrics, f"step{step}.safetensors")
        if best is None or metrics["noc90"] < best["noc90"]:
            best = {"step": step, **metrics}
            export(step, metrics, "best.safetensors")
        return metrics

    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr,
               disable=not (progress and main), dynamic_ncols=True)
    done = start
    t_last = time.perf_counter()
    with (log_path.open("a", newline="") if main else open(os.devnull, "w")) as logf:
        writer = csv.writer(logf)
        for step, epoch, batch in train_batches(cfg, mixture, start, dctx.rank, dctx.world):
            lr = lr_at(cfg, step)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            stats = train_step(cfg, net, pem, optimizer, batch, step, device, dctx, teacher)
            if anchors:
                pull_toward(net, anchors, cfg.l2sp * lr / cfg.lr)
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            elapsed += dt
            writer.writerow([step + 1, epoch, *(f"{stats[k]:.5f}" for k in ("loss", "seg", "focus", "pem", "kd", "iou")),
                             f"{lr:.3e}", f"{stats['grad_norm']:.3f}", f"{dt:.3f}", f"{elapsed / 3600:.4f}"])
            logf.flush()
            bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.1e}")
            bar.update(1)
            done = step + 1
            if on_step is not None and main:
                on_step(done, cfg.steps, {"epoch": float(epoch), **{k: float(stats[k]) for k in (
                    "loss", "seg", "focus", "pem", "kd", "iou")}, "lr": lr, "grad_norm": float(stats["grad_norm"]),
                    "sec_per_step": dt, "elapsed_h": elapsed / 3600})
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                checkpoint(done)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps and val_samples:
                m = run_validation(done)
                tqdm.write(f"step {done}: train-val NoC@85 {m['noc85']:.2f} NoC@90 {m['noc90']:.2f}", file=sys.stderr)
                t_last = time.perf_counter()  # validation time is not training time
    bar.close()
    if not main:
        return {"steps": done, "rank": dctx.rank, "world_size": dctx.world}
    final = run_validation(done) if val_samples else {}
    last = export(done, final or None, "last.safetensors")
    summary = {"steps": done, "hours": round(elapsed / 3600, 3), "final": final, "best": best,
               "last_checkpoint": str(last), "device": device_name(device)}
    if dctx.enabled:
        summary["world_size"] = dctx.world
    (out / "card.json").write_text(json.dumps(summary, indent=2))
    checkpoint(done)
    return summary


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log rows after the resumed step (they belong to work the kill threw away)."""
    if not log_path.exists():
        return
    rows = [r for r in csv.DictReader(log_path.open()) if r.get("step") and int(r["step"]) <= step]
    with log_path.open("w", newline="") as f:  # also brings a log of an older column set up to date
        writer = csv.DictWriter(f, LOG_FIELDS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="JSON training config (training/configs/)")
    ap.add_argument("--resume", action="store_true", help="continue from out_dir/state.safetensors")
    ap.add_argument("--steps", type=int, help="override the number of steps")
    ap.add_argument("--out-dir", help="override the output directory")
    ap.add_argument("--device", help="cpu | cuda | auto")
    ap.add_argument("--data-root", help="training data root (default ../shared/datasets/train)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig.load(args.config, steps=args.steps, out_dir=args.out_dir, device=args.device,
                           data_root=args.data_root)
    summary = train(cfg, resume=args.resume)
    if "rank" not in summary:   # rank 0 (or a single process) reports
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
