"""model/runtime.py: the network served by OpenVINO / ONNX Runtime gives PyTorch's masks, the
converted model is cached by checkpoint hash, and whatever fails falls back to PyTorch."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import DEFAULT_CHECKPOINT
from model.config import ModelConfig
from model.images import load_image, load_mask
from model.network import InteractiveSegNet
from model.predictor import Predictor
from model.runtime import _cache_path, choose, evict, installed
from tests.conftest import DATASETS
from training.evaluation.clicker import RobotClicker

BERKELEY = DATASETS / "Berkeley"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped checkpoint in PyTorch and in OpenVINO (converted once for the module)."""
    if not installed("openvino"):
        pytest.skip("openvino is not installed")
    cache = tmp_path_factory.mktemp("inference-cache")
    torch_p = Predictor.load(str(DEFAULT_CHECKPOINT), device="cpu", runtime="torch")
    ov = Predictor(torch_p.net, torch_p.info, device="cpu", options=torch_p.options, runtime="openvino",
                   cache=cache)
    return torch_p, ov, cache


@pytest.mark.e2e          # converts the shipped model to OpenVINO: seconds of CPU
def test_openvino_gives_the_masks_of_pytorch_on_a_real_image(shipped):
    if not (BERKELEY / "masks").is_dir():
        pytest.skip(f"no Berkeley data under {BERKELEY}")
    torch_p, ov, _ = shipped
    assert ov.runtime == "openvino" and torch_p.runtime == "torch"
    mask_path = sorted((BERKELEY / "masks").glob("*.png"))[0]
    image, gt = load_image(BERKELEY / "images" / f"{mask_path.stem}.jpg"), load_mask(mask_path)
    a, b = torch_p.open(image), ov.open(image)
    robot = RobotClicker(gt)
    pred = np.zeros(gt.shape, bool)
    passes = 0
    for _ in range(4):          # the whole image, then zoom-in views and focus crops of other sizes
        c = robot.next_click(pred)
        pa = a.add_click(c.x, c.y, c.positive)
        pb = b.add_click(c.x, c.y, c.positive)
        passes += a.last_timing["refine_passes"]
        assert np.abs(pa - pb).max() < 1e-3
        pred = pa > 0.49
        assert np.array_equal(pred, pb > 0.49)
    assert passes > 0            # the focus crops went through the runtime too
    # a box prompt (the box input of the converted graph)
    ys, xs = np.nonzero(gt)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert np.array_equal(torch_p.open(image).set_box(*box) > 0.49, ov.open(image).set_box(*box) > 0.49)


@pytest.mark.e2e          # converts the shipped model to OpenVINO: seconds of CPU
def test_the_converted_model_is_cached_by_checkpoint_hash(shipped, caplog):
    torch_p, ov, cache = shipped
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and {p.rsplit(".", 1)[1] for p in files} == {"xml", "bin"}   # no temporary left
    assert ov.compiled is not None and ov.compiled.source.endswith(".xml")
    with caplog.at_level(logging.INFO, logger="simclick.runtime"):
        again = Predictor(torch_p.net, torch_p.info, device="cpu", options=torch_p.options, runtime="openvino",
                          cache=cache)
    assert again.runtime == "openvino" and again.compiled is not None
    assert again.compiled.source == ov.compiled.source
    assert "converted" not in caplog.text                   # read from the cache, not converted again
    xml = Path(ov.compiled.source)
    os.utime(xml, (1e9, 1e9))                               # as if last used in 2001
    Predictor(torch_p.net, torch_p.info, device="cpu", options=torch_p.options, runtime="openvino", cache=cache)
    assert xml.stat().st_mtime > 1e9 + 1                    # a read marks it used: eviction keeps it
    # another checkpoint (a fine-tuned version: other bytes, other hash) has another file
    import openvino

    other = _cache_path(cache, "0" * 64, "openvino", openvino.__version__, ".xml")
    assert other is not None and other.parent == cache and str(other) != ov.compiled.source


