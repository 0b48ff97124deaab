"""Data-parallel training (training/distributed.py): 2 real processes on gloo, CPU, tiny config.

Ranks stay in sync, a resume continues exactly, a resume with another world size works, and a
2-rank run equals a 1-rank run with the same global batch."""
import csv
import tempfile
from pathlib import Path

import pytest
import torch

from training import distributed
from training.train import LOG_FIELDS, train

from .conftest import DATASETS
from .test_training_loop import tiny_config, weights

pytestmark = pytest.mark.skipif(not (DATASETS / "train").is_dir(), reason=f"training data not at {DATASETS / 'train'}")


def _eval_mode(cfg, net, step):
    """BatchNorm on running statistics and no dropout: the only things that legitimately differ
    between one process on a batch of 4 and two on 2 each (per-rank batch statistics; SyncBatchNorm
    has no CPU kernel)."""
    net.eval()


def _worker(rank, world, init_file, cfg_kw, resume, dump_dir, eval_mode):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import training.step
    import training.train as tt

    if eval_mode:
        training.step.set_train_mode = _eval_mode
    step_fn = tt.train_step

    def recording_step(cfg, net, pem, optimizer, batch, step, device, dctx, teacher=None):
        stats = step_fn(cfg, net, pem, optimizer, batch, step, device, dctx, teacher)
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if pem is not None:
            state.update({f"pem.{k}": v.detach().clone() for k, v in pem.state_dict().items()})
        torch.save({"state": state, "batch": batch["image"].sum((1, 2, 3))}, Path(dump_dir) / f"r{rank}-s{step + 1}.pt")
        return stats

    tt.train_step = recording_step
    try:
        tt.train(tiny_config(**cfg_kw), resume=resume, progress=False)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(world, out_dir, dump_dir, resume=False, eval_mode=False, **kw):
    dump_dir.mkdir(parents=True, exist_ok=True)
    init = Path(tempfile.mkdtemp()) / "init"
    torch.multiprocessing.spawn(_worker, args=(world, str(init), dict(out_dir=str(out_dir), **kw), resume,
                                               str(dump_dir), eval_mode), nprocs=world, join=True)


def dumped(dump_dir, rank, step):
    return torch.load(Path(dump_dir) / f"r{rank}-s{step}.pt")


def test_shard_sampler_splits_each_global_batch_by_rank():
    ranks = [list(distributed.ShardSampler(8, 16, 4, r, 2)) for r in range(2)]
    assert ranks == [[8, 10, 12, 14], [9, 11, 13, 15]]
    assert list(distributed.ShardSampler(8, 16, 4, 0, 1)) == list(range(8, 16))
    with pytest.raises(ValueError, match="multiple of 2"):
        distributed.check_batch(3, distributed.Dist(rank=0, world=2))


def test_sync_bn_on_cpu_is_refused_clearly():
    with pytest.raises(ValueError, match="CUDA"):
        distributed.convert_sync_batchnorm(torch.nn.BatchNorm2d(2), torch.device("cpu"))


