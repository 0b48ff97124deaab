"""The fine-tuning job: pull -> train -> evaluate -> register -> promote (or keep with the reason).

    result = run_finetune(project=3, job_id="train-p3-7", settings=FinetuneSettings.from_env())

Stages, one function each, run in order by `run_finetune` (open_job, pull_annotations,
plan_evaluation, train_candidate, evaluate_candidate, decide_promotion, register), reported through
`progress(stage, percent, **extra)` (the RQ job puts them in job.meta):
  pull      the project's finished annotations from Label Studio (backend.labelstudio.pull),
            images downloaded as the backend does, bad regions skipped with their reason, a
            deterministic train/holdout split by task;
  train     training.train.train() from the project's promoted version (or the base checkpoint)
            with a LabelStudioSource on the pulled images; resumed from its last state when a
            retried job finds one in its work folder; each step reported through train()'s
            on_step (with FINETUNE_GPUS > 1, torchrun_train's, which follows rank 0's log.csv);
  evaluate  the robot user (NoC) on the holdout, parent and candidate, and on the benchmarks
            (GrabCut, Berkeley: the first `bench_limit` instances whose image is not in the
            project's data, compared by content hash); every run is recorded in the evaluation
            history (training.evaluation.history), tagged with the job id;
  register  the candidate becomes an immutable registry version with its parent, job id, train
            config, metrics and the decision;
  promote   only if its holdout NoC@90 beats the parent's by more than `min_holdout_gain` with more
            holdout instances better than worse, and no benchmark NoC@90 got worse by more than
            `bench_margin` (`decide`; the reason names every regression, and says when the holdout
            is too small for a confident decision).

A project with too few usable annotations gets a job with status "skipped" and the reason
(`too_few`), without training.

Settings come from FINETUNE_* environment variables (FinetuneSettings; declared in model/settings.py,
printed by `python -m backend.jobs --help-env`); a job's own overrides win.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import numpy as np

from model.images import load_image
from model.registry import ProjectRegistry, data_dir, default_root, project_key
from model.settings import (FINETUNE_BATCH_SIZE, FINETUNE_BENCH_DATASETS, FINETUNE_BENCH_LIMIT,
                            FINETUNE_BENCH_MARGIN, FINETUNE_BOX_MARGIN, FINETUNE_CHECKPOINT_EVERY, FINETUNE_CONFIDENT_HOLDOUT,
                            FINETUNE_CROP_SIZE, FINETUNE_DEVICE, FINETUNE_EVAL_COARSE_SIZE, FINETUNE_GPUS,
                            FINETUNE_HOLDOUT_FRACTION, FINETUNE_KEEP_WORKDIR, FINETUNE_LABELS, FINETUNE_LR,
                            FINETUNE_MIN_AREA, FINETUNE_MIN_GAIN, FINETUNE_MIN_HOLDOUT, FINETUNE_MIN_TRAIN,
                            FINETUNE_SEED, FINETUNE_SIM_ROUNDS, FINETUNE_STEPS, FINETUNE_THREADS,
                            FINETUNE_WARMUP_STEPS, MODEL_CHECKPOINT, env_field, read_fields)
from training.config import TrainConfig
from training.evaluation.datasets import load_dataset
from training.evaluation.metrics import noc
from training.evaluation.protocol import CURVE_CLICKS, THRESHOLD
from training.evaluation.samples import samples_from_arrays

from .config import Config
from .labelstudio.fetch import ImageFetcher

log = logging.getLogger(__name__)

Progress = Callable[..., None]


@dataclass
class FinetuneSettings:
    """A fine-tuning job's settings (FINETUNE_*, declared in model/settings.py)."""
    steps: int = env_field(FINETUNE_STEPS)
    batch_size: int = env_field(FINETUNE_BATCH_SIZE)
    crop_size: int = env_field(FINETUNE_CROP_SIZE)
    lr: float = env_field(FINETUNE_LR)
    warmup_steps: int = env_field(FINETUNE_WARMUP_STEPS)
    max_sim_rounds: int = env_field(FINETUNE_SIM_ROUNDS)
    checkpoint_every: int = env_field(FINETUNE_CHECKPOINT_EVERY)
    holdout_fraction: float = env_field(FINETUNE_HOLDOUT_FRACTION)
    min_holdout: int = env_field(FINETUNE_MIN_HOLDOUT)
    min_train: int = env_field(FINETUNE_MIN_TRAIN)
    min_area: int = env_field(FINETUNE_MIN_AREA)
    labels: str = env_field(FINETUNE_LABELS)
    bench_datasets: str = env_field(FINETUNE_BENCH_DATASETS)
    bench_limit: int = env_field(FINETUNE_BENCH_LIMIT)
    bench_margin: float = env_field(FINETUNE_BENCH_MARGIN)
    min_holdout_gain: float = env_field(FINETUNE_MIN_GAIN)
    box_margin: float = env_field(FINETUNE_BOX_MARGIN)
    confident_holdout: int = env_field(FINETUNE_CONFIDENT_HOLDOUT)
    eval_coarse_size: int = env_field(FINETUNE_EVAL_COARSE_SIZE)
    device: str = env_field(FINETUNE_DEVICE)
    threads: int = env_field(FINETUNE_THREADS)
    gpus: int = env_field(FINETUNE_GPUS)
    seed: int = env_field(FINETUNE_SEED)
    keep_workdir: bool = env_field(FINETUNE_KEEP_WORKDIR)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides) -> "FinetuneSettings":
        """From `env` (default os.environ); a job's overrides that are not None win."""
        values = read_fields(cls, env)
        unknown = set(overrides) - set(values)
        if unknown:
            raise ValueError(f"unknown fine-tuning settings {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        s = cls(**values)
        if s.steps < 1 or s.batch_size < 1 or s.crop_size < 32:
            raise ValueError("FINETUNE_STEPS, FINETUNE_BATCH_SIZE must be >= 1, FINETUNE_CROP_SIZE >= 32")
        if s.gpus < 1 or s.batch_size % s.gpus:
            raise ValueError(f"FINETUNE_GPUS={s.gpus}: must be >= 1 and divide FINETUNE_BATCH_SIZE={s.batch_size} "
                             "(the global batch is split evenly over the processes)")
        return s

    def to_dict(self) -> dict:
        return asdict(self)


# -- the decision ----------------------------------------------------------------------------------
class _PerInstance:
    """A per-instance number of the parent and the candidate (instance id -> value): the ids both
    have and the mean of either side over them."""
    parent: Mapping[str, float]
    candidate: Mapping[str, float]

    @property
    def ids(self) -> List[str]:
        return sorted(self.parent.keys() & self.candidate.keys())

    def mean(self, side: str) -> float:
        values = getattr(self, side)
        return sum(values[i] for i in self.ids) / max(1, len(self.ids))


def _shown(ids: List[str], k: int = 5) -> str:
    """The first k instance ids of a list, for a decision's reason."""
    return ", ".join(ids[:k]) + (" ..." if len(ids) > k else "")


@dataclass
class Paired(_PerInstance):
    """NoC@90 of the parent and the candidate on the same instances (instance id -> clicks)."""
    name: str
    parent: Dict[str, int]
    candidate: Dict[str, int]

    @classmethod
    def from_results(cls, name: str, parent, candidate) -> "Paired":
        """From two evaluation results (training.evaluation DatasetResult) of the same samples."""
        return cls(name, {r.sample_id: r.noc() for r in parent.instances},
                   {r.sample_id: r.noc() for r in candidate.instances})

    @property
    def better(self) -> List[str]:
        return [i for i in self.ids if self.candidate[i] < self.parent[i]]

    @property
    def worse(self) -> List[str]:
        return [i for i in self.ids if self.candidate[i] > self.parent[i]]

    def text(self) -> str:
        return (f"{self.name} NoC@90 {self.mean('parent'):.2f} -> {self.mean('candidate'):.2f} "
                f"({len(self.better)} of {len(self.ids)} instances better, {len(self.worse)} worse)")

    def to_dict(self) -> dict:
        return {"instances": len(self.ids), "parent": {"noc90": self.mean("parent")},
                "candidate": {"noc90": self.mean("candidate")}, "better": len(self.better),
                "worse": len(self.worse), "per_instance": {i: [self.parent[i], self.candidate[i]] for i in self.ids}}


@dataclass
class BoxPaired(_PerInstance):
    """IoU of the box prompt alone, parent and candidate, on the holdout (instance id -> IoU):
    measured when the parent reads boxes, so that a fine-tune cannot trade the box prompt away
    for clicks unseen (the NoC runs never use a box)."""
    parent: Dict[str, float]
    candidate: Dict[str, float]

    @property
    def worse(self) -> List[str]:
        return [i for i in self.ids if self.candidate[i] < self.parent[i]]

    def text(self) -> str:
        return f"holdout box alone mean IoU {self.mean('parent'):.3f} -> {self.mean('candidate'):.3f}"

    def to_dict(self) -> dict:
        return {"instances": len(self.ids), "parent": self.mean("parent"), "candidate": self.mean("candidate"),
                "worse": len(self.worse),
                "per_instance": {i: [round(self.parent[i], 4), round(self.candidate[i], 4)] for i in self.ids}}


def decide(holdout: Paired, bench: List[Paired], margin: float, min_gain: float = 0.0,
           confident_holdout: int = 0, box: Optional[BoxPaired] = None,
           box_margin: float = 0.02) -> tuple[bool, str, str]:
    """(promote, reason, confidence). Promote iff on the holdout the candidate's mean NoC@90 is
    lower than the parent's by more than min_gain and more instances got better than worse
    (paired, instance by instance), no benchmark's mean NoC@90 rose by more than margin, and (when
    `box` is given: the parent reads boxes) the holdout's box-alone mean IoU fell by at most
    box_margin. The reason names every failed condition and every benchmark that got worse, with
    its instances. confidence "low" when the holdout has fewer than `confident_holdout` instances
    (the reason says so)."""
    problems = []
    gain = holdout.mean("parent") - holdout.mean("candidate")
    if not gain > min_gain:
        problems.append(f"holdout NoC@90 {holdout.mean('candidate'):.2f} is not better than the parent's "
                        f"{holdout.mean('parent'):.2f}" + (f" by more than {min_gain:g}" if min_gain else ""))
    elif len(holdout.worse) >= len(holdout.better):
        problems.append(f"holdout: the mean improved but only {len(holdout.better)} of {len(holdout.ids)} "
                        f"instances got better and {len(holdout.worse)} worse")
    for b in bench:
        worse = b.mean("candidate") - b.mean("parent")
        if worse > margin + 1e-9:
            problems.append(f"{b.name} NoC@90 got worse by {worse:.2f} ({b.mean('parent'):.2f} -> "
                            f"{b.mean('candidate'):.2f}), more than the allowed {margin:g}; "
                            f"{len(b.worse)} of {len(b.ids)} instances worse ({_shown(b.worse)})")
    if box is not None and box.ids:
        drop = box.mean("parent") - box.mean("candidate")
        if drop > box_margin + 1e-9:
            problems.append(f"{box.text()}, a drop of {drop:.3f}, more than the allowed {box_margin:g}; "
                            f"{len(box.worse)} of {len(box.ids)} instances worse ({_shown(box.worse)})")
    if problems:
        reason = "; ".join(problems)
    else:
        reason = "; ".join([holdout.text()] + [b.text() for b in bench]) + (
            f" (benchmark margin {margin:g})" if bench else "; no benchmark configured") + (
            f"; {box.text()}" if box is not None and box.ids else "")
    confidence = "normal"
    if len(holdout.ids) < confident_holdout:
        confidence = "low"
        reason += (f"; low confidence: only {len(holdout.ids)} holdout instance(s), under "
                   f"FINETUNE_CONFIDENT_HOLDOUT={confident_holdout} (annotate more tasks)")
    return not problems, reason, confidence


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


# -- helpers ---------------------------------------------------------------------------------------
def _predictor(path: Path, settings: FinetuneSettings, version: str):
    """The evaluation predictor, named by its registry version (the name the history records)."""
    from model.predictor import Predictor  # imports torch: not on the enqueue path

    opts = {"coarse_size": settings.eval_coarse_size} if settings.eval_coarse_size else {}
    p = Predictor.load(str(path), device=settings.device or None, **opts)
    p.version = version
    return p


def _evaluate(predictor, samples, dataset: str):
    from training.evaluation.runner import evaluate_dataset  # imports torch: not on the enqueue path

    return evaluate_dataset(predictor, samples, dataset=dataset, progress=False)


def _record(result, checkpoint: Path, sha: str, complete: bool, job_id: str, extra: dict) -> Optional[int]:
    from training.evaluation.history import record_run  # imports torch: not on the enqueue path

    try:
        return record_run(result, checkpoint=str(checkpoint), checkpoint_hash=sha, complete=complete,
                          tag=f"finetune:{job_id}", notes=json.dumps(extra, default=str),
                          extra_protocol=extra)
    except Exception:  # the history is a record, not a gate: a database outage must not lose the job
        log.exception("could not record the %s run in the evaluation history", result.dataset)
        return None


def _cached_bench(sha: str, dataset: str, ids: List[str], coarse_size: int) -> Optional[Dict[str, int]]:
    """Per-instance NoC@90 (id -> clicks) of an earlier run of the same checkpoint file on exactly
    the same instances with the same protocol and predictor options, if the history has one (the
    parent is evaluated once)."""
    from training.evaluation.history import list_runs  # imports torch: not on the enqueue path

    try:
        rows = list_runs(dataset=dataset, full=True)
    except Exception:
        return None
    for r in reversed(rows):
        proto = r.get("protocol") or {}
        if (r["checkpoint_hash"] == sha and r["max_clicks"] == CURVE_CLICKS and proto.get("threshold") == THRESHOLD
                and not proto.get("box") and int(proto.get("coarse_size") or 0) == coarse_size
                and [p["id"] for p in r["per_instance"]] == ids):
            return {p["id"]: noc(p["ious"], 0.90) for p in r["per_instance"]}
    return None


@dataclass
class BenchPlan:
    dataset: str
    samples: list
    excluded: List[str]                      # ids left out: their image is in the project
    parent_nocs: Optional[Dict[str, int]]    # the parent's NoC@90 from the history, if it has them
    complete: bool                           # every instance of the data set is in `samples`


def plan_benchmarks(settings: FinetuneSettings, project_images: Path, parent_sha: str, job_id: str,
                    pid: str) -> List[BenchPlan]:
    """The benchmark instances the promotion check will run (FINETUNE_BENCH_DATASETS, the first
    FINETUNE_BENCH_LIMIT of each whose image is not one of the project's), and the parent's
    cached results on exactly those."""
    names = [n.strip() for n in settings.bench_datasets.split(",") if n.strip()]
    if not names:
        return []
    limit = settings.bench_limit or None
    digests = {image_digest(p) for p in sorted(project_images.iterdir())}
    plans = []
    for ds in names:
        samples, excluded = benchmark_samples(ds, limit, digests)
        if excluded:
            log.warning("job %s: %d %s instance(s) left out of the promotion check, their image is in "
                        "project %s: %s", job_id, len(excluded), ds, pid, ", ".join(excluded))
        ids = [smp.sample_id for smp in samples]
        plans.append(BenchPlan(ds, samples, excluded, _cached_bench(parent_sha, ds, ids, settings.eval_coarse_size),
                               not excluded and (limit is None or len(samples) < limit)))
    return plans


@dataclass(frozen=True)
class _Counted:
    """A sample that calls `started` when the evaluation loads it (evaluate_dataset has no
    per-instance callback)."""
    sample: Any
    started: Callable[[], None]

    @property
    def sample_id(self) -> str:
        return self.sample.sample_id

    def load(self):
        self.started()
        return self.sample.load()


class Eta:
    """Seconds a job has left: its training steps left at the measured seconds per step, plus its
    evaluation clicks left at the measured seconds per click. Until this job has measured a speed,
    the previous job's on this host (`rates`) stands in (a first job times a few clicks before
    training, `click_seconds`); with neither, no ETA (None)."""

    def __init__(self, steps: int, rates: dict, clock: Callable[[], float] = time.monotonic):
        self.steps, self.clock = steps, clock
        self.step_s: Optional[float] = rates.get("train_step_s")
        self.click_s: Optional[float] = rates.get("eval_click_s")
        self.eval_clicks = 0                 # clicks the evaluation will run (set once planned)
        self.measured: Dict[str, float] = {}
        self._train0: Optional[tuple] = None
        self._eval0: Optional[float] = None

    def step(self, step: int) -> dict:
        """At training step `step` (first call: the reference point, start-up excluded)."""
        now = self.clock()
        if self._train0 is None:
            self._train0 = (now, step)
        elif step > self._train0[1]:
            self.step_s = self.measured["train_step_s"] = (now - self._train0[0]) / (step - self._train0[1])
        return self.left(self.steps - step, self.eval_clicks)

    def clicks(self, done: int) -> dict:
        """After `done` evaluation clicks (first call: the evaluation starts)."""
        now = self.clock()
        if self._eval0 is None:
            self._eval0 = now
        elif done > 0:
            self.click_s = self.measured["eval_click_s"] = (now - self._eval0) / done
        return self.left(0, self.eval_clicks - done)

    def left(self, steps: int, clicks: int) -> dict:
        if (steps > 0 and self.step_s is None) or (clicks > 0 and self.click_s is None):
            return {"eta_s": None}
        return {"eta_s": round(max(0, steps) * (self.step_s or 0.0) + max(0, clicks) * (self.click_s or 0.0), 1)}


def click_seconds(predictor, sample, clicks: int = 3) -> float:
    """Seconds per click of `predictor` on one holdout instance (image encoding included, as in the
    evaluation): the ETA's measure of the evaluation speed before the evaluation has started."""
    loaded = sample.load()
    ys, xs = np.nonzero(loaded.gt)
    k = len(ys) // 2
    t0 = time.perf_counter()
    session = predictor.open(loaded.image)
    for _ in range(clicks):
        session.add_click(float(xs[k]), float(ys[k]), True)
    return (time.perf_counter() - t0) / clicks


def too_few(report: dict, settings: FinetuneSettings) -> str:
    """Why the pulled annotations cannot make a job ('' when they can): the message names the
    settings it checks."""
    train, hold = report["train_regions"], len(report["holdout_tasks"])
    if train >= settings.min_train and hold >= settings.min_holdout:
        return ""
    return (f"not enough usable annotations: {train} training region(s) in {len(report['train_tasks'])} "
            f"task(s) and {hold} holdout task(s); a job needs at least FINETUNE_MIN_TRAIN={settings.min_train} "
            f"training regions and FINETUNE_MIN_HOLDOUT={settings.min_holdout} holdout tasks (a share "
            f"FINETUNE_HOLDOUT_FRACTION={settings.holdout_fraction:g} of the tasks, at least "
            f"FINETUNE_MIN_HOLDOUT, is held out): annotate more tasks"
            + (f"; {len(report['skipped'])} region(s) were skipped, see 'skipped'" if report["skipped"] else ""))


# -- the job ---------------------------------------------------------------------------------------
def run_finetune(project: Any, job_id: str, settings: Optional[FinetuneSettings] = None,
                 progress: Optional[Progress] = None, export: Optional[str] = None,
                 registry_root: Optional[str] = None, base_checkpoint: Optional[str] = None,
                 work_root: Optional[str] = None, before_register: Optional[Callable[[], None]] = None,
                 rates: Optional[dict] = None) -> dict:
    """One fine-tuning job for one project. Returns a JSON-able summary (also the RQ job result).
    `progress(stage, percent, **extra)` is called in this thread (during training after each
    step, at most about once a second), so it must be quick and must not raise for a Redis outage.
    `before_register` is called right before the registry is changed (the job's lock check).
    `rates`: the speeds a previous job measured on this host (the summary's "rates"), the ETA's
    guess until this job has measured its own."""
    # torch: loaded by the job, not by backend.jobs (enqueue, status, --help-env)
    import torch

    settings = settings or FinetuneSettings.from_env()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    t_start = time.perf_counter()
    job = open_job(project, job_id, settings, progress or (lambda stage, percent, **kw: None),
                   registry_root, base_checkpoint, work_root)
    summary: Dict[str, Any] = {"job_id": job_id, "project": job.pid, "version": job.name,
                               "parent": job.parent.name, "settings": settings.to_dict()}
    if job.registry.exists(job.name):
        # An earlier attempt of this job registered the version and died before promoting.
        if before_register:
            before_register()
        return _finish_existing(job.registry, job.name, job.parent, summary)

    report = pull_annotations(job, export)
    summary["data"] = {k: report[k] for k in ("tasks", "annotations", "regions", "kept", "train_regions",
                                              "holdout_regions", "train_tasks", "holdout_tasks",
                                              "latest_annotation", "source")}
    summary["skipped"] = report["skipped"]
    shortfall = too_few(report, settings)
    if shortfall:
        return skip(job, summary, shortfall)

    plan = plan_evaluation(job, rates or {})
    tcfg, trained = train_candidate(job, plan.eta)
    summary["train"] = {"steps": trained["steps"], "resumed": trained["resumed"], "device": trained["device"]}
    candidate = Path(trained["last_checkpoint"])
    ev = evaluate_candidate(job, plan, candidate, report["holdout_tasks"])
    promote, reason, confidence = decide_promotion(ev, settings)
    register(job, candidate, tcfg, ev.metrics, summary["data"], report["skipped"], promote, reason, confidence,
             before_register)
    job.timings["total_s"] = round(time.perf_counter() - t_start, 2)
    summary.update(status="promoted" if promote else "kept", promoted=promote, reason=reason,
                   confidence=confidence, metrics=ev.metrics, timings=job.timings, rates=plan.eta.measured)
    log.info("job %s: %s %s (%s)", job_id, job.name, "promoted" if promote else "kept unpromoted", reason)
    job.progress("done", 100, detail=f"{job.name} {'promoted' if promote else 'kept'}: {reason}")
    _cleanup(job.work, settings)
    return summary


@dataclass
class FinetuneJob:
    """What every stage of one job works with."""
    pid: str
    job_id: str
    settings: FinetuneSettings
    progress: Progress
    registry: ProjectRegistry
    work: Path                    # DATA_DIR/jobs/<job>: the pulled data and the training run
    parent: Any                   # the registry Version the candidate is compared with
    name: str                     # the candidate's version name
    timings: Dict[str, float]     # seconds per stage: pull_s, train_s, evaluate_s, total_s

    @property
    def data(self) -> Path:
        return self.work / "data"


@contextlib.contextmanager
def _timed(job: FinetuneJob, key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    job.timings[key] = round(time.perf_counter() - t0, 2)


def open_job(project: Any, job_id: str, settings: FinetuneSettings, progress: Progress,
             registry_root: Optional[str] = None, base_checkpoint: Optional[str] = None,
             work_root: Optional[str] = None) -> FinetuneJob:
    """The job's registry, work folder, parent (the promoted version, else the base checkpoint,
    registered once) and the name reserved for its candidate (the same for every attempt)."""
    from model.checkpoint import resolve  # imports torch: not on the enqueue path

    pid = project_key(project)
    registry = ProjectRegistry(registry_root or default_root(), pid)
    work = Path(work_root or data_dir() / "jobs") / job_id
    work.mkdir(parents=True, exist_ok=True)
    parent = registry.promoted()
    if parent is None:
        parent = registry.ensure_base(resolve(base_checkpoint or MODEL_CHECKPOINT.read()))
    return FinetuneJob(pid, job_id, settings, progress, registry, work, parent, registry.reserve(job_id), {})


def pull_annotations(job: FinetuneJob, export: Optional[str] = None) -> dict:
    """Stage pull: the project's annotations (from Label Studio, or an export file) as a training
    set and a holdout in job.data; the report (counts, split, skipped regions). An earlier
    attempt's pull is reused."""
    from model.checkpoint import atomic_write_bytes  # imports torch: not on the enqueue path

    from .labelstudio import pull

    settings, data = job.settings, job.data
    with _timed(job, "pull_s"):
        job.progress("pull", 1)
        done_marker = data / "report.json"
        if done_marker.exists():
            log.info("job %s: reusing the annotations pulled by an earlier attempt", job.job_id)
            return json.loads(done_marker.read_text())
        cfg = Config.from_env()
        fetcher = ImageFetcher(cfg)
        if export:
            tasks = pull.load_export(export)
            source = f"export {export}"
        else:
            client = pull.ls_client(cfg.label_studio_url, cfg.label_studio_api_key)
            _, tasks = pull.fetch_tasks(client, int(job.pid))
            source = f"Label Studio {cfg.label_studio_url} project {job.pid}"
        labels = [s.strip() for s in settings.labels.split(",") if s.strip()] or None
        report = pull.build_dataset(
            tasks, fetcher, data, holdout_fraction=settings.holdout_fraction, min_holdout=settings.min_holdout,
            seed=settings.seed, labels=labels, min_area=settings.min_area,
            progress=lambda i, n: job.progress("pull", 1 + int(9 * i / max(1, n)), detail=f"task {i + 1}/{n}"),
        ).to_dict()
        report["source"] = source
        atomic_write_bytes(done_marker, json.dumps(report, indent=2, default=str).encode())
    return report


def skip(job: FinetuneJob, summary: dict, shortfall: str) -> dict:
    """Too few usable annotations: the job ends "skipped" with the reason, without training."""
    summary.update(status="skipped", promoted=False, reason=shortfall)
    log.warning("job %s skipped: %s", job.job_id, shortfall)
    job.progress("skipped", 100, detail=shortfall)
    _cleanup(job.work, job.settings)
    return summary


@dataclass
class EvalPlan:
    """What the evaluation will run, fixed before training: a missing data set fails early and the
    ETA knows the work."""
    holdout: list                 # the holdout instances
    checks: List[BenchPlan]       # the benchmark instances
    parent_pred: Any              # the parent's predictor
    parent_sha: str
    eta: Eta


def plan_evaluation(job: FinetuneJob, rates: dict) -> EvalPlan:
    """The holdout and benchmark instances, the parent's predictor, and the ETA (the evaluation's
    clicks; without a previous job's speed on this host, a few clicks timed now)."""
    from model.checkpoint import file_sha256  # imports torch: not on the enqueue path

    from .labelstudio import pull

    parent, settings = job.parent, job.settings
    parent_sha = parent.info.get("sha256") or file_sha256(parent.checkpoint)
    checks = plan_benchmarks(settings, job.data / "images", parent_sha, job.job_id, job.pid)
    holdout = samples_from_arrays(pull.holdout_pairs(job.data), prefix=f"p{job.pid}-holdout-")
    parent_pred = _predictor(parent.checkpoint, settings, parent.name)
    eta = Eta(settings.steps, rates)
    eta.eval_clicks = CURVE_CLICKS * (2 * len(holdout) + sum(
        len(c.samples) * (1 if c.parent_nocs is not None else 2) for c in checks))
    if eta.click_s is None and holdout:             # no earlier job on this host: measure a few clicks
        eta.click_s = click_seconds(parent_pred, holdout[0])
    return EvalPlan(holdout, checks, parent_pred, parent_sha, eta)


def train_config(job: FinetuneJob) -> TrainConfig:
    """The candidate's training: from the parent, on the pulled training set."""
    s, data = job.settings, job.data
    return TrainConfig(
        out_dir=str(job.work / "train"), init_checkpoint=str(job.parent.checkpoint), data_root=str(data),
        sources=[{"type": "labelstudio", "export": str(data / "train.json"), "image_dir": str(data / "images"),
                  "name": f"ls-project-{job.pid}", "min_area": s.min_area}],
        val_fraction=0.0, val_instances=0, crop_size=s.crop_size, steps=s.steps,
        batch_size=s.batch_size, num_workers=0, lr=s.lr,
        warmup_steps=min(s.warmup_steps, max(1, s.steps // 5)),
        max_sim_rounds=s.max_sim_rounds, checkpoint_every=max(1, s.checkpoint_every),
        # A few crops per step: the backbone's BatchNorm keeps its statistics (batch ones are noise).
        freeze_backbone_bn=True,
        device=s.device or "auto", seed=s.seed, version=job.name,
        notes=f"fine-tuned from {job.parent.name} by job {job.job_id} on project {job.pid}")


def step_reporter(job: FinetuneJob, eta: Eta, every: float = 1.0,
                  clock: Callable[[], float] = time.monotonic) -> Callable[[int, int, dict], None]:
    """train()'s on_step as the job's "train" progress (10..70 %, the step, the ETA): at most one
    report per `every` seconds (each is a Redis write), and the last step."""
    last = [float("-inf")]

    def on_step(step: int, total: int, stats: dict) -> None:
        now = clock()
        if step < total and now - last[0] < every:
            return
        last[0] = now
        job.progress("train", 10 + int(60 * step / total), detail=f"step {step}/{total}", step=step,
                     **eta.step(step))
    return on_step


def train_candidate(job: FinetuneJob, eta: Eta) -> tuple[TrainConfig, dict]:
    """Stage train: (the training config, train()'s summary with "resumed"). A retried job resumes
    from the last state its earlier attempt saved in the work folder. FINETUNE_GPUS > 1 trains
    in torchrun processes (training/distributed.py)."""
    from training.train import train  # imports torch: not on the enqueue path

    settings = job.settings
    tcfg = train_config(job)
    resume = (Path(tcfg.out_dir) / "state.safetensors").exists()
    on_step = step_reporter(job, eta)
    with _timed(job, "train_s"):
        job.progress("train", 10, detail=("resuming" if resume else "starting") + f" from {job.parent.name}",
                     **eta.left(settings.steps, eta.eval_clicks))
        if settings.gpus > 1:       # one process per GPU; rank 0 writes log.csv, which on_step follows
            from training.distributed import torchrun_train  # imports torch: not on the enqueue path
            trained = torchrun_train(tcfg, settings.gpus, resume=resume, threads=settings.threads or None,
                                     on_step=on_step)
        else:
            trained = train(tcfg, resume=resume, progress=False, on_step=on_step)
    return tcfg, {**trained, "resumed": resume}


@dataclass
class Evaluation:
    metrics: Dict[str, Any]       # the summary's and the registry version's "metrics"
    holdout: Paired
    bench: List[Paired]
    excluded: Dict[str, List[str]]   # per benchmark: the instances left out (image in the project)
    box: Optional[BoxPaired] = None  # the holdout's box-alone IoUs, when the parent reads boxes


class _EvalProgress:
    """The "evaluate" progress: which instance of which run, and the ETA from the clicks run so far."""

    def __init__(self, job: FinetuneJob, eta: Eta):
        self.job, self.eta, self.done = job, eta, 0

    def counted(self, samples, what: str, low: int, high: int) -> list:
        """The samples, reporting progress as each one starts (every instance runs CURVE_CLICKS)."""
        def started(i: int) -> None:
            self.job.progress("evaluate", low + int((high - low) * i / max(1, len(samples))),
                              detail=f"{what} {i + 1}/{len(samples)}", **self.eta.clicks(self.done))
            self.done += CURVE_CLICKS
        return [_Counted(smp, functools.partial(started, i)) for i, smp in enumerate(samples)]


def evaluate_candidate(job: FinetuneJob, plan: EvalPlan, candidate: Path, holdout_tasks: list) -> Evaluation:
    """Stage evaluate: parent and candidate on the holdout, then on each benchmark (the parent's
    results from the history when it has them); every run recorded in the evaluation history."""
    from model.checkpoint import file_sha256  # imports torch: not on the enqueue path

    with _timed(job, "evaluate_s"):
        cand_sha = file_sha256(candidate)
        cand_pred = _predictor(candidate, job.settings, job.name)
        counter = _EvalProgress(job, plan.eta)
        runs: Dict[str, Optional[int]] = {}
        metrics, paired_holdout = _evaluate_holdout(job, plan, cand_pred, candidate, cand_sha, holdout_tasks,
                                                    counter, runs)
        box = _evaluate_box(job, plan, cand_pred)
        if box is not None:
            metrics["holdout"]["box_alone"] = {k: v for k, v in box.to_dict().items() if k != "per_instance"}
        bench, paired_bench = _evaluate_benchmarks(job, plan, cand_pred, candidate, cand_sha, counter, runs)
        metrics["benchmarks"] = bench
        metrics["history_runs"] = runs
    return Evaluation(metrics, paired_holdout, paired_bench, {ds: b["excluded"] for ds, b in bench.items()}, box)


def _evaluate_box(job: FinetuneJob, plan: EvalPlan, cand_pred) -> Optional[BoxPaired]:
    """The box prompt alone on the holdout (the ground truth's box), parent and candidate: only
    when the parent reads boxes (a click-only parent has no box skill to lose). Two to three
    passes per instance: cheap beside the NoC runs, so the ETA leaves it out."""
    if not (plan.parent_pred.accepts_box and cand_pred.accepts_box):
        return None
    from training.evaluation.runner import box_only_ious  # imports torch: not on the enqueue path

    job.progress("evaluate", 76, detail=f"holdout box alone ({len(plan.holdout)} instances)")
    return BoxPaired(box_only_ious(plan.parent_pred, plan.holdout), box_only_ious(cand_pred, plan.holdout))


def _evaluate_holdout(job: FinetuneJob, plan: EvalPlan, cand_pred, candidate: Path, cand_sha: str, holdout_tasks: list,
                      counter: _EvalProgress, runs: dict) -> tuple[Dict[str, Any], Paired]:
    parent = job.parent
    extra = {"job_id": job.job_id, "project": job.pid, "holdout_tasks": holdout_tasks,
             "coarse_size": job.settings.eval_coarse_size}
    ds_name = f"ls-p{job.pid}-holdout"
    res_parent = _evaluate(plan.parent_pred, counter.counted(plan.holdout, "holdout (parent)", 70, 73), ds_name)
    res_cand = _evaluate(cand_pred, counter.counted(plan.holdout, "holdout (candidate)", 73, 76), ds_name)
    runs["holdout_parent"] = _record(res_parent, parent.checkpoint, plan.parent_sha, True, job.job_id, extra)
    runs["holdout_candidate"] = _record(res_cand, candidate, cand_sha, True, job.job_id, extra)
    mp, mc = res_parent.metrics(), res_cand.metrics()
    paired = Paired.from_results("holdout", res_parent, res_cand)
    return {"holdout": {**paired.to_dict(), "parent": {k: mp[k] for k in ("noc85", "noc90", "nof90")},
                        "candidate": {k: mc[k] for k in ("noc85", "noc90", "nof90")}}}, paired


def _evaluate_benchmarks(job: FinetuneJob, plan: EvalPlan, cand_pred, candidate: Path, cand_sha: str,
                         counter: _EvalProgress, runs: dict) -> tuple[Dict[str, Dict[str, Any]], List[Paired]]:
    parent, checks, settings = job.parent, plan.checks, job.settings
    bench: Dict[str, Dict[str, Any]] = {}
    paired_bench: List[Paired] = []
    for i, c in enumerate(checks):
        low = 76 + int(18 * i / len(checks))
        mid, high = low + int(9 / len(checks)), 76 + int(18 * (i + 1) / len(checks))
        ds, bextra = c.dataset, {"job_id": job.job_id, "project": job.pid, "limit": settings.bench_limit or None,
                                 "coarse_size": settings.eval_coarse_size, "excluded": c.excluded}
        parent_nocs = c.parent_nocs
        if parent_nocs is None:
            rp = _evaluate(plan.parent_pred, counter.counted(c.samples, f"{ds} (parent)", low, mid), ds)
            runs[f"{ds}_parent"] = _record(rp, parent.checkpoint, plan.parent_sha, c.complete, job.job_id, bextra)
            parent_nocs = {r.sample_id: r.noc() for r in rp.instances}
        rc = _evaluate(cand_pred, counter.counted(c.samples, f"{ds} (candidate)", mid, high), ds)
        runs[f"{ds}_candidate"] = _record(rc, candidate, cand_sha, c.complete, job.job_id, bextra)
        pb = Paired(ds, parent_nocs, {r.sample_id: r.noc() for r in rc.instances})
        paired_bench.append(pb)
        bench[ds] = {**pb.to_dict(), "parent": pb.mean("parent"), "candidate": pb.mean("candidate"),
                     "excluded": c.excluded}
    return bench, paired_bench


def decide_promotion(ev: Evaluation, settings: FinetuneSettings) -> tuple[bool, str, str]:
    """Stage decide: `decide` on the evaluation, the reason also naming the benchmark instances left
    out because their image is in the project."""
    promote, reason, confidence = decide(ev.holdout, ev.bench, settings.bench_margin,
                                         settings.min_holdout_gain, settings.confident_holdout,
                                         ev.box, settings.box_margin)
    left_out = {ds: len(ids) for ds, ids in ev.excluded.items() if ids}
    if left_out:
        reason += "; left out of the benchmarks (image in the project): " + ", ".join(
            f"{n} {ds} instance(s)" for ds, n in left_out.items())
    return promote, reason, confidence


def register(job: FinetuneJob, candidate: Path, tcfg: TrainConfig, metrics: dict, data: dict, skipped: list,
             promote: bool, reason: str, confidence: str, before_register: Optional[Callable[[], None]]) -> None:
    """Stages register and promote: the candidate becomes an immutable registry version with the
    decision; promoted if the decision says so."""
    job.progress("register", 95, detail=job.name)
    if before_register:
        before_register()
    version = job.registry.add(
        job.name, candidate, kind="finetuned", parent=job.parent.name, job_id=job.job_id,
        train_config=tcfg.to_dict(), settings=job.settings.to_dict(), metrics=metrics,
        data=data, skipped=skipped[:200],
        decision={"promote": promote, "reason": reason, "confidence": confidence, "decided_at": time.time()})
    if promote:
        job.progress("promote", 98, detail=job.name)
        job.registry.promote(version.name, reason=reason, actor=f"job {job.job_id}", served_before=job.parent.name)


def _finish_existing(registry, name: str, parent, summary: dict) -> dict:
    """A retried job whose version exists: apply its stored decision (promote if it said so)."""
    v = registry.get(name)
    d = v.decision
    current = registry.promoted()
    if d.get("promote") and (current is None or current.name != name):
        # Promote only over the parent it was compared with: otherwise the comparison is stale.
        if current is None or current.name == v.parent:
            registry.promote(name, reason=d.get("reason", ""), actor=f"job {v.job_id} (retry)",
                             served_before=v.parent)
    current = registry.promoted()
    summary.update(status="promoted" if current and current.name == name else "kept",
                   promoted=bool(current and current.name == name), reason=d.get("reason"),
                   metrics=v.info.get("metrics"), data=v.info.get("data"))
    return summary


def _cleanup(work: Path, settings: FinetuneSettings) -> None:
    if not settings.keep_workdir:
        shutil.rmtree(work, ignore_errors=True)