@pytest.mark.e2e          # converts the shipped model to OpenVINO: seconds of CPU
def test_training_export_converts_into_the_cache(shipped, monkeypatch, capsys):
    from training import export

    _, ov, cache = shipped
    monkeypatch.setenv("INFERENCE_CACHE", str(cache))
    assert export.main([str(DEFAULT_CHECKPOINT), "--convert", "openvino"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"for openvino: {ov.compiled.source}")


@pytest.mark.e2e          # converts the shipped model to OpenVINO: seconds of CPU
def test_an_unreadable_cached_model_is_converted_again(shipped, caplog):
    torch_p, ov, cache = shipped
    assert ov.compiled is not None
    xml = cache / ov.compiled.source.rsplit("/", 1)[1]
    xml.write_text("<not a model")
    with caplog.at_level(logging.WARNING, logger="simclick.runtime"):
        again = Predictor(torch_p.net, torch_p.info, device="cpu", runtime="openvino", cache=cache)
    assert again.runtime == "openvino" and "unreadable" in caplog.text
    assert again.compiled is not None and again.compiled.source == str(xml)
    assert xml.read_text().startswith("<?xml")               # replaced by a good one, converted again


def test_a_failed_conversion_falls_back_to_pytorch(caplog):
    """A late-fusion network is not converted (its backbone features are cached per image in
    PyTorch): the predictor logs why and answers with PyTorch, as it does for a missing package."""
    torch.manual_seed(0)
    net = InteractiveSegNet(ModelConfig(input_size=128, fusion="late", aspp_channels=32, decoder_channels=32))
    with caplog.at_level(logging.WARNING, logger="simclick.predictor"):
        p = Predictor(net, {"version": "late"}, device="cpu", runtime="openvino")
    assert p.runtime == "torch" and p.compiled is None
    assert "serving with PyTorch" in caplog.text and "late fusion" in caplog.text
    prob = p.open(np.full((96, 128, 3), 120, np.uint8)).add_click(60, 40, True)
    assert prob.shape == (96, 128)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simclick.predictor"):
        q = Predictor(net, {"version": "late"}, device="cpu", runtime="no-such-runtime")
    assert q.runtime == "torch" and "no-such-runtime" in caplog.text


def test_the_cache_keeps_the_most_recently_used_models(tmp_path, monkeypatch):
    """Beyond INFERENCE_CACHE_KEEP models, the least recently used go (an OpenVINO model's .xml with
    its .bin), and so do temporary folders a killed conversion left; nothing else is touched."""
    now = time.time()
    for i, name in enumerate(["openvino-a.xml", "openvino-b.xml", "onnxruntime-c.onnx", "openvino-d.xml"]):
        path = tmp_path / name
        path.write_text(name)
        if path.suffix == ".xml":
            path.with_suffix(".bin").write_text("weights")
        os.utime(path, (now - 100 * (i + 1),) * 2)          # a newest, d oldest
    os.utime(tmp_path / "openvino-a.xml", (now - 1000,) * 2)   # a: used long ago
    (tmp_path / "notes.txt").write_text("not a model")
    for name, age in ((".convert-old", 7200), (".convert-running", 10)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.bin").write_text("half")
        os.utime(tmp_path / name, (now - age,) * 2)
    gone = evict(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".convert-running", "notes.txt", "onnxruntime-c.onnx", "openvino-b.bin", "openvino-b.xml"]
    assert {p.name for p in gone} == {"openvino-a.xml", "openvino-a.bin", "openvino-d.xml", "openvino-d.bin",
                                      ".convert-old"}
    assert evict(tmp_path, keep=0) == [] and len(list(tmp_path.iterdir())) == 5     # 0 keeps all
    assert evict(tmp_path / "missing", keep=1) == []

    def refused(self, missing_ok=False):                     # a read-only cache (root may write anyway)
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "unlink", refused)
    assert evict(tmp_path, keep=1) == []                     # logged, not raised: the model still serves


def test_auto_picks_an_installed_runtime():
    want = "openvino" if installed("openvino") else "onnxruntime" if installed("onnxruntime") else "torch"
    assert choose("auto") == want and choose("torch") == "torch"


@pytest.mark.e2e
@pytest.mark.skipif(not installed("onnxruntime") or not installed("onnx"), reason="onnxruntime not installed")
def test_onnxruntime_gives_the_answers_of_pytorch(tmp_path, tiny_checkpoint):
    ref = Predictor.load(str(tiny_checkpoint), device="cpu", runtime="torch")
    ort = Predictor(ref.net, ref.info, device="cpu", options=ref.options, runtime="onnxruntime", cache=tmp_path)
    assert ort.runtime == "onnxruntime" and [p.suffix for p in tmp_path.iterdir()] == [".onnx"]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 160, 3), np.uint8)
    a, b = ref.open(image), ort.open(image)
    for x, y, pos in [(80, 60, True), (10, 10, False), (100, 70, True)]:
        assert np.abs(a.add_click(x, y, pos) - b.add_click(x, y, pos)).max() < 1e-3


# A child process: the crash this guards against kills the process it happens in.
_TWO_VERSIONS = """
import gc, os, signal, sys
from model.predictor import Predictor
path = sys.argv[1]
old = Predictor.load(path, device="cpu", runtime="openvino")
new = Predictor.load(path, device="cpu", runtime="openvino")   # a promotion: the new one loads
assert old.runtime == new.runtime == "openvino"
del old; gc.collect()                                                          # then the old one goes
del new; gc.collect()
signal.signal(signal.SIGUSR1, lambda *a: print("signal handled"))
os.kill(os.getpid(), signal.SIGUSR1)                                           # as SIGCHLD or SIGTERM would
"""


@pytest.mark.e2e
@pytest.mark.skipif(not installed("openvino"), reason="openvino is not installed")
def test_a_signal_after_versions_were_swapped_is_handled(tmp_path, tiny_checkpoint):
    """OpenVINO's CPU plugin swaps the thread's signal stack per Core; models freed out of order left
    a freed stack installed and the next signal was a SIGSEGV (the test suite died of it in a
    DataLoader's SIGCHLD). model/runtime.py keeps one Core per process."""
    import os
    import subprocess
    import sys

    from model.files import REPO_ROOT

    env = {**os.environ, "INFERENCE_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _TWO_VERSIONS, str(tiny_checkpoint)],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "signal handled" in r.stdout, (r.returncode, r.stderr[-2000:])