@pytest.mark.e2e  # real training steps in two processes
def test_two_ranks_stay_in_sync_and_resume_exactly(tmp_path):
    """Full training step (simulated click rounds, focus view, PEM, BatchNorm in training mode):
    after every step both ranks hold bit-identical weights, buffers and PEM prototype; each rank saw
    its own half of the batch; a run stopped at step 2 and resumed equals the uninterrupted one."""
    kw = dict(batch_size=4, max_sim_rounds=2, focus_prob=1.0)
    run_ranks(2, tmp_path / "straight", tmp_path / "d-straight", steps=3, **kw)
    for step in (1, 2, 3):
        a, b = dumped(tmp_path / "d-straight", 0, step), dumped(tmp_path / "d-straight", 1, step)
        assert a["state"].keys() == b["state"].keys()
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), (step, k)
        assert not torch.equal(a["batch"], b["batch"])             # different samples per rank
    rows = list(csv.DictReader((tmp_path / "straight" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]              # rank 0 alone writes the log
    assert not list((tmp_path / "straight").glob("*.tmp"))

    killed = tmp_path / "killed"
    run_ranks(2, killed, tmp_path / "d-killed", steps=2, **kw)
    run_ranks(2, killed, tmp_path / "d-resumed", resume=True, steps=3, **kw)
    a, b = weights(tmp_path / "straight" / "state.safetensors"), weights(killed / "state.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [int(r["step"]) for r in csv.DictReader((killed / "log.csv").open())] == [1, 2, 3]

    # Resume with another world size: the global batch does not depend on it, so one process
    # continues the 2-process state (the per-rank click noise differs, so not bit-identical).
    one = tmp_path / "one"
    one.mkdir()
    (one / "state.safetensors").write_bytes((killed / "state.safetensors").read_bytes())
    (one / "log.csv").write_bytes((killed / "log.csv").read_bytes())
    summary = train(tiny_config(one, steps=4, **kw), resume=True, progress=False)
    assert summary["steps"] == 4 and "world_size" not in summary
    assert [int(r["step"]) for r in csv.DictReader((one / "log.csv").open())] == [1, 2, 3, 4]


@pytest.mark.e2e  # real training steps in two processes
def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, monkeypatch):
    """Rank r takes samples r::2 of the global batch of 4 and the gradients are averaged: the
    result equals one process on the batch of 4, to float tolerance. SGD, so a tiny gradient
    difference stays a tiny weight difference (Adam's first step is ~lr x sign(g) for any g)."""
    kw = dict(batch_size=4, steps=2, max_sim_rounds=0, focus_view=False, pem_weight=0.0, click_points=1,
              optimizer="sgd", lr=0.05, warmup_steps=0, checkpoint_every=2)
    run_ranks(2, tmp_path / "two", tmp_path / "d-two", eval_mode=True, **kw)
    import training.step

    monkeypatch.setattr(training.step, "set_train_mode", _eval_mode)
    train(tiny_config(tmp_path / "one", **kw), progress=False)
    init = torch.load(tmp_path / "d-two" / "r0-s1.pt")["state"]
    two, one = weights(tmp_path / "two" / "state.safetensors"), weights(tmp_path / "one" / "state.safetensors")
    moved = max(float((one[k] - init[k[6:]].to(one[k].dtype)).abs().max()) for k in one if one[k].is_floating_point())
    assert moved > 1e-3                                            # the weights did move...
    for k in one:
        if one[k].is_floating_point():
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)   # ...the same way
    l1 = [float(r["loss"]) for r in csv.DictReader((tmp_path / "one" / "log.csv").open())]
    l2 = [float(r["loss"]) for r in csv.DictReader((tmp_path / "two" / "log.csv").open())]
    assert l1 == pytest.approx(l2, rel=1e-4)


def test_plain_process_is_world_size_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = distributed.setup("cpu")
    assert (d.rank, d.world, d.enabled, d.main) == (0, 1, False, True)


@pytest.mark.e2e  # real training steps in two processes
def test_torchrun_launch(tmp_path):
    """The documented command, torchrun --standalone --nproc_per_node 2 -m training.train, through
    the helper the fine-tuning worker uses with FINETUNE_GPUS > 1."""
    cfg = tiny_config(tmp_path / "run", steps=2, batch_size=4, max_sim_rounds=1, checkpoint_every=2)
    calls = []
    summary = distributed.torchrun_train(cfg, 2, threads=1, timeout=300, on_step=lambda *a: calls.append(a))
    assert summary["steps"] == 2 and summary["world_size"] == 2
    # on_step from rank 0's log.csv (the ranks are other processes): at least the last step
    assert calls and calls[-1][:2] == (2, 2) and [c[0] for c in calls] == sorted({c[0] for c in calls})
    assert set(calls[-1][2]) == set(LOG_FIELDS) - {"step"}
    log = (tmp_path / "run" / "torchrun.log").read_text()
    assert log.count('"last_checkpoint"') == 1                          # printed once, by rank 0
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "run" / "log.csv").open())] == [1, 2]
    assert Path(summary["last_checkpoint"]).exists()
    with pytest.raises(RuntimeError, match="multiple of 2"):            # 3 crops over 2 processes
        distributed.torchrun_train(tiny_config(tmp_path / "bad", steps=1, batch_size=3), 2, threads=1, timeout=300)


def test_finetune_gpus_setting():
    from backend.finetune import FinetuneSettings

    assert FinetuneSettings.from_env({}).gpus == 1
    assert FinetuneSettings.from_env({"FINETUNE_GPUS": "2", "FINETUNE_BATCH_SIZE": "8"}).gpus == 2
    with pytest.raises(ValueError, match="FINETUNE_GPUS"):
        FinetuneSettings.from_env({"FINETUNE_GPUS": "3", "FINETUNE_BATCH_SIZE": "4"})


def test_log_follower_reports_each_new_step_once(tmp_path):
    log = tmp_path / "log.csv"
    calls = []
    follower = distributed.LogFollower(log, 3, lambda *a: calls.append(a))
    follower.poll()                                             # no log yet
    log.write_text("step,epoch,loss\n")
    follower.poll()                                             # header only
    log.write_text("step,epoch,loss\n1,0,0.5\n2,0,0.4")
    follower.poll()
    follower.poll()                                             # the same step: not again
    with log.open("a") as f:
        f.write("\n3,0")                                        # a row being written
    follower.poll()
    with log.open("a") as f:
        f.write(",0.3\n")
    follower.poll()
    assert calls == [(2, 3, {"epoch": 0.0, "loss": 0.4}), (3, 3, {"epoch": 0.0, "loss": 0.3})]
