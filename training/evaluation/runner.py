"""Run the robot user against a predictor: one instance, a list of samples, optionally in workers.

Python API (also what the fine-tuning worker calls):

    from training.evaluation import evaluate_dataset, samples_from_arrays, load_dataset
    result = evaluate_dataset(predictor_or_factory, load_dataset("GrabCut"), dataset="GrabCut")
    result = evaluate_dataset(predictor, samples_from_arrays([(image, mask), ...]), dataset="holdout")
    result.metrics()  # noc85, noc90, nof90, miou, spc, ...

`predictor_or_factory` is either a loaded predictor (anything with `open`) or a zero-argument
callable that builds one; with workers > 1 it must be a picklable factory (each worker process
builds its own predictor, with one torch/OpenCV thread each).
"""
from __future__ import annotations

import heapq
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, cast

import cv2
import numpy as np
from tqdm import tqdm

from .clicker import RobotClicker
from .metrics import iou, noc, summarize
from .protocol import CURVE_CLICKS, NOF_TARGET, Protocol
from .samples import LoadedSample, Sample


@dataclass
class InstanceResult:
    sample_id: str
    ious: List[float]                      # IoU after click 1, 2, ... (>= 20 values)
    clicks: List[Tuple[float, float, bool]]    # (x, y, positive) of each click (whole pixels)
    seconds: float                         # predictor wall time: open() + every add_click()
    masks: Optional[Dict[int, np.ndarray]] = None  # click -> packed prediction (failure report only)
    shape: Tuple[int, int] = (0, 0)
    box_iou: Optional[float] = None        # box mode: IoU of the box prompt alone

    def noc(self, target: float = NOF_TARGET, budget: int = CURVE_CLICKS) -> int:
        return noc(self.ious, target, budget)

    def mask(self, click: int) -> np.ndarray:
        h, w = self.shape
        masks = cast(Dict[int, np.ndarray], self.masks)      # called on results that kept them
        return np.unpackbits(masks[click], count=h * w).reshape(h, w).astype(bool)


@dataclass
class DatasetResult:
    dataset: str
    model_version: str
    device: str
    protocol: Protocol
    instances: List[InstanceResult]
    wall_seconds: float = 0.0
    checkpoint_path: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> Dict[str, Any]:
        m = summarize([r.ious for r in self.instances], sum(r.seconds for r in self.instances),
                      sum(len(r.ious) for r in self.instances), self.protocol.max_clicks)
        if self.protocol.box:
            m["box_miou"] = float(np.mean([r.box_iou for r in self.instances])) if self.instances else float("nan")
        return {"dataset": self.dataset, **m, "device": self.device, "model_version": self.model_version}

    def to_json(self) -> Dict[str, Any]:
        """The CLI's --json object: dataset, instances, noc85, noc90, nof90, spc, device, model_version, ..."""
        m = self.metrics()
        m["max_clicks"] = self.protocol.max_clicks
        m["wall_seconds"] = round(self.wall_seconds, 3)
        return m


def open_session(predictor: Any, sample: LoadedSample):
    if getattr(predictor, "needs_gt", False):
        return predictor.open(sample.image, gt=sample.gt)
    return predictor.open(sample.image)


