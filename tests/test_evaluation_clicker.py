"""The robot user: checked against a brute-force implementation of the protocol's words."""
import cv2
import numpy as np
import pytest

from training.evaluation.clicker import RobotClicker, region_peak
from training.evaluation.metrics import iou
from training.evaluation.protocol import Protocol
from training.evaluation.runner import run_instance
from training.evaluation.samples import LoadedSample


def brute_distance(region: np.ndarray) -> np.ndarray:
    """Distance of every region pixel to the nearest zero of the region padded with one zero pixel."""
    h, w = region.shape
    padded = np.zeros((h + 2, w + 2), bool)
    padded[1:-1, 1:-1] = region
    zy, zx = np.nonzero(~padded)
    out = np.zeros((h, w))
    for y, x in zip(*np.nonzero(region)):
        out[y, x] = np.sqrt(((zy - (y + 1)) ** 2 + (zx - (x + 1)) ** 2).min())
    return out


def brute_click(gt, pred, ignore, clicked):
    valid = ~ignore if ignore is not None else np.ones_like(gt)
    fn = brute_distance(gt & ~pred & valid)
    fp = brute_distance(pred & ~gt & valid)
    fn[clicked] = 0
    fp[clicked] = 0
    if fn.max() > fp.max():
        y, x = np.argwhere(fn == fn.max())[0]
        return int(x), int(y), True
    y, x = np.argwhere(fp == fp.max())[0]
    return int(x), int(y), False


def test_first_click_is_the_farthest_interior_point():
    gt = np.zeros((30, 40), bool)
    gt[5:16, 8:19] = True  # 11 x 11 square, centre (row 10, col 13)
    c = RobotClicker(gt).next_click(np.zeros_like(gt))
    assert (c.x, c.y, c.positive) == (13, 10, True)


def test_padding_makes_the_image_border_a_boundary():
    gt = np.ones((7, 7), bool)  # the object is the whole image: only the padding bounds it
    c = RobotClicker(gt).next_click(np.zeros_like(gt))
    assert (c.x, c.y) == (3, 3)
    assert region_peak(gt)[0] == pytest.approx(4.0)
    gt = np.ones((5, 7), bool)  # (2, 2), (2, 3), (2, 4) are all at distance 3: the first wins
    assert region_peak(gt) == (pytest.approx(3.0), 2, 2)


def test_ties_go_to_the_first_pixel_in_row_major_order():
    gt = np.zeros((20, 20), bool)
    gt[12:17, 2:7] = True   # lower-left square
    gt[2:7, 12:17] = True   # upper-right square, same size: it comes first in row-major order
    c = RobotClicker(gt).next_click(np.zeros_like(gt))
    assert (c.x, c.y) == (14, 4)
    wide = np.zeros((9, 20), bool)
    wide[2:7, 2:18] = True  # 5 rows x 16 cols: the middle row has many maxima -> leftmost
    c = RobotClicker(wide).next_click(np.zeros_like(wide))
    assert (c.x, c.y) == (4, 4)


def test_negative_click_when_false_positives_dominate():
    gt = np.zeros((40, 40), bool)
    gt[2:8, 2:8] = True
    pred = gt.copy()
    pred[15:36, 15:36] = True     # a large false-positive blob, centre (25, 25)
    pred[3:5, 3:5] = False        # a small false negative inside the object
    c = RobotClicker(gt).next_click(pred)
    assert (c.x, c.y, c.positive) == (25, 25, False)


def test_fn_fp_tie_is_negative_and_nothing_left_clicks_origin_negative():
    gt = np.zeros((11, 23), bool)
    gt[3:8, 2:7] = True
    pred = np.zeros_like(gt)
    pred[3:8, 15:20] = True  # FN and FP squares of the same size: strict '>' -> negative
    c = RobotClicker(gt).next_click(pred)
    assert (c.x, c.y, c.positive) == (17, 5, False)
    c = RobotClicker(gt).next_click(gt.copy())  # perfect prediction: RITM clicks (0, 0), negative
    assert (c.x, c.y, c.positive) == (0, 0, False)


def test_clicked_pixels_get_distance_zero():
    gt = np.zeros((15, 15), bool)
    gt[2:13, 2:13] = True
    clicker = RobotClicker(gt)
    empty = np.zeros_like(gt)
    first = clicker.next_click(empty)
    second = clicker.next_click(empty)
    assert (first.x, first.y) == (7, 7)
    assert (second.x, second.y) != (7, 7) and second.positive
    assert (second.x, second.y) == brute_click(gt, empty, None, clicker.clicked & ~_at(gt.shape, second))[:2]


def _at(shape, c):
    m = np.zeros(shape, bool)
    m[c.y, c.x] = True
    return m


def test_ignore_band_is_never_clicked_nor_counted():
    gt = np.zeros((40, 40), bool)
    gt[14:26, 14:26] = True
    ignore = np.zeros_like(gt)
    ignore[8:32, 8:32] = True
    ignore[14:26, 14:26] = False          # a 6-pixel band around the object
    pred = gt | ignore                    # everything in the band predicted: would be the largest FP
    pred[0:3, 0:3] = True                 # a small real FP elsewhere
    clicker = RobotClicker(gt, ignore)
    c = clicker.next_click(pred)
    assert not ignore[c.y, c.x]
    assert (c.x, c.y, c.positive) == (1, 1, False)
    assert iou(gt, gt | ignore, ignore) == 1.0   # the band is not counted either
    assert iou(gt, gt | ignore) < 0.5


