"""Data-parallel training with torch.distributed (gloo on CPU, NCCL on CUDA).

    torchrun --nproc_per_node N -m training.train --config ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `setup()` joins the
process group from them (a caller that already initialised one, e.g. a test, keeps its own). One
process per GPU; on CPU, N processes share the machine's cores.

Design (training/train.py uses these helpers):
- Sharding: the global batch of step s is the same whatever the world size (samples
  s*B .. s*B+B-1 of the epoch, B = batch_size); rank r takes samples r, r+N, r+2N, ... of it
  (`shard_indices`). So the averaged gradient equals the single-process gradient of that batch
  (the loss is a mean of per-sample means), and a run can be resumed with another N.
- Gradients: after backward, one all-reduce of all gradients, divided by N (`average_gradients`),
  then clipping and the optimizer step as in one process. Not DistributedDataParallel: a training
  step calls the network's encode/decode several times (simulated click rounds without gradient,
  several supervised click points sharing one backbone pass with retain_graph, a focus-view
  forward), which does not fit DDP's one-forward-one-backward contract (its reducer would fire per
  backward and `find_unused_parameters` would be needed for the frozen-backbone phase). An
  explicit all-reduce is what DDP does at the end of the backward, in one place we control.
- Buffers (BatchNorm running statistics, PEM's prototype EMA) are averaged across ranks after each
  step, so every rank holds the same model state and rank 0's checkpoint is the model.
- Optional SyncBatchNorm (`sync_bn: true`, CUDA only: torch's SyncBatchNorm has no CPU kernel).
  Without it each rank normalises with its own share of the batch (the usual DDP behaviour).
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar, cast

import torch
from timm.layers import convert_sync_batchnorm as timm_convert  # keeps timm's BatchNormAct2d activations
import torch.distributed as dist

from model.settings import LOCAL_RANK, SIMCLICK_DIST_TIMEOUT_S, WORLD_SIZE

_Net = TypeVar("_Net", bound=torch.nn.Module)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False     # this module initialised the process group (and tears it down)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> Dist:
    """Join the process group torchrun describes in the environment, or use the one already
    initialised; a plain `python -m training.train` is world size 1."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), LOCAL_RANK.read())
    world = WORLD_SIZE.read()
    if world <= 1:
        return Dist()
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = LOCAL_RANK.read()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    # Rank 0 validates and writes checkpoints while the others wait in the next all-reduce: the
    # timeout must outlast a validation pass (default one hour; SIMCLICK_DIST_TIMEOUT_S).
    timeout = datetime.timedelta(seconds=SIMCLICK_DIST_TIMEOUT_S.read())
    dist.init_process_group(backend, timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def teardown(d: Dist, wait: bool = True) -> None:
    if d.enabled and wait:
        dist.barrier()
    if d.owns_group:
        dist.destroy_process_group()


def check_batch(batch_size: int, d: Dist) -> int:
    """The per-rank batch size; the global batch must split evenly."""
    if batch_size % d.world:
        raise ValueError(f"batch_size {batch_size} does not split over {d.world} processes: use a multiple of "
                         f"{d.world} (batch_size is the global batch; each rank takes batch_size / N)")
    return batch_size // d.world


class ShardSampler(torch.utils.data.Sampler):
    """Indices of this rank's share of consecutive global batches from `start` on: of global batch
    [k*B, (k+1)*B) the samples k*B + r, k*B + r + N, ... (B = global batch, N = world, r = rank)."""

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch_size, self.rank, self.world = start, stop, batch_size, rank, world

    def __iter__(self):
        for i in range(self.start, self.stop):
            if (i % self.batch_size) % self.world == self.rank:
                yield i

    def __len__(self) -> int:
        return sum(1 for _ in self)


def broadcast_model(d: Dist, *modules: torch.nn.Module | None) -> None:
    """Rank 0's parameters and buffers to every rank (the same start even if a rank's pretrained
    weights or random init differed)."""
    if not d.enabled:
        return
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            with torch.no_grad():
                dist.broadcast(t.data, src=0)


def average_gradients(d: Dist, params) -> None:
    """Sum every trainable parameter's gradient over the ranks and divide by N, in one flat
    all-reduce. A parameter without a gradient on some rank contributes zeros; one without a
    gradient on every rank keeps None (so the optimizer skips it, as in one process)."""
    if not d.enabled:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(has)
    dist.all_reduce(flat)
    flat /= d.world
    offset = 0
    for p, h in zip(params, has.tolist()):
        n = p.numel()
        if h > 0:
            g = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n


def average_buffers(d: Dist, *modules: torch.nn.Module | None) -> None:
    """Floating buffers (BatchNorm running mean/var, PEM's prototype) averaged over the ranks;
    integer/bool buffers (step counters, flags) take the maximum."""
    if not d.enabled:
        return
    for m in modules:
        if m is None:
            continue
        floats = [b for b in m.buffers() if b.is_floating_point()]
        if floats:
            flat = torch.cat([b.reshape(-1).float() for b in floats])
            dist.all_reduce(flat)
            flat /= d.world
            offset = 0
            for b in floats:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
        for b in m.buffers():
            if not b.is_floating_point():
                t = b.to(torch.int64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                b.copy_(t.to(b.dtype))


def mean_stats(d: Dist, stats: dict) -> dict:
    """Per-step numbers (loss, IoU, ...) averaged over the ranks, for rank 0's log."""
    if not d.enabled:
        return stats
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: float(v) / d.world for k, v in zip(keys, t.tolist())}


def all_equal(d: Dist, value: int) -> bool:
    if not d.enabled:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == value and int(t[1]) == -value


def convert_sync_batchnorm(net: _Net, device: torch.device) -> _Net:
    if device.type != "cuda":
        raise ValueError("sync_bn needs CUDA: torch's SyncBatchNorm has no CPU kernel (on CPU each rank "
                         "normalises with its own share of the batch; set sync_bn: false)")
    # the network's own BatchNorm layers are replaced inside it; the root (not a BatchNorm) comes back
    return cast(_Net, timm_convert(net))


class LogFollower:
    """Calls on_step(step, total, stats) (training.train.OnStep) from the last row of a run's
    log.csv, when its step changed since the last call."""

    def __init__(self, log_path: Path, total: int, on_step: Callable[[int, int, dict], None]):
        self.log_path, self.total, self.on_step = log_path, total, on_step
        self.last = -1

    def poll(self) -> None:
        try:
            lines = self.log_path.read_text().splitlines()
        except OSError:
            return
        if len(lines) < 2:
            return
        header, row = lines[0].split(","), lines[-1].split(",")
        if len(row) != len(header):              # a row being written
            return
        try:
            stats = {k: float(v) for k, v in zip(header, row) if v != ""}
            step = int(stats.pop("step"))
        except (KeyError, ValueError):
            return
        if step != self.last:
            self.last = step
            self.on_step(step, self.total, stats)


POLL_S = 1.0    # how often torchrun_train reads log.csv for on_step


def torchrun_train(cfg, nproc: int, resume: bool = False, threads: int | None = None, timeout: float | None = None,
                   on_step: Callable[[int, int, dict], None] | None = None) -> dict:
    """Run `torchrun --standalone --nproc_per_node nproc -m training.train` on `cfg` (a TrainConfig)
    in a child process and return rank 0's summary (out_dir/card.json). For callers that train in
    process otherwise (the fine-tuning worker, FINETUNE_GPUS): the config goes to
    out_dir/torchrun-config.json, the output to out_dir/torchrun.log. The child gets SIGTERM when
    this process dies (a stopped RQ work-horse leaves no training behind).

    `on_step(step, total, stats)` as train()'s, but from log.csv, read every POLL_S seconds while
    waiting for the child (and once at its end): the training runs in torchrun's processes, which
    a callback in this one cannot reach, and rank 0 already writes and flushes a log.csv row per
    step; so a step is reported up to POLL_S late and steps in between are skipped."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "torchrun-config.json"
    cfg_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    (out / "card.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "training.train", "--config", str(cfg_path)]
    if resume:
        cmd.append("--resume")
    if threads:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    def die_with_parent() -> None:   # Linux: PR_SET_PDEATHSIG
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
        except OSError:
            pass

    log_path = out / "torchrun.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)
        follower = LogFollower(out / "log.csv", cfg.steps, on_step) if on_step is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
                try:
                    rc = proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                if follower is not None:
                    follower.poll()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc == 0 and follower is not None:
        follower.poll()                          # the last step
    if rc != 0:
        text = log_path.read_text(errors="replace")
        errors = re.findall(r"^\[rank\d+\]: (\w*(?:Error|Exception)\b.*)$", text, re.M)   # a rank's exception
        raise RuntimeError(f"torchrun training ({nproc} processes) failed with exit code {rc}"
                           + (f": {errors[0]}" if errors else "") + f"; see {log_path}")
    return json.loads((out / "card.json").read_text())
