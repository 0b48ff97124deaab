"""The network served through an optimised CPU inference runtime (OpenVINO or ONNX Runtime).

    compiled = compile_net(net, "openvino", cache=Path("data/inference-cache"), key=checkpoint_sha256)
    prob = compiled.run({"image": ..., "maps": ..., "prev": ..., "clicks": ...})   # numpy in, numpy out

What is converted is `InteractiveSegNet.decode_maps` of the BatchNorm-folded network: everything
after the prompt maps (disks, box, proximity), which the predictor still computes in PyTorch (they
loop over the clicks in Python; cheap). Sizes are dynamic (any multiple of 16 and any number of
clicks), so one converted model serves the coarse view, the zoom-in view and the focus crops.
Only early fusion (the shipped model) is converted; a late-fusion network caches its backbone
features per image in PyTorch and stays there.

The converted model is made once per checkpoint and runtime and cached on disk under a key that
holds the checkpoint's sha256, the runtime's version and GRAPH_VERSION: a promoted fine-tuned
version converts once, the next load of the same file reads the cache. Files are published with
an atomic rename, so a crash or two processes converting at once never leave a torn file. The cache
keeps the INFERENCE_CACHE_KEEP most recently used models (a read marks one used): every promoted
version of a fine-tuning loop would otherwise stay on disk for good.

`INFERENCE_RUNTIME` (model.settings): auto picks OpenVINO, else ONNX Runtime, else PyTorch,
by which package is installed. Training never uses this module.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .network import ImageCode, InteractiveSegNet, PromptMaps
from .files import REPO_ROOT
from .settings import DATA_DIR, INFERENCE_CACHE, INFERENCE_CACHE_KEEP

log = logging.getLogger("simclick.runtime")

RUNTIMES = ("openvino", "onnxruntime")
# Part of the cache key: change it whenever the converted graph (_Graph, decode_maps) changes, so
# models converted before are not read again.
GRAPH_VERSION = "1"


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot serve this network (package missing, architecture not convertible)."""


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(runtime) is not None


def choose(requested: str) -> str:
    """INFERENCE_RUNTIME's value -> the runtime to use: 'auto' is the first installed of RUNTIMES,
    else 'torch'. An explicit runtime is returned as asked (a missing package is then a failed
    conversion, logged by the caller, rather than a silent change of runtime)."""
    if requested != "auto":
        return requested
    return next((r for r in RUNTIMES if installed(r)), "torch")


def default_cache() -> Path:
    """INFERENCE_CACHE, else $DATA_DIR/inference-cache (relative paths from the repository root)."""
    raw = INFERENCE_CACHE.read() or str(Path(DATA_DIR.read()) / "inference-cache")
    p = Path(raw)
    return p if p.is_absolute() else REPO_ROOT / p


class _Graph(nn.Module):
    """What is converted: the normalised image and the prompt maps in, the probability out."""

    def __init__(self, net: InteractiveSegNet, names: list[str]):
        super().__init__()
        self.net = net
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        t = dict(zip(self.names, tensors))
        image = t["image"]
        code = ImageCode((image.shape[2], image.shape[3]), image=image)
        maps = PromptMaps(t["maps"], t["prev"], t.get("box"), t.get("prox4"))
        return torch.sigmoid(self.net.decode_maps(code, t["clicks"], maps).logits)


def input_names(net: InteractiveSegNet) -> list[str]:
    cfg = net.config
    if cfg.fusion != "early":
        raise RuntimeUnavailable("late fusion: the backbone's features are cached per image in PyTorch")
    return (["image", "maps", "prev"] + (["box"] if cfg.box_input else [])
            + (["prox4"] if cfg.late_fusion else []) + ["clicks"])


def graph_inputs(net: InteractiveSegNet, code: ImageCode, clicks: torch.Tensor, maps: PromptMaps) -> dict:
    """The converted graph's inputs for one decode, as float32 numpy arrays."""
    values = {"image": code.image, "maps": maps.maps, "prev": maps.prev, "box": maps.box, "prox4": maps.prox4,
              "clicks": clicks}
    return {n: values[n].detach().float().contiguous().numpy() for n in input_names(net)}  # type: ignore[union-attr]


def _example(net: InteractiveSegNet, h: int = 256, w: int = 192) -> tuple[torch.Tensor, ...]:
    """Inputs to trace the graph with: two clicks and a box, so that no branch is specialised away."""
    image = torch.rand(1, 3, h, w)
    clicks = torch.tensor([[[h / 2, w / 2, 1.0], [10.0, 10.0, -1.0]]])
    code = ImageCode((h, w), image=image)
    prev = torch.zeros(1, 1, h, w)
    box = torch.tensor([[8.0, 8.0, h - 8.0, w - 8.0]]) if net.config.box_input else None
    arrays = graph_inputs(net, code, clicks, net.prompt_maps(code, clicks, prev, box))
    return tuple(torch.from_numpy(a) for a in arrays.values())