class BandPredictor:
    """Predicts the object plus its ignore band whatever the clicks: the robot must never click the band."""

    def __init__(self, mask):
        self.mask = mask.astype(np.float32)

    def open(self, image):
        return self

    def add_click(self, x, y, positive):
        return self.mask


def test_ignore_band_never_clicked_over_a_whole_run():
    rng = np.random.default_rng(0)
    gt = np.zeros((48, 64), bool)
    gt[10:30, 15:40] = True
    ignore = np.zeros_like(gt)
    ignore[6:34, 11:44] = True
    ignore[gt] = False
    wrong = gt | ignore
    wrong[40:46, 50:60] = True
    sample = LoadedSample("band", rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), gt, ignore)
    r = run_instance(BandPredictor(wrong), sample, Protocol())
    assert len(r.clicks) == 20
    assert not any(ignore[y, x] for x, y, _ in r.clicks)
    assert all(v == pytest.approx(iou(gt, wrong, ignore)) for v in r.ious)


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_protocol_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(6, 18, size=2)
    gt = rng.random((h, w)) < 0.5
    pred = rng.random((h, w)) < 0.4
    ignore = (rng.random((h, w)) < 0.15) if seed % 2 else None
    clicker = RobotClicker(gt, ignore)
    clicked = np.zeros_like(gt)
    for _ in range(4):
        expected = brute_click(gt, pred, ignore, clicked)
        c = clicker.next_click(pred)
        assert c.as_tuple() == expected
        clicked[c.y, c.x] = True
        pred = pred.copy()
        pred[c.y, c.x] = c.positive  # let the "prediction" follow the click a little


def _blobs(rng, h, w, n):
    """A mask of n random rectangles and ellipses: shapes with interiors, like real objects."""
    m = np.zeros((h, w), np.uint8)
    for _ in range(n):
        y, x = rng.integers(0, h), rng.integers(0, w)
        a, b = rng.integers(2, max(3, h // 3)), rng.integers(2, max(3, w // 3))
        if rng.random() < 0.5:
            m[max(0, y - a):y + a, max(0, x - b):x + b] = 1
        else:
            cv2.ellipse(m, (int(x), int(y)), (int(b), int(a)), float(rng.integers(0, 180)), 0, 360, 1, -1)
    return m.astype(bool)


def test_training_robot_user_agrees_with_the_evaluation_one_on_random_masks():
    """The robot-user rule is written twice: training.data.click_simulation.next_clicks (cv2's exact distance
    transform, float32, batched, clicks as (y, x, sign) rows) and RobotClicker (scipy's EDT, float64,
    one mask). They must pick the same click; where they pick different pixels, those pixels must tie
    (equal distance) and the sign must agree. They differ on purpose only with nothing left to
    correct: training adds no click (a padding row), the evaluation clicks negative at (0, 0)
    (module docstring of training/evaluation/clicker.py, as in RITM)."""
    from scipy.ndimage import distance_transform_edt

    from training.data import next_clicks

    def dist(region, clicked):
        d = distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        d[clicked] = 0.0
        return d

    rng = np.random.default_rng(12)
    same = ties = done = 0
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(8, 72, size=2))
        gt = _blobs(rng, h, w, int(rng.integers(1, 4)))
        pred = _blobs(rng, h, w, int(rng.integers(0, 4))) if trial % 5 else gt.copy()
        ignore = (rng.random((h, w)) < 0.05) if trial % 3 == 0 else None
        valid = None if ignore is None else ~ignore
        robot = RobotClicker(gt, ignore)
        rows = []                                       # the training side's (y, x, sign) history
        for _ in range(5):
            clicks = np.array([rows], np.float32) if rows else None
            t = next_clicks(gt[None], pred[None], clicks, None if valid is None else valid[None])[0]
            e = robot.next_click(pred)
            if t[2] == 0:                               # nothing left to correct
                assert e.as_tuple() == (0, 0, False)
                done += 1
                break
            ty, tx, positive = int(t[0]), int(t[1]), bool(t[2] > 0)
            assert positive == e.positive
            if (ty, tx) == (e.y, e.x):
                same += 1
            else:                                       # a tie in exact arithmetic, split by rounding
                fn, fp = gt & ~pred, pred & ~gt
                region = fn if positive else fp
                if valid is not None:
                    region = region & valid
                clicked = robot.clicked.copy()
                clicked[e.y, e.x] = False
                d = dist(region, clicked)
                assert d[ty, tx] == pytest.approx(d[e.y, e.x], abs=1e-4)
                ties += 1
            rows.append((e.y, e.x, 1.0 if e.positive else -1.0))
            pred = pred.copy()
            pred[max(0, e.y - 2):e.y + 3, max(0, e.x - 2):e.x + 3] = e.positive   # follow the click
    assert same > 500 and done > 0, (same, ties, done)
