"""Box mode of the evaluation: every instance starts from its ground-truth box (box-trained models)."""
import numpy as np
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.network import InteractiveSegNet
from model.predictor import Predictor
from training.evaluation.protocol import Protocol
from training.evaluation.runner import evaluate_dataset
from training.evaluation.samples import samples_from_arrays
from training.evaluation.tables import detail_table


class BoxOracle:
    """Answers a box with the box itself and a click with the previous answer: a known box IoU."""
    version, device = "box-oracle", "cpu"

    def open(self, image):
        h, w = image.shape[:2]
        outer = self

        class S:
            prob = np.zeros((h, w), np.float32)

            def set_box(self, x0, y0, x1, y1):
                outer.box = (x0, y0, x1, y1)
                self.prob = np.zeros((h, w), np.float32)
                self.prob[int(y0):int(y1), int(x0):int(x1)] = 1
                return self.prob

            def add_click(self, x, y, positive):
                return self.prob
        return S()


def test_box_mode_starts_from_the_tight_box_and_reports_its_iou():
    image = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:20, 5:25] = True
    mask[10:15, 25:35] = True                  # an L: the tight box (5..35 x 10..20) holds 250 of 300 px
    oracle = BoxOracle()
    result = evaluate_dataset(oracle, samples_from_arrays([(image, mask)]), dataset="L",
                              protocol=Protocol(box=True), progress=False)
    assert oracle.box == (5, 10, 35, 20)
    m = result.metrics()
    assert m["box_miou"] == pytest.approx(250 / 300)
    assert len(result.instances[0].ious) == 20
    assert "box IoU" in detail_table([m])
    assert "box_miou" not in evaluate_dataset(oracle, samples_from_arrays([(image, mask)]), dataset="L",
                                              progress=False).metrics()


@pytest.mark.e2e  # slow (1.0 s of CPU): the unit tier stays within a minute (issue 24)
def test_box_mode_runs_a_box_trained_network(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(fusion="late", box_input=True, input_size=128, aspp_channels=32, decoder_channels=32)
    path = save_checkpoint(tmp_path / "b.safetensors", InteractiveSegNet(cfg).state_dict(), cfg, {"version": "b"})
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), bool)
    mask[10:30, 20:40] = True
    result = evaluate_dataset(Predictor.load(path), samples_from_arrays([(image, mask)]), dataset="x",
                              protocol=Protocol(box=True), progress=False)
    assert 0.0 <= result.metrics()["box_miou"] <= 1.0
