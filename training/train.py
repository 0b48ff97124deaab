"""Train the interactive segmentation network.

    python -m training.train --config training/configs/cpu-lite2.json [--resume] [--steps N]
    torchrun --nproc_per_node N -m training.train --config ...   # data-parallel (training/distributed.py)

The run (data, model and optimiser, resume, logs, validation, export) is here; one step, its
click simulation and losses, is training/step.py.

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
from dataclasses import dataclass, field
from typing import Dict, Optional, Protocol

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import build_model, read_info, save_checkpoint
from model.config import ModelConfig
from model.network import InteractiveSegNet, grow
from model.pem import PrototypeLoss
from model.predictor import Predictor, pick_device
from training.data import (DEFAULT_WEIGHTS, AugmentConfig, ClickSegDataset, Mixture, collate, default_sources,
                           source_from_spec, worker_init_fn)
from training.evaluation.datasets import mixture_val_samples
from training.evaluation.runner import box_only_miou, evaluate_dataset

from . import distributed
from .config import TrainConfig
from .state import load_state, save_state
from .step import train_step

LOSS_COLUMNS = ("loss", "seg", "focus", "pem", "kd", "iou")     # train_step's numbers, as log.csv shows them
LOG_FIELDS = ["step", "epoch", *LOSS_COLUMNS, "lr", "grad_norm", "sec_per_step", "elapsed_h"]


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


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 1% of the base rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


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
    run = _Run.build(cfg, device, dctx)
    start = run.start(resume)
    done = _loop(run, start, progress, on_step)
    if not run.main:
        return {"steps": done, "rank": dctx.rank, "world_size": dctx.world}
    final = run.validate(done) if run.val_samples else {}
    last = run.export(done, final or None, "last.safetensors")
    summary = {"steps": done, "hours": round(run.elapsed / 3600, 3), "final": final, "best": run.best,
               "last_checkpoint": str(last), "device": device_name(device)}
    if dctx.enabled:
        summary["world_size"] = dctx.world
    (run.out / "card.json").write_text(json.dumps(summary, indent=2))
    run.checkpoint(done)
    return summary


@dataclass
class _Run:
    """One training run: its network, optimiser and data, and what it writes to out_dir (rank 0
    alone writes logs, checkpoints, validates)."""
    cfg: TrainConfig
    device: torch.device
    dctx: distributed.Dist
    net: InteractiveSegNet
    pem: Optional[PrototypeLoss]
    optimizer: torch.optim.Optimizer
    mixture: Mixture
    anchors: Dict[str, torch.Tensor]              # L2-SP: the initial weights ({} without l2sp)
    teacher: Optional[InteractiveSegNet]
    init_state: Optional[Dict[str, torch.Tensor]]  # WiSE-FT: the initial weights (interpolate < 1)
    elapsed: float = 0.0
    best: Optional[dict] = None
    val_samples: list = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.dctx.main

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def state_path(self) -> Path:
        return self.out / "state.safetensors"

    @property
    def log_path(self) -> Path:
        return self.out / "log.csv"

    @classmethod
    def build(cls, cfg: TrainConfig, device, dctx: distributed.Dist) -> "_Run":
        if dctx.main:
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
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
        return cls(cfg, device, dctx, net, pem, optimizer, build_mixture(cfg), anchors, teacher, init_state)

    def start(self, resume: bool) -> int:
        """The step to start from: the saved state's with `resume` (its log cut there), else 0 (a
        new log); also writes config.json and draws the validation samples."""
        cfg, dctx, state_path, log_path = self.cfg, self.dctx, self.state_path, self.log_path
        start = 0
        # Resume: every rank reads the state (out_dir on storage all ranks see, or a copy on each
        # machine). The state is the whole model and optimizer, not a shard, and the global batch of a
        # step does not depend on the world size, so a resume with another number of processes works
        # (only the per-rank click-noise streams differ from a run that kept the old number).
        if resume and not distributed.all_equal(dctx, int(state_path.exists())):
            raise RuntimeError(f"--resume: {state_path} exists on some ranks only; every rank needs the state "
                               "(put out_dir on shared storage or copy it to each machine)")
        if resume and state_path.exists():
            header = load_state(state_path, self.net, self.pem, self.optimizer)
            start, self.elapsed, self.best = header["step"], header["elapsed"], header.get("best")
            if not distributed.all_equal(dctx, int(start)):
                raise RuntimeError(f"--resume: the ranks read different steps from {state_path} (copies out of date?)")
            if self.main:
                _truncate_log(log_path, start)
                was = int(header.get("world_size", 1))
                note = f" (saved by {was} process(es), continued by {dctx.world})" if was != dctx.world else ""
                print(f"resumed from {state_path} at step {start}{note}", file=sys.stderr)
        elif self.main and (not log_path.exists() or not resume):
            with log_path.open("w", newline="") as f:
                csv.writer(f).writerow(LOG_FIELDS)
        if self.main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.val_samples = validation_samples(cfg, self.mixture) if cfg.val_instances > 0 and self.main else []
        return start

    def checkpoint(self, step: int) -> None:
        if not self.main:
            return
        save_state(self.state_path, self.net, self.pem, self.optimizer,
                   {"step": step, "elapsed": self.elapsed, "best": self.best, "config": self.cfg.to_dict(),
                    "world_size": self.dctx.world})
        plot_losses(self.log_path, self.out / "loss.png")

    def weights(self) -> Dict[str, torch.Tensor]:
        """What is exported: the trained weights, or init + interpolate x (trained - init)."""
        state = self.net.state_dict()
        return state if self.init_state is None else interpolated(self.init_state, state, self.cfg.interpolate)

    def export(self, step: int, metrics: dict | None, name: str) -> Path:
        return save_checkpoint(self.out / name, self.weights(), self.net.config,
                               card(self.cfg, self.mixture, step, self.elapsed, self.device, metrics))

    def validate(self, step: int) -> dict:
        model = self.net
        if self.init_state is not None:      # validate what is exported: the interpolated weights
            model = plain_copy(self.net, self.device)
            model.load_state_dict(self.weights())
        metrics = validate(model, card(self.cfg, self.mixture, step, self.elapsed, self.device, None),
                           self.val_samples, self.device)
        with (self.out / "val.csv").open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        # Every validated step stays loadable: the shipped choice is made later, with the inference
        # settings (zoom-in, edge snapping) the in-loop validation does not use.
        self.export(step, metrics, f"step{step}.safetensors")
        if self.best is None or metrics["noc90"] < self.best["noc90"]:
            self.best = {"step": step, **metrics}
            self.export(step, metrics, "best.safetensors")
        return metrics


def _loop(run: _Run, start: int, progress: bool, on_step: Optional[OnStep]) -> int:
    """Train from `start` to cfg.steps: log.csv rows, checkpoints, in-loop validation. The steps done."""
    cfg, dctx, main = run.cfg, run.dctx, run.main
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr,
               disable=not (progress and main), dynamic_ncols=True)
    done = start
    t_last = time.perf_counter()
    with (run.log_path.open("a", newline="") if main else open(os.devnull, "w")) as logf:
        writer = csv.writer(logf)
        for step, epoch, batch in train_batches(cfg, run.mixture, start, dctx.rank, dctx.world):
            lr = lr_at(cfg, step)
            for g in run.optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            stats = train_step(cfg, run.net, run.pem, run.optimizer, batch, step, run.device, dctx, run.teacher)
            if run.anchors:
                pull_toward(run.net, run.anchors, cfg.l2sp * lr / cfg.lr)
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            run.elapsed += dt
            row = {"epoch": float(epoch), **{k: float(stats[k]) for k in LOSS_COLUMNS}, "lr": lr,
                   "grad_norm": float(stats["grad_norm"]), "sec_per_step": dt, "elapsed_h": run.elapsed / 3600}
            writer.writerow([step + 1, epoch, *(f"{stats[k]:.5f}" for k in LOSS_COLUMNS), f"{lr:.3e}",
                             f"{stats['grad_norm']:.3f}", f"{dt:.3f}", f"{run.elapsed / 3600:.4f}"])
            logf.flush()
            bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.1e}")
            bar.update(1)
            done = step + 1
            if on_step is not None and main:
                on_step(done, cfg.steps, row)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                run.checkpoint(done)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps and run.val_samples:
                m = run.validate(done)
                tqdm.write(f"step {done}: train-val NoC@85 {m['noc85']:.2f} NoC@90 {m['noc90']:.2f}", file=sys.stderr)
                t_last = time.perf_counter()  # validation time is not training time
    bar.close()
    return done


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
