"""One fine-tuning job, stage by stage (run in order by `run_finetune`):

  pull                the project's finished annotations (Label Studio, or an export file) as a
                      training set and a holdout (backend.labelstudio.pull);
  evaluate_parent     the parent on the holdout and the benchmarks, only the instances the
                      evaluation history does not already have for its checkpoint (evaluation.py);
  route               a router on the parent's backbone features: can it tell the project's
                      images from the base data? (candidate.py);
  train               training.train from the parent on the project's annotations, every BatchNorm
                      on the parent's statistics: alone when the router can send only the
                      project's images to the result, else mixed with the base training data
                      (rehearsal); resumed from its last state when a retried job finds one; the
                      candidate: the trained network for images like the project's and the
                      parent's for the rest when routed, else parent and trained weights averaged;
  evaluate_candidate  the candidate on the same instances, and the box prompt alone on the holdout;
  register, promote   an immutable registry version with the decision (decision.py), promoted if
                      it says so.

Each stage's seconds are in the summary's (and job.meta's) "timings"; `progress(stage, percent,
**extra)` reports the stage, the percent, a detail and the ETA (the RQ job puts them in job.meta).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional

from model.files import atomic_write_bytes, file_sha256, resolve
from ..registry import ProjectRegistry, data_dir, default_root, project_key
from model.settings import MODEL_CHECKPOINT
from training.config import TrainConfig

from ..config import Config
from ..labelstudio.fetch import ImageFetcher
from . import evaluation
from .decision import BoxPaired, decide
from .eta import Eta, click_seconds
from .evaluation import EvalSet, ModelSpec
from .settings import FinetuneSettings

if TYPE_CHECKING:
    from .candidate import Routing

log = logging.getLogger(__name__)

Progress = Callable[..., None]

# The percent each stage starts at (the training's share is the largest and moves step by step).
PERCENT = {"pull": 1, "evaluate_parent": 10, "route": 20, "train": 23, "evaluate_candidate": 80, "register": 95,
           "promote": 98}


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
    timings: Dict[str, float]     # seconds per stage: pull_s, evaluate_parent_s, train_s, ...

    @property
    def data(self) -> Path:
        return self.work / "data"

    def spec(self, checkpoint: Path, version: str, sha256: str) -> ModelSpec:
        s = self.settings
        return ModelSpec(str(checkpoint), version, sha256, s.device or None, s.eval_coarse_size)


@contextlib.contextmanager
def _timed(job: FinetuneJob, key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        job.timings[key] = round(time.perf_counter() - t0, 2)


def open_job(project: Any, job_id: str, settings: FinetuneSettings, progress: Progress,
             registry_root: Optional[str] = None, base_checkpoint: Optional[str] = None,
             work_root: Optional[str] = None) -> FinetuneJob:
    """The job's registry, work folder, parent (the promoted version, else the base checkpoint,
    registered once) and the name reserved for its candidate (the same for every attempt)."""
    pid = project_key(project)
    registry = ProjectRegistry(registry_root or default_root(), pid)
    work = Path(work_root or data_dir() / "jobs") / job_id
    work.mkdir(parents=True, exist_ok=True)
    parent = registry.promoted()
    if parent is None:
        parent = registry.ensure_base(resolve(base_checkpoint or MODEL_CHECKPOINT.read()))
    return FinetuneJob(pid, job_id, settings, progress, registry, work, parent, registry.reserve(job_id), {})


# -- pull ----------------------------------------------------------------------------------------------
def pull_annotations(job: FinetuneJob, export: Optional[str] = None, local_files_root: Optional[str] = None) -> dict:
    """Stage pull: the project's annotations (from Label Studio, or an export file) as a training
    set and a holdout in job.data; the report (counts, split, skipped regions). An earlier
    attempt's pull is reused. `local_files_root`: where an export's /data/local-files images are
    (default LOCAL_FILES_ROOT)."""
    from ..labelstudio import pull  # imports torch: not on the enqueue path

    settings, data = job.settings, job.data
    with _timed(job, "pull_s"):
        job.progress("pull", PERCENT["pull"])
        done_marker = data / "report.json"
        if done_marker.exists():
            log.info("job %s: reusing the annotations pulled by an earlier attempt", job.job_id)
            return json.loads(done_marker.read_text())
        cfg = Config.from_env(local_files_root=local_files_root) if local_files_root else Config.from_env()
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
            progress=lambda i, n: job.progress("pull", 1 + int(8 * i / max(1, n)), detail=f"task {i + 1}/{n}"),
        ).to_dict()
        report["source"] = source
        atomic_write_bytes(done_marker, json.dumps(report, indent=2, default=str).encode())
    return report


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


def skip(job: FinetuneJob, summary: dict, shortfall: str) -> dict:
    """Too few usable annotations: the job ends "skipped" with the reason, without training."""
    summary.update(status="skipped", promoted=False, reason=shortfall)
    log.warning("job %s skipped: %s", job.job_id, shortfall)
    job.progress("skipped", 100, detail=shortfall)
    _cleanup(job.work, job.settings)
    return summary


def check_base_data(settings: FinetuneSettings) -> None:
    """Fail before any work when the base training data is needed and not there: rehearsal mixes
    it into every batch, routing learns "not the project's" from it."""
    uses = [name for name, on in (("FINETUNE_REHEARSAL", settings.rehearsal > 0), ("FINETUNE_ROUTING", settings.routing))
            if on]
    if not uses:
        return
    from training.data.sources import default_data_root

    root = default_data_root()
    if not (root / "BSDS500" / "images").is_dir():
        raise FileNotFoundError(
            f"{' and '.join(uses)} use the base model's training data, but it is not under {root} "
            "(SIMCLICK_TRAIN_ROOT): mount it there, or set FINETUNE_REHEARSAL=0 FINETUNE_ROUTING=false "
            "(the fine-tuned model then forgets more of what it knew, and the promotion check will refuse more "
            "versions)")


# -- evaluate the parent -------------------------------------------------------------------------------
@dataclass
class EvalPlan:
    """What the evaluation runs, fixed before training: a missing data set fails early and the ETA
    knows the work."""
    sets: List[EvalSet]           # the holdout first, then the benchmarks
    parent: ModelSpec
    eta: Eta
    runs: Dict[str, Optional[int]]    # history run ids: "<dataset>_parent", "<dataset>_candidate"


def plan_evaluation(job: FinetuneJob, rates: dict) -> EvalPlan:
    """The holdout and benchmark instances with the parent's results the history has, and the
    ETA (without a speed from this host's previous job and nothing to evaluate for the parent, a
    few clicks timed now)."""
    parent_sha = job.parent.info.get("sha256") or file_sha256(job.parent.checkpoint)
    spec = job.spec(job.parent.checkpoint, job.parent.name, parent_sha)
    sets = evaluation.plan_sets(job.settings, job.data, job.pid, parent_sha, job.job_id)
    eta = Eta(job.settings.steps, rates)
    eta.eval_clicks = evaluation.estimate_clicks(sets, "parent") + evaluation.estimate_clicks(sets, "candidate")
    if eta.click_s is None and not any(s.missing("parent") for s in sets) and sets[0].samples:
        eta.click_s = click_seconds(spec(), sets[0].samples[0])
    return EvalPlan(sets, spec, eta, {})


def evaluate_parent(job: FinetuneJob, plan: EvalPlan) -> None:
    """Stage evaluate_parent: the parent on every instance the history has no result for."""
    cached = sum(len(s.parent) for s in plan.sets)
    with _timed(job, "evaluate_parent_s"):
        job.progress("evaluate_parent", PERCENT["evaluate_parent"], detail=f"{cached} instance(s) from the history",
                     **plan.eta.left())
        runs = evaluation.run_model(plan.parent, "parent", plan.sets, job.settings, plan.eta,
                                    lambda detail, eta: job.progress("evaluate_parent", PERCENT["evaluate_parent"],
                                                                     detail=detail, **eta),
                                    job.job_id, job.pid, Path(job.parent.checkpoint))
        plan.runs.update({f"{k}_parent": v for k, v in runs.items()})
    # the candidate's clicks, now that the parent's NoC is known on every instance
    plan.eta.eval_clicks = evaluation.estimate_clicks(plan.sets, "candidate")


# -- train ---------------------------------------------------------------------------------------------
def train_config(job: FinetuneJob, routed: bool) -> TrainConfig:
    """The candidate's training: from the parent (a routed parent's fine-tuned network), on the
    pulled training set, every BatchNorm on the parent's statistics. Mixed with the base training
    data, on which it also learns the parent's answers (FINETUNE_DISTILL), in the share
    FINETUNE_REHEARSAL when the result will answer every image, FINETUNE_ROUTED_REHEARSAL (0) when
    it will answer only images like the project's (`routed`): there rehearsal only takes steps
    from the project (PH2, 50 labels: unseen NoC@90 4.49 with rehearsal 0.5, 3.57 without)."""
    s, data = job.settings, job.data
    rehearsal = s.routed_rehearsal if routed else s.rehearsal
    return TrainConfig(
        out_dir=str(job.work / "train"), init_checkpoint=str(job.parent.checkpoint), data_root=str(data),
        sources=[{"type": "labelstudio", "export": str(data / "train.json"), "image_dir": str(data / "images"),
                  "name": f"ls-project-{job.pid}", "min_area": s.min_area}],
        # The base data keeps its own split (TrainVal stays held out); the project's never is.
        rehearsal=rehearsal, val_fraction=0.05 if rehearsal else 0.0, split_seed=0,
        val_instances=0, crop_size=s.crop_size, steps=s.steps,
        batch_size=s.batch_size, num_workers=0, lr=s.lr,
        # The parent reads clicks already: its click inputs move no faster than the rest (a new
        # model's zero-initialised ones get 10x).
        # The trained weights as they are: the route stage makes the candidate from them (candidate.py).
        input_lr_mult=1.0, distill=s.distill if rehearsal else 0.0, interpolate=1.0,
        warmup_steps=min(s.warmup_steps, max(1, s.steps // 5)),
        max_sim_rounds=s.max_sim_rounds, focus_prob=s.focus_prob, checkpoint_every=max(1, s.checkpoint_every),
        # A few crops per step: the backbone's BatchNorm keeps its statistics (batch ones are noise).
        freeze_backbone_bn=True, freeze_bn=s.freeze_bn, l2sp=s.l2sp,
        device=s.device or "auto", seed=s.seed, version=job.name,
        notes=f"fine-tuned from {job.parent.name} by job {job.job_id} on project {job.pid}")


def step_reporter(job: FinetuneJob, eta: Eta, every: float = 1.0,
                  clock: Callable[[], float] = time.monotonic) -> Callable[[int, int, dict], None]:
    """train()'s on_step as the job's "train" progress (the step, the ETA): at most one report per
    `every` seconds (each is a Redis write), and the last step."""
    last = [float("-inf")]
    low, high = PERCENT["train"], PERCENT["evaluate_candidate"]

    def on_step(step: int, total: int, stats: dict) -> None:
        now = clock()
        if step < total and now - last[0] < every:
            return
        last[0] = now
        job.progress("train", low + int((high - low) * step / total), detail=f"step {step}/{total}", step=step,
                     **eta.step(step))
    return on_step


def route(job: FinetuneJob) -> Optional["Routing"]:
    """Stage route: the router of the candidate, fitted before training (candidate.py); None with
    FINETUNE_ROUTING off."""
    from .candidate import plan_routing  # imports torch: not on the enqueue path

    with _timed(job, "route_s"):
        job.progress("route", PERCENT["route"], detail="fitting the router on the project's images"
                     if job.settings.routing else "routing off (FINETUNE_ROUTING)")
        return plan_routing(Path(job.parent.checkpoint), job.data, job.settings)


def train_candidate(job: FinetuneJob, eta: Eta, routing: Optional["Routing"]) -> tuple[TrainConfig, dict, Path, dict]:
    """Stage train: (the training config, train()'s summary with "resumed", the candidate, what
    the candidate is: routed, interpolated or trained). A retried job resumes from the last state
    its earlier attempt saved in the work folder. FINETUNE_GPUS > 1 trains in torchrun processes
    (training/distributed.py)."""
    from training.train import train  # imports torch: not on the enqueue path

    from .candidate import make_candidate

    settings = job.settings
    tcfg = train_config(job, routed=routing is not None and routing.usable)
    resume = (Path(tcfg.out_dir) / "state.safetensors").exists()
    on_step = step_reporter(job, eta)
    with _timed(job, "train_s"):
        job.progress("train", PERCENT["train"], detail=("resuming" if resume else "starting") + f" from {job.parent.name}",
                     **eta.left())
        if settings.gpus > 1:       # one process per GPU; rank 0 writes log.csv, which on_step follows
            from training.distributed import torchrun_train  # imports torch: not on the enqueue path
            trained = torchrun_train(tcfg, settings.gpus, resume=resume, threads=settings.threads or None,
                                     on_step=on_step)
        else:
            trained = train(tcfg, resume=resume, progress=False, on_step=on_step)
        candidate, made = make_candidate(Path(trained["last_checkpoint"]), Path(job.parent.checkpoint),
                                         job.parent.name, routing, settings)
    return tcfg, {**trained, "resumed": resume}, candidate, made


# -- evaluate the candidate, decide ----------------------------------------------------------------------
@dataclass
class Evaluation:
    metrics: Dict[str, Any]       # the summary's and the registry version's "metrics"
    sets: List[EvalSet]           # the holdout first, then the benchmarks, both sides filled
    box: Optional[BoxPaired] = None  # the holdout's box-alone IoUs, when the parent reads boxes


def evaluate_candidate(job: FinetuneJob, plan: EvalPlan, candidate: Path) -> Evaluation:
    """Stage evaluate_candidate: the candidate on every instance the parent ran, then the box
    prompt alone on the holdout (both models, when the parent reads boxes)."""
    with _timed(job, "evaluate_candidate_s"):
        spec = job.spec(candidate, job.name, file_sha256(candidate))
        stage, pct = "evaluate_candidate", PERCENT["evaluate_candidate"]
        runs = evaluation.run_model(spec, "candidate", plan.sets, job.settings, plan.eta,
                                    lambda detail, eta: job.progress(stage, pct, detail=detail, **eta),
                                    job.job_id, job.pid, candidate)
        plan.runs.update({f"{k}_candidate": v for k, v in runs.items()})
        job.progress(stage, pct + 10, detail=f"holdout box alone ({len(plan.sets[0].samples)} instances)")
        box = evaluation.box_alone(plan.parent, spec, plan.sets[0])
    return Evaluation(evaluation.metrics(plan.sets, box, plan.runs), plan.sets, box)


def decide_promotion(ev: Evaluation, settings: FinetuneSettings) -> tuple[bool, str, str]:
    """`decide` on the evaluation, the reason also naming the benchmark instances left out because
    their image is in the project."""
    promote, reason, confidence = decide(ev.sets[0].paired(), [s.paired() for s in ev.sets[1:]], settings.bench_margin,
                                         settings.min_holdout_gain, settings.confident_holdout,
                                         ev.box, settings.box_margin)
    left_out = {s.label: len(s.excluded) for s in ev.sets[1:] if s.excluded}
    if left_out:
        reason += "; left out of the benchmarks (image in the project): " + ", ".join(
            f"{n} {ds} instance(s)" for ds, n in left_out.items())
    return promote, reason, confidence


def register(job: FinetuneJob, candidate: Path, tcfg: TrainConfig, metrics: dict, data: dict, skipped: list,
             promote: bool, reason: str, confidence: str, before_register: Optional[Callable[[], None]]) -> None:
    """Stages register and promote: the candidate becomes an immutable registry version with the
    decision; promoted if the decision says so."""
    with _timed(job, "register_s"):
        job.progress("register", PERCENT["register"], detail=job.name)
        if before_register:
            before_register()
        version = job.registry.add(
            job.name, candidate, kind="finetuned", parent=job.parent.name, job_id=job.job_id,
            train_config=tcfg.to_dict(), settings=job.settings.to_dict(), metrics=metrics,
            data=data, skipped=skipped[:200],
            decision={"promote": promote, "reason": reason, "confidence": confidence, "decided_at": time.time()})
        if promote:
            job.progress("promote", PERCENT["promote"], detail=job.name)
            job.registry.promote(version.name, reason=reason, actor=f"job {job.job_id}",
                                 served_before=job.parent.name)


def _finish_existing(registry, name: str, summary: dict) -> dict:
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


# -- the job ---------------------------------------------------------------------------------------------
def run_finetune(project: Any, job_id: str, settings: Optional[FinetuneSettings] = None,
                 progress: Optional[Progress] = None, export: Optional[str] = None,
                 registry_root: Optional[str] = None, base_checkpoint: Optional[str] = None,
                 work_root: Optional[str] = None, before_register: Optional[Callable[[], None]] = None,
                 rates: Optional[dict] = None, local_files_root: Optional[str] = None) -> dict:
    """One fine-tuning job for one project. Returns a JSON-able summary (also the RQ job result).
    `progress(stage, percent, **extra)` is called in this thread (during training after each
    step, at most about once a second), so it must be quick and must not raise for a Redis outage.
    `before_register` is called right before the registry is changed (the job's lock check).
    `rates`: the speeds a previous job measured on this host (the summary's "rates"), the ETA's
    guess until this job has measured its own. `local_files_root`: see pull_annotations."""
    # torch: loaded by the job, not by backend.jobs (enqueue, status, --help-env)
    import torch

    settings = settings or FinetuneSettings.from_env()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    job = open_job(project, job_id, settings,
                   _with_timings(progress or (lambda stage, percent, **kw: None), timings),
                   registry_root, base_checkpoint, work_root)
    job.timings = timings
    summary: Dict[str, Any] = {"job_id": job_id, "project": job.pid, "version": job.name,
                               "parent": job.parent.name, "settings": settings.to_dict()}
    if job.registry.exists(job.name):
        # An earlier attempt of this job registered the version and died before promoting.
        if before_register:
            before_register()
        return _finish_existing(job.registry, job.name, summary)

    report = pull_annotations(job, export, local_files_root)
    summary["data"] = {k: report[k] for k in ("tasks", "annotations", "regions", "kept", "train_regions",
                                              "holdout_regions", "train_tasks", "holdout_tasks",
                                              "latest_annotation", "source")}
    summary["skipped"] = report["skipped"]
    shortfall = too_few(report, settings)
    if shortfall:
        return skip(job, summary, shortfall)

    check_base_data(settings)
    plan = plan_evaluation(job, rates or {})
    evaluate_parent(job, plan)
    routing = route(job)
    tcfg, trained, candidate, summary["candidate"] = train_candidate(job, plan.eta, routing)
    summary["train"] = {"steps": trained["steps"], "resumed": trained["resumed"], "device": trained["device"],
                        "rehearsal": tcfg.rehearsal}
    ev = evaluate_candidate(job, plan, candidate)
    promote, reason, confidence = decide_promotion(ev, settings)
    register(job, candidate, tcfg, ev.metrics, summary["data"], report["skipped"], promote, reason, confidence,
             before_register)
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    summary.update(status="promoted" if promote else "kept", promoted=promote, reason=reason,
                   confidence=confidence, metrics=ev.metrics, timings=dict(timings), rates=plan.eta.measured)
    log.info("job %s: %s %s in %.0f s (%s) (%s)", job_id, job.name, "promoted" if promote else "kept unpromoted",
             timings["total_s"], ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), reason)
    job.progress("done", 100, detail=f"{job.name} {'promoted' if promote else 'kept'}: {reason}")
    _cleanup(job.work, settings)
    return summary


def _with_timings(progress: Progress, timings: Dict[str, float]) -> Progress:
    """Every progress report also carries the seconds of the stages done so far (where the time
    goes, in job.meta while the job runs)."""
    def report(stage: str, percent: int, **kw) -> None:
        progress(stage, percent, timings=dict(timings), **kw)
    return report
