"""What a fine-tuning job measures before it decides: the parent and the candidate with the robot
user on the project's holdout and on the benchmarks, and the box prompt alone on the holdout.

- The robot user stops each instance at the click that reaches IoU 0.90 (the protocol's stop
  rule, `Protocol(curve=False)`): NoC@85, NoC@90 and NoF@90 are exactly those of a full run, and
  an instance costs its NoC@90 in clicks instead of 20. No mIoU curve is drawn for a job.
- The parent's results are reused across jobs: every run is recorded in the evaluation history
  (tag `finetune:<job>`) under its checkpoint's sha256, and before evaluating a parent the job
  takes every instance the history already has for that checkpoint with the same protocol and
  evaluation settings (`known_ious`), matched by instance id (the holdout's ids name the task and
  hash its image and mask, `pull.holdout_instances`). A project's second job on the same parent
  (or any job on the shipped model after the first) runs only the candidate on the benchmarks.
- One pool of `eval_workers` processes per model evaluates all of its sets (each worker loads the
  model once, one torch thread each): on 2 CPU cores two single-threaded processes click faster
  than one process with two threads.
- Benchmark images that are also in the project (compared by content hash) are left out.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from model.images import load_image
from training.evaluation.datasets import load_dataset
from training.evaluation.metrics import noc
from training.evaluation.protocol import THRESHOLD, Protocol

from .decision import BoxPaired, Paired
from .eta import GUESS_CLICKS, Eta
from .settings import FinetuneSettings

log = logging.getLogger(__name__)

PROTOCOL = Protocol(curve=False)        # stop each instance at IoU 0.90: NoC@85/90 and NoF@90 exact


@dataclass(frozen=True)
class ModelSpec:
    """One model of a job as an evaluation worker builds it (picklable: each worker process calls
    it once), named by its registry version (the name the history records)."""
    checkpoint: str
    version: str
    sha256: str
    device: Optional[str] = None
    coarse_size: int = 0

    def __call__(self):
        from model.predictor import Predictor  # imports torch: not on the enqueue path

        opts = {"coarse_size": self.coarse_size} if self.coarse_size else {}
        p = Predictor.load(self.checkpoint, device=self.device or None, **opts)
        p.version = self.version
        return p


@dataclass
class EvalSet:
    """One set of instances both models run: the holdout or a benchmark."""
    label: str                    # the decision's name: "holdout" or the benchmark's
    dataset: str                  # the evaluation history's data set name
    samples: list
    complete: bool                # every instance of the data set is in `samples`
    excluded: List[str] = field(default_factory=list)     # left out: their image is in the project
    parent: Dict[str, List[float]] = field(default_factory=dict)     # instance id -> IoU per click
    candidate: Dict[str, List[float]] = field(default_factory=dict)

    def missing(self, side: str) -> list:
        have = getattr(self, side)
        return [s for s in self.samples if s.sample_id not in have]

    def paired(self) -> Paired:
        ids = [s.sample_id for s in self.samples]
        return Paired(self.label, {i: noc(self.parent[i], 0.90) for i in ids},
                      {i: noc(self.candidate[i], 0.90) for i in ids})

    def summary(self, side: str) -> Dict[str, float]:
        ious = [getattr(self, side)[s.sample_id] for s in self.samples]
        return {"noc85": float(np.mean([noc(x, 0.85) for x in ious])) if ious else float("nan"),
                "noc90": float(np.mean([noc(x, 0.90) for x in ious])) if ious else float("nan"),
                "nof90": int(sum(max(x, default=0.0) < 0.90 for x in ious))}


def history_key(settings: FinetuneSettings) -> Dict[str, Any]:
    """The protocol values an earlier run must share for its results to be reused."""
    return {"threshold": THRESHOLD, "box": False, "coarse_size": settings.eval_coarse_size or None}


def eval_workers(settings: FinetuneSettings) -> int:
    """FINETUNE_EVAL_WORKERS, or by default one per CPU core (one on a GPU)."""
    if settings.eval_workers:
        return settings.eval_workers
    import torch  # imports torch: not on the enqueue path

    on_gpu = settings.device.startswith("cuda") or (not settings.device and torch.cuda.is_available())
    return 1 if on_gpu else max(1, os.cpu_count() or 1)


# -- benchmarks without the project's own images --------------------------------------------------
def image_digest(image) -> str:
    """Content hash of a decoded image (shape + RGB bytes): the same picture under another file
    name, URL or container (a Label Studio upload of a benchmark JPEG) has the same digest."""
    arr = np.ascontiguousarray(load_image(image) if not hasattr(image, "shape") else image)
    return hashlib.sha1(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


def benchmark_samples(dataset: str, limit: Optional[int], exclude: set) -> tuple[list, List[str]]:
    """(the first `limit` samples of a benchmark whose image is not in `exclude` (digests),
    ids of the excluded ones). Evaluating a candidate on images it was fine-tuned on would
    flatter it."""
    kept: List[Any] = []
    excluded: List[Any] = []
    for sample in load_dataset(dataset):
        if limit is not None and len(kept) >= limit:
            break
        if exclude and image_digest(sample.image) in exclude:
            excluded.append(sample.sample_id)
        else:
            kept.append(sample)
    return kept, excluded


def plan_sets(settings: FinetuneSettings, data: Path, pid: str, parent_sha: str, job_id: str) -> List[EvalSet]:
    """The holdout and the benchmark sets (FINETUNE_BENCH_DATASETS, the first FINETUNE_BENCH_LIMIT
    of each whose image is not one of the project's), with the parent's results the history
    already has."""
    from training.evaluation.history import known_ious  # imports torch: not on the enqueue path
    from training.evaluation.samples import samples_from_arrays

    from ..labelstudio import pull

    held = pull.holdout_instances(data)
    sets = [EvalSet("holdout", f"ls-p{pid}-holdout", samples_from_arrays(
        [(image, mask) for _, image, mask in held], prefix=f"p{pid}-", ids=[i for i, _, _ in held]), True)]
    names = [n.strip() for n in settings.bench_datasets.split(",") if n.strip()]
    if names:
        limit = settings.bench_limit or None
        digests = {image_digest(p) for p in sorted((data / "images").iterdir())}
        for ds in names:
            samples, excluded = benchmark_samples(ds, limit, digests)
            if excluded:
                log.warning("job %s: %d %s instance(s) left out of the promotion check, their image is in "
                            "project %s: %s", job_id, len(excluded), ds, pid, ", ".join(excluded))
            sets.append(EvalSet(ds, ds, samples, not excluded and (limit is None or len(samples) < limit), excluded))
    for s in sets:
        try:
            known = known_ious(parent_sha, s.dataset, history_key(settings))
        except Exception as e:      # the history is a cache here: without it the parent is evaluated
            log.warning("job %s: the evaluation history cannot be read (%s): the parent is evaluated again",
                        job_id, e)
            known = {}
        s.parent = {smp.sample_id: known[smp.sample_id] for smp in s.samples if smp.sample_id in known}
    return sets


# -- running a model ---------------------------------------------------------------------------------
def run_model(spec: ModelSpec, side: str, sets: List[EvalSet], settings: FinetuneSettings, eta: Eta,
              report: Callable[[str, dict], None], job_id: str, pid: str, checkpoint_for_history: Path) -> dict:
    """Evaluate `spec` on the instances of `sets` it has no result for yet (`side`: "parent" or
    "candidate"), in one pool of workers; results into the sets and the history. `report(detail,
    eta)` after every instance. Returns {dataset: history run id}."""
    from training.evaluation.runner import evaluate_datasets  # imports torch: not on the enqueue path

    todo = {s.dataset: s.missing(side) for s in sets}
    todo = {k: v for k, v in todo.items() if v}
    total = sum(len(v) for v in todo.values())
    if not total:
        return {}
    by_name = {s.dataset: s for s in sets}
    done = [0]

    def on_result(dataset: str, r) -> None:
        getattr(by_name[dataset], side)[r.sample_id] = list(r.ious)
        done[0] += 1
        report(f"{side} {done[0]}/{total} ({by_name[dataset].label})", eta.clicks(len(r.ious)))

    report(f"{side} 0/{total}", eta.eval_start())
    results = evaluate_datasets(spec, todo, PROTOCOL, workers=eval_workers(settings), on_result=on_result)
    runs = {}
    for name, result in results.items():
        s = by_name[name]
        extra = {"job_id": job_id, "project": pid, "coarse_size": settings.eval_coarse_size or None,
                 "limit": None if s.label == "holdout" else (settings.bench_limit or None), "excluded": s.excluded}
        runs[name] = _record(result, checkpoint_for_history, spec.sha256,
                             s.complete and len(result.instances) == len(s.samples), job_id, extra)
    return runs


def _record(result, checkpoint: Path, sha: str, complete: bool, job_id: str, extra: dict) -> Optional[int]:
    from training.evaluation.history import record_run  # imports torch: not on the enqueue path

    try:
        return record_run(result, checkpoint=str(checkpoint), checkpoint_hash=sha, complete=complete,
                          tag=f"finetune:{job_id}", notes=json.dumps(extra, default=str),
                          extra_protocol=extra)
    except Exception:  # the history is a record, not a gate: a database outage must not lose the job
        log.exception("could not record the %s run in the evaluation history", result.dataset)
        return None


def estimate_clicks(sets: List[EvalSet], side: str) -> int:
    """Clicks a model's evaluation will run: the parent's NoC@90 where known (the candidate's
    cost is estimated by the parent's), else GUESS_CLICKS per instance."""
    total = 0
    for s in sets:
        for smp in s.samples:
            if smp.sample_id in getattr(s, side):
                continue
            known = s.parent.get(smp.sample_id)
            total += len(known) if known is not None else GUESS_CLICKS
    return total


def box_alone(parent: ModelSpec, candidate: ModelSpec, holdout: EvalSet) -> Optional[BoxPaired]:
    """The box prompt alone on the holdout (the ground truth's box), parent and candidate: only
    when the parent reads boxes (a click-only parent has no box skill to lose). Two to three
    passes per instance: cheap beside the NoC runs."""
    from training.evaluation.runner import box_only_ious  # imports torch: not on the enqueue path

    p = parent()
    if not p.accepts_box:
        return None
    c = candidate()
    if not c.accepts_box:
        return None
    return BoxPaired(box_only_ious(p, holdout.samples), box_only_ious(c, holdout.samples))


def metrics(sets: List[EvalSet], box: Optional[BoxPaired], runs: dict) -> Dict[str, Any]:
    """The job summary's and the registry version's "metrics": the holdout and every benchmark,
    parent and candidate, paired per instance."""
    hold, bench = sets[0], sets[1:]
    paired = hold.paired()
    out: Dict[str, Any] = {"holdout": {**paired.to_dict(), "parent": hold.summary("parent"),
                                       "candidate": hold.summary("candidate")}}
    if box is not None:
        out["holdout"]["box_alone"] = {k: v for k, v in box.to_dict().items() if k != "per_instance"}
    out["benchmarks"] = {}
    for s in bench:
        pb = s.paired()
        out["benchmarks"][s.label] = {**pb.to_dict(), "parent": pb.mean("parent"), "candidate": pb.mean("candidate"),
                                      "parent_summary": s.summary("parent"),
                                      "candidate_summary": s.summary("candidate"), "excluded": s.excluded}
    out["history_runs"] = runs
    return out