class CompiledNet:
    """A converted network: `run(inputs)` -> the (h, w) float32 probability. Thread-safe."""

    def __init__(self, runtime: str, run: Callable[[dict], np.ndarray], source: str):
        self.runtime = runtime
        self._run = run
        self.source = source        # where the model came from: the cache file, or "converted"

    def run(self, inputs: dict) -> np.ndarray:
        return self._run(inputs)[0, 0]


def compile_net(net: InteractiveSegNet, runtime: str, cache: Path | None = None, key: str | None = None,
                threads: int = 0) -> CompiledNet:
    """`net` (BatchNorm folded, eval mode) in `runtime`, converted or read from `cache` under `key`
    (e.g. the checkpoint's sha256; None: converted in memory, not cached). Raises on any failure:
    the caller logs it and serves with PyTorch. threads: the runtime's CPU threads (0 = its default)."""
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown inference runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if not installed(runtime):
        raise RuntimeUnavailable(f"the {runtime} package is not installed (pip install {runtime})")
    names = input_names(net)
    if runtime == "openvino":
        return _openvino(net, names, cache, key, threads)
    return _onnxruntime(net, names, cache, key, threads)


def _cache_path(cache: Path | None, key: str | None, runtime: str, version: str, suffix: str) -> Path | None:
    if cache is None or not key:
        return None
    digest = hashlib.sha256(f"{key}|{runtime}|{version}|{torch.__version__}|{GRAPH_VERSION}".encode()).hexdigest()
    return cache / f"{runtime}-{digest[:24]}{suffix}"


def _publish(finals: list[Path], write: Callable[[Path], None]) -> None:
    """`write(folder)` writes files named as `finals` into a temporary folder beside them; they are
    then renamed into place in order: the last is the one a reader looks for."""
    finals[0].parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=finals[0].parent))
    try:
        write(tmp)
        for final in finals:
            with open(tmp / final.name, "rb") as f:
                os.fsync(f.fileno())
        for final in finals:
            os.replace(tmp / final.name, final)
    finally:
        shutil.rmtree(tmp)


# The file a reader looks for, per runtime (an OpenVINO model's weights are the .bin beside its .xml).
_ENTRY_GLOBS = ("openvino-*.xml", "onnxruntime-*.onnx")
_STALE_TEMP_S = 3600.0


def _used(path: Path) -> None:
    """Mark a cached model as just used (its mtime): eviction removes the least recently used."""
    try:
        os.utime(path)
    except OSError:        # a read-only cache is still a cache; it is only never evicted from
        pass


def evict(cache: Path, keep: int | None = None) -> list[Path]:
    """Delete all but the `keep` (default INFERENCE_CACHE_KEEP; 0 = all kept) most recently used
    converted models in `cache`, and temporary folders a killed conversion left over an hour ago.
    Returns what was deleted. Safe beside readers: a model already loaded lives in memory, and a
    reader that finds half of one gone converts again (_unreadable)."""
    keep = INFERENCE_CACHE_KEEP.read() if keep is None else keep
    gone: list[Path] = []
    if keep <= 0 or not cache.is_dir():
        return gone
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:    # deleted meanwhile by another process's eviction
            return 0.0
    try:
        entries = sorted((p for g in _ENTRY_GLOBS for p in cache.glob(g)), key=mtime, reverse=True)
        for entry in entries[keep:]:
            for p in (entry, entry.with_suffix(".bin")) if entry.suffix == ".xml" else (entry,):
                p.unlink(missing_ok=True)
                gone.append(p)
        for tmp in cache.glob(".convert-*"):
            if time.time() - mtime(tmp) > _STALE_TEMP_S:
                shutil.rmtree(tmp)
                gone.append(tmp)
    except OSError as e:     # a read-only cache, another process evicting at once: the model still serves
        log.warning("inference cache %s: eviction stopped: %s: %s", cache, type(e).__name__, e)
    if gone:
        log.info("inference cache %s: deleted %d file(s) beyond the %d most recently used models", cache,
                 len(gone), keep)
    return gone


def _unreadable(path: Path, e: Exception) -> None:
    log.warning("the converted model %s is unreadable (%s: %s): converting again", path, type(e).__name__, e)


_OV_CORE: list = []
_OV_CORE_LOCK = threading.Lock()