def box_prompt(session: Any, gt: np.ndarray, threshold: float = Protocol().threshold) -> np.ndarray:
    """The box mode's prompt: the tight box of the ground truth as the session's box; its mask."""
    ys, xs = np.nonzero(gt)
    prob = np.asarray(session.set_box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return prob > threshold


def box_only_ious(predictor: Any, samples: Sequence[Sample]) -> Dict[str, float]:
    """IoU of the box prompt alone (no clicks after it) per instance id: the box mode's first
    number, cheap enough for a training run's validation and a fine-tuning job's decision."""
    ious = {}
    for sample in samples:
        loaded = sample.load()
        ious[sample.sample_id] = iou(loaded.gt, box_prompt(open_session(predictor, loaded), loaded.gt), loaded.ignore)
    return ious


def box_only_miou(predictor: Any, samples: Sequence[Sample]) -> float:
    """Mean of box_only_ious."""
    ious = list(box_only_ious(predictor, samples).values())
    return float(np.mean(ious)) if ious else float("nan")


def run_instance(predictor: Any, sample: LoadedSample, protocol: Protocol = Protocol(),
                 keep_masks: bool = False) -> InstanceResult:
    """Click until 20 clicks are made; past 20 (max_clicks > 20) only until IoU >= 0.90. Without
    the curve (`protocol.curve` False) stop at the first click that reaches IoU 0.90."""
    gt, ignore = sample.gt, sample.ignore
    h, w = gt.shape
    clicker = RobotClicker(gt, ignore)
    pred = np.zeros((h, w), dtype=bool)
    t0 = time.perf_counter()
    session = open_session(predictor, sample)
    seconds = time.perf_counter() - t0
    ious: List[float] = []
    masks: Dict[int, np.ndarray] = {}
    box_iou = None
    if protocol.box:
        t0 = time.perf_counter()
        pred = box_prompt(session, gt, protocol.threshold)
        seconds += time.perf_counter() - t0
        box_iou = iou(gt, pred, ignore)
    for k in range(1, protocol.max_clicks + 1):
        c = clicker.next_click(pred)
        t0 = time.perf_counter()
        prob = session.add_click(c.x, c.y, c.positive)
        seconds += time.perf_counter() - t0
        prob = np.asarray(prob)
        if prob.shape != (h, w):
            raise ValueError(f"{sample.sample_id}: predictor returned {prob.shape}, expected {(h, w)}")
        pred = prob > protocol.threshold
        ious.append(iou(gt, pred, ignore))
        if keep_masks and (k == 1 or k == CURVE_CLICKS):
            masks[k] = np.packbits(pred)
        if (k >= CURVE_CLICKS or not protocol.curve) and ious[-1] >= NOF_TARGET:
            break
    if keep_masks and CURVE_CLICKS not in masks:  # cannot happen (max_clicks >= 20), kept for safety
        masks[len(ious)] = np.packbits(pred)
    return InstanceResult(sample.sample_id, ious, [c.as_tuple() for c in clicker.clicks], seconds,
                          masks if keep_masks else None, (h, w), box_iou)


# ---------------------------------------------------------------- workers

_WORKER: Dict[str, Any] = {}


def _predictor_info(predictor: Any) -> Dict[str, Optional[str]]:
    """version, device and (for the network) the checkpoint file and its sha256, as the predictor reports them."""
    card = getattr(predictor, "info", None)
    card = card if isinstance(card, dict) else {}
    path = getattr(predictor, "checkpoint_path", None) or card.get("checkpoint_path")
    return {"version": str(getattr(predictor, "version", type(predictor).__name__)),
            "device": _device(predictor),
            "checkpoint_path": str(path) if path else None,
            "checkpoint_sha256": card.get("checkpoint_sha256")}


def _device(predictor: Any) -> str:
    """The device, and the inference runtime when it is not PyTorch: "cpu (openvino)"."""
    device, runtime = str(getattr(predictor, "device", "cpu")), getattr(predictor, "runtime", "torch")
    return device if runtime == "torch" else f"{device} ({runtime})"


def _single_thread() -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    cv2.setNumThreads(1)


def _init_worker(factory: Callable[[], Any], protocol: Protocol, keep_masks: bool) -> None:
    _single_thread()
    if "torch" in sys.modules:   # before the factory: an inference runtime takes PyTorch's thread count
        sys.modules["torch"].set_num_threads(1)
    try:
        _WORKER["predictor"] = factory()
    except BaseException as e:  # re-raised by _work: a failing initializer would make Pool respawn forever
        _WORKER["error"] = e
        return
    _WORKER.update(protocol=protocol, keep_masks=keep_masks, info=_predictor_info(_WORKER["predictor"]))


def _work(task: Tuple[Any, Sample]) -> Tuple[Any, InstanceResult, Dict[str, Optional[str]]]:
    if "error" in _WORKER:
        raise _WORKER["error"]
    key, sample = task
    r = run_instance(_WORKER["predictor"], sample.load(), _WORKER["protocol"], _WORKER["keep_masks"])
    return key, r, _WORKER["info"]


def _run_all(predictor_or_factory: Any, tasks: Sequence[Tuple[Any, Sample]], protocol: Protocol, workers: int,
             keep_masks: bool) -> Iterator[Tuple[Any, InstanceResult, Dict[str, Optional[str]]]]:
    """(key, result, predictor info) of every (key, sample) task, in order: in this process, or in
    `workers` processes (one pool, each worker building its own predictor once)."""
    if workers <= 1 or len(tasks) <= 1:
        predictor = predictor_or_factory if hasattr(predictor_or_factory, "open") else predictor_or_factory()
        info = _predictor_info(predictor)
        for key, s in tasks:
            yield key, run_instance(predictor, s.load(), protocol, keep_masks), info
        return
    if hasattr(predictor_or_factory, "open"):
        raise TypeError("workers > 1 needs a picklable predictor factory, not a loaded predictor")
    ctx = mp.get_context("spawn")  # safe with torch/CUDA and OpenCV thread pools
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker,
                  initargs=(predictor_or_factory, protocol, keep_masks)) as pool:
        yield from pool.imap(_work, tasks, chunksize=1)


