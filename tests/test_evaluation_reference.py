"""Reference predictors behind --checkpoint oracle / grabcut, and the checkpoint spec/hash."""
import hashlib

import numpy as np
import pytest

from training.evaluation.metrics import iou
from training.evaluation.predictors import PredictorSpec, checkpoint_hash, sha256_path
from training.evaluation.reference import GrabCutPredictor, OraclePredictor


def _two_tone(h=120, w=160):
    rng = np.random.default_rng(0)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (40, 60, 200)
    gt = np.zeros((h, w), bool)
    gt[30:90, 50:120] = True
    img[gt] = (220, 40, 30)
    img = np.clip(img.astype(int) + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
    return img, gt


def test_oracle_returns_the_ground_truth_and_needs_it():
    img, gt = _two_tone()
    p = OraclePredictor()
    with pytest.raises(ValueError):
        p.open(img)
    s = p.open(img, gt=gt)
    prob = s.add_click(80, 60, True)
    assert prob.dtype == np.float32 and np.array_equal(prob > 0.49, gt)


def test_grabcut_segments_an_easy_object_and_undo_is_exact():
    img, gt = _two_tone()
    p = GrabCutPredictor()
    s = p.open(img)
    one = s.add_click(85, 60, True)
    assert one.shape == gt.shape and one.dtype == np.float32 and 0 <= one.min() and one.max() <= 1
    assert iou(gt, one > 0.49) > 0.9
    two = s.add_click(10, 10, False)
    s.add_click(20, 100, False)
    assert np.array_equal(s.undo(), two)
    again = p.open(img).add_click(85, 60, True)
    assert np.array_equal(again, one)          # deterministic: evaluations are reproducible
    s.reset()
    assert not (s.add_click(5, 5, False) > 0.49).any()   # only a negative click: nothing selected
    with pytest.raises(ValueError):
        s.add_click(500, 5, True)


def test_specs_and_hashes(tmp_path):
    assert PredictorSpec("oracle").is_reference and isinstance(PredictorSpec("oracle")(), OraclePredictor)
    g = PredictorSpec("grabcut")()
    assert isinstance(g, GrabCutPredictor) and g.version.startswith("grabcut-opencv")
    assert checkpoint_hash(PredictorSpec("grabcut"), None, g.version) == f"reference:{g.version}"
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"weights" * 1000)
    want = hashlib.sha256(b"weights" * 1000).hexdigest()
    assert sha256_path(f) == want
    assert checkpoint_hash(PredictorSpec(str(f)), None, "v1") == want
    assert checkpoint_hash(PredictorSpec("default"), str(f), "v1") == want
    assert checkpoint_hash(PredictorSpec("default"), None, "v1", reported_sha256="ab" * 32) == "ab" * 32