def _openvino_core() -> Any:
    """The process's one OpenVINO Core. Its CPU plugin, when a Core loads it, replaces the calling
    thread's signal stack (sigaltstack) with its own and puts the previous one back when that Core
    is freed. Cores freed in another order than made (an old model version dropped after a new one
    loaded) left a freed stack installed, and the next signal to that thread (SIGCHLD, SIGTERM)
    killed the process with SIGSEGV. One Core, never freed, keeps one valid stack."""
    import openvino as ov

    with _OV_CORE_LOCK:
        if not _OV_CORE:
            _OV_CORE.append(ov.Core())
        return _OV_CORE[0]


def _openvino(net: InteractiveSegNet, names: list[str], cache: Path | None, key: str | None,
              threads: int) -> CompiledNet:
    import openvino as ov

    xml = _cache_path(cache, key, "openvino", ov.__version__, ".xml")
    core = _openvino_core()
    model, source = None, "converted"
    if xml is not None and xml.is_file():
        try:
            model, source = core.read_model(str(xml)), str(xml)
            _used(xml)
        except Exception as e:
            _unreadable(xml, e)
    if model is None:
        t0 = time.perf_counter()
        example = _example(net)
        shapes = [(ov.PartialShape([1, t.shape[1], -1, -1]) if t.dim() == 4 else ov.PartialShape([1, -1, 3]),
                   ov.Type.f32) for t in example]
        with torch.inference_mode(), warnings.catch_warnings():
            # OpenVINO's converter traces with torch.jit (deprecated in torch, still what it uses), and
            # the tracer warns of the batch check in decode_maps: the graph serves batch 1 only
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            model = ov.convert_model(_Graph(net, names).eval(), example_input=example, input=shapes)
        for port, name in zip(model.inputs, names):
            port.get_tensor().set_names({name})
        log.info("converted the network to OpenVINO in %.1f s", time.perf_counter() - t0)
        if xml is not None:
            converted, target = model, xml
            # fp32 weights: compressing them to fp16 would change the answers
            _publish([xml.with_suffix(".bin"), xml],
                     lambda d: ov.save_model(converted, str(d / target.name), compress_to_fp16=False))
            source = str(xml)
            evict(xml.parent)
    # f32, not the bf16 the CPU plugin picks on CPUs with AMX: bf16 changes the masks (README, Speed)
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    # An infer request holds one inference's buffers and runs one inference at a time. Idle ones are
    # kept and reused by whichever thread asks next (not one per thread: a threaded server starts a
    # thread per request, and a new request allocates its buffers again); at most one per
    # concurrent inference is ever made.
    idle: list = []
    lock = threading.Lock()

    def run(inputs: dict) -> np.ndarray:
        with lock:
            req = idle.pop() if idle else None
        if req is None:
            req = compiled.create_infer_request()
        try:
            return req.infer(inputs)[0]          # a copy (share_outputs=False): the request may be reused
        finally:
            with lock:
                idle.append(req)

    return CompiledNet("openvino", run, source)


def _onnxruntime(net: InteractiveSegNet, names: list[str], cache: Path | None, key: str | None,
                 threads: int) -> CompiledNet:
    import onnxruntime as ort

    path = _cache_path(cache, key, "onnxruntime", ort.__version__, ".onnx")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session, source = None, "converted"
    if path is not None and path.is_file():
        try:
            session, source = ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"]), str(path)
            _used(path)
        except Exception as e:
            _unreadable(path, e)
    if session is None:
        blob = _to_onnx(net, names)
        if path is not None:
            target = path
            def write(folder: Path) -> None:
                (folder / target.name).write_bytes(blob)
            _publish([path], write)
            source = str(path)
            evict(path.parent)
        session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])

    def run(inputs: dict) -> np.ndarray:
        return session.run(None, inputs)[0]      # InferenceSession.run is thread-safe

    return CompiledNet("onnxruntime", run, source)


def _to_onnx(net: InteractiveSegNet, names: list[str]) -> bytes:
    """The graph in ONNX through torch.onnx's TorchScript tracer (what OpenVINO's converter uses
    too): about a second for the network, where the torch.export-based exporter took minutes on
    2 cores for the same graph and the same answers. Sizes and the number of clicks stay dynamic."""
    t0 = time.perf_counter()
    example = _example(net)
    axes = {n: ({1: "clicks"} if n == "clicks" else {2: f"{n}_h", 3: f"{n}_w"}) for n in names}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(), warnings.catch_warnings():
        # the tracer warns of the batch check in decode_maps (the graph serves batch 1 only), and
        # torch of the tracer being the older of its two exporters
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        out = Path(tmp) / "net.onnx"
        torch.onnx.export(_Graph(net, names).eval(), example, out, dynamo=False, input_names=names,
                          output_names=["prob"], dynamic_axes=axes, opset_version=17)
        blob = out.read_bytes()
    log.info("converted the network to ONNX in %.1f s", time.perf_counter() - t0)
    return blob