class _WorstK:
    """Keep packed masks only for the K worst instances (highest NoC@90, then lowest final IoU)."""

    def __init__(self, k: int):
        self.k = k
        self.heap: List[Any] = []

    def offer(self, i: int, r: InstanceResult) -> None:
        if r.masks is None:
            return
        key = (r.noc(), -r.ious[min(CURVE_CLICKS, len(r.ious)) - 1], -i)
        if self.k <= 0:
            r.masks = None
        elif len(self.heap) < self.k:
            heapq.heappush(self.heap, (key, i, r))
        else:
            dropped = heapq.heappushpop(self.heap, (key, i, r))
            dropped[2].masks = None


def evaluate_dataset(predictor_or_factory: Any, samples: Sequence[Sample], dataset: str = "custom",
                     protocol: Protocol = Protocol(), workers: int = 1, progress: bool = True,
                     report_k: int = 0) -> DatasetResult:
    """Evaluate one data set. `report_k` > 0 keeps predictions of the worst K for a failure report."""
    keep = report_k > 0
    worst = _WorstK(report_k)
    results: List[InstanceResult] = []
    info: Dict[str, Optional[str]] = {}
    bar = tqdm(total=len(samples), desc=dataset, unit="inst", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for _, r, info in _run_all(predictor_or_factory, [(None, s) for s in samples], protocol, workers, keep):  # noqa: B007 (read after the loop)
            results.append(r)
            worst.offer(len(results) - 1, r)
            bar.update(1)
    finally:
        bar.close()
    return DatasetResult(dataset, info.get("version") or "unknown", info.get("device") or "cpu", protocol,
                         results, time.perf_counter() - start, info.get("checkpoint_path"),
                         checkpoint_sha256=info.get("checkpoint_sha256"))


def evaluate_datasets(predictor_or_factory: Any, sets: Mapping[str, Sequence[Sample]],
                      protocol: Protocol = Protocol(), workers: int = 1,
                      on_result: Optional[Callable[[str, InstanceResult], None]] = None) -> Dict[str, DatasetResult]:
    """Several data sets of one model in one pass: with workers > 1 one pool serves them all, so
    its start-up (each worker loading the model) is paid once. `on_result(dataset, result)` is
    called in this process as each instance finishes. Each result's wall_seconds is the pass's
    wall time shared out by predictor time."""
    tasks = [(name, s) for name, samples in sets.items() for s in samples]
    results: Dict[str, List[InstanceResult]] = {name: [] for name in sets}
    info: Dict[str, Optional[str]] = {}
    start = time.perf_counter()
    for name, r, info in _run_all(predictor_or_factory, tasks, protocol, workers, False):  # noqa: B007 (read after the loop)
        results[name].append(r)
        if on_result is not None:
            on_result(name, r)
    wall = time.perf_counter() - start
    busy = sum(r.seconds for rs in results.values() for r in rs) or 1.0
    return {name: DatasetResult(name, info.get("version") or "unknown", info.get("device") or "cpu", protocol, rs,
                                wall * sum(r.seconds for r in rs) / busy, info.get("checkpoint_path"),
                                checkpoint_sha256=info.get("checkpoint_sha256"))
            for name, rs in results.items()}
