"""Click simulation: initial clicks, robot-user error clicks, focus-view boxes and crops."""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import torch

from training.data import (InitialClickConfig, add_next_clicks, crop_resize, focus_view, last_clicks,
                           next_clicks, num_clicks, padded_edt, random_clicks, remap_clicks,
                           sample_focus_boxes, sample_initial_clicks)


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def _blobs(seed, h=96, w=128):
    rng = np.random.default_rng(seed)
    return ndi.binary_opening(ndi.gaussian_filter(rng.random((h, w)), 4) > 0.5, iterations=2)


def _reference_robot(gt, pred, clicked=()):
    """The protocol's robot user written out with scipy, as an independent reference."""
    fn, fp = gt & ~pred, pred & ~gt
    fn_dt = ndi.distance_transform_edt(np.pad(fn, 1))[1:-1, 1:-1]
    fp_dt = ndi.distance_transform_edt(np.pad(fp, 1))[1:-1, 1:-1]
    for y, x in clicked:
        fn_dt[y, x] = fp_dt[y, x] = 0
    if max(fn_dt.max(), fp_dt.max()) == 0:
        return (-1, -1, 0)
    if fn_dt.max() > fp_dt.max():
        y, x = np.unravel_index(np.argmax(fn_dt), gt.shape)
        return (y, x, 1)
    y, x = np.unravel_index(np.argmax(fp_dt), gt.shape)
    return (y, x, -1)


def test_padded_edt_matches_scipy():
    for seed in range(5):
        m = _blobs(seed)
        ref = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        assert np.abs(padded_edt(m) - ref).max() < 1e-4


# --------------------------------------------------------------------------------------------------
# initial clicks
# --------------------------------------------------------------------------------------------------

def test_first_click_inside_and_centre_biased():
    mask = _disc(200, 200, 100, 100, 50)
    cfg = InitialClickConfig(p_extra_pos=0.0, p_neg=0.0)
    radii = []
    for seed in range(200):
        c = sample_initial_clicks(mask, np.random.default_rng(seed), cfg=cfg)
        assert c.shape == (cfg.max_clicks, 3) and c.dtype == np.float32
        assert c[0, 2] == 1 and (c[1:, 2] == 0).all() and (c[1:, :2] == -1).all()
        y, x = int(c[0, 0]), int(c[0, 1])
        assert mask[y, x]
        radii.append(np.hypot(y - 100, x - 100))
    # P ~ EDT^2 on a disc gives mean radius 0.4 R; uniform would give 2/3 R
    assert np.mean(radii) < 0.5 * 50


def test_initial_clicks_on_random_shapes_respect_band_cap_and_valid():
    cfg = InitialClickConfig(max_clicks=5, p_extra_pos=1.0, p_neg=1.0)
    saw_neg = saw_extra = False
    for seed in range(30):
        mask = _blobs(seed)
        if not mask.any():
            continue
        valid = np.ones_like(mask)
        valid[:, 100:] = False
        c = sample_initial_clicks(mask, np.random.default_rng(seed), valid, cfg)
        real = c[c[:, 2] != 0]
        assert 1 <= len(real) <= 5
        assert real[0, 2] == 1
        inside = mask & valid
        bg_dist = ndi.distance_transform_edt(~mask)
        band_max = max(cfg.neg_band_floor, cfg.neg_band_frac * np.sqrt(inside.sum()))
        for y, x, s in real.astype(int):
            assert valid[y, x]
            if s > 0:
                assert inside[y, x]
            else:
                saw_neg = True
                assert not mask[y, x]
                assert cfg.neg_band_min - 1e-3 <= bg_dist[y, x] <= band_max + 1e-3
        saw_extra |= (real[:, 2] > 0).sum() > 1
        pts = real[:, :2]
        d = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1))
        assert (d[~np.eye(len(pts), dtype=bool)] >= cfg.min_spacing).all()
    assert saw_neg and saw_extra


def test_initial_clicks_deterministic_with_seed():
    mask = _blobs(3)
    a = sample_initial_clicks(mask, np.random.default_rng(7))
    b = sample_initial_clicks(mask, np.random.default_rng(7))
    assert np.array_equal(a, b)


def test_initial_clicks_empty_mask_is_all_padding():
    c = sample_initial_clicks(np.zeros((20, 20), bool), np.random.default_rng(0))
    assert (c[:, 2] == 0).all()


# --------------------------------------------------------------------------------------------------
# robot-user error clicks
# --------------------------------------------------------------------------------------------------

def test_error_click_goes_to_farthest_fn_point():
    gt = np.zeros((1, 100, 100), bool)
    gt[0, 10:90, 10:90] = True
    pred = gt.copy()
    pred[0, 20:60, 30:50] = False          # FN hole 40 x 20, centre rows 39/40, cols 39/40
    pred[0, 0:4, 0:4] = True               # small FP corner
    c = next_clicks(gt, pred)
    assert c.shape == (1, 3) and c[0, 2] == 1
    assert tuple(c[0].astype(int)) == _reference_robot(gt[0], pred[0])
    y, x = int(c[0, 0]), int(c[0, 1])
    assert 20 <= y < 60 and 30 <= x < 50
    assert padded_edt(gt[0] & ~pred[0])[y, x] == padded_edt(gt[0] & ~pred[0]).max() == 10


def test_negative_click_when_fp_dominates():
    gt = np.zeros((1, 100, 100), bool)
    gt[0, 40:60, 40:60] = True
    pred = gt.copy()
    pred[0, 45:50, 45:50] = False          # small FN
    pred[0, 60:95, 5:95] = True            # big FP slab below the object
    c = next_clicks(gt, pred)
    assert c[0, 2] == -1
    y, x = c[0, :2].astype(int)
    assert pred[0, y, x] and not gt[0, y, x]
    assert tuple(c[0].astype(int)) == _reference_robot(gt[0], pred[0])


def test_first_click_from_empty_prediction_and_tie_rule():
    gt = _blobs(1)[None]
    c = next_clicks(gt, np.zeros_like(gt))
    assert tuple(c[0].astype(int)) == _reference_robot(gt[0], np.zeros_like(gt[0]))
    # equal FN and FP maxima -> negative (the rule is "FN > FP" for positive)
    g = np.zeros((1, 30, 60), bool)
    g[0, 5:10, 5:10] = True
    p = np.zeros_like(g)
    p[0, 5:10, 40:45] = True
    assert next_clicks(g, p)[0, 2] == -1


def test_robot_matches_reference_on_random_shapes():
    gts = np.stack([_blobs(s) for s in range(8)])
    preds = np.stack([_blobs(100 + s) for s in range(8)])
    got = next_clicks(gts, preds)
    for b in range(8):
        assert tuple(got[b].astype(int)) == _reference_robot(gts[b], preds[b])


def test_perfect_prediction_gives_no_click_and_clicked_pixels_are_excluded():
    gt = np.zeros((2, 50, 50), bool)
    gt[:, 10:41, 10:41] = True
    pred = np.zeros_like(gt)
    pred[0] = gt[0]
    c = next_clicks(gt, pred)
    assert tuple(c[0]) == (-1, -1, 0) and c[1, 2] == 1
    clicks = c[:, None]
    c2 = next_clicks(gt, pred, clicks)
    assert tuple(c2[0]) == (-1, -1, 0)
    assert tuple(c2[1, :2]) != tuple(c[1, :2])
    assert tuple(c2[1].astype(int)) == _reference_robot(gt[1], pred[1], [tuple(c[1, :2].astype(int))])
    assert add_next_clicks(clicks, gt, pred).shape == (2, 2, 3)


def test_valid_mask_ignores_errors_in_padding():
    gt = np.zeros((1, 60, 60), bool)
    gt[0, 5:15, 5:15] = True
    pred = np.zeros_like(gt)
    pred[0, 5:15, 5:15] = True
    pred[0, 30:60, 30:60] = True           # big FP, but in padding
    valid = np.zeros_like(gt)
    valid[0, :30, :30] = True
    assert next_clicks(gt, pred)[0, 2] == -1
    assert next_clicks(gt, pred, valid=valid)[0, 2] == 0


def test_torch_inputs_and_channel_dim():
    gt = torch.from_numpy(_blobs(2))[None, None].float()
    pred = torch.zeros_like(gt)
    clicks = torch.full((1, 2, 3), -1.0)
    clicks[..., 2] = 0
    c = next_clicks(gt, pred, clicks)
    assert isinstance(c, torch.Tensor) and c.dtype == torch.float32
    assert tuple(c[0].int().tolist()) == _reference_robot(_blobs(2), np.zeros_like(_blobs(2)))
    grown = add_next_clicks(clicks, gt, pred)
    assert isinstance(grown, torch.Tensor) and grown.shape == (1, 3, 3)
    assert torch.equal(last_clicks(grown)[0], c[0]) and int(num_clicks(grown)[0]) == 1


def test_inner_ratio_randomises_within_the_deep_part():
    gt = np.zeros((4, 80, 80), bool)
    gt[:, 10:70, 10:70] = True
    pred = np.zeros_like(gt)
    c1 = next_clicks(gt, pred, rng=np.random.default_rng(0), inner_ratio=0.5)
    c2 = next_clicks(gt, pred, rng=np.random.default_rng(0), inner_ratio=0.5, num_threads=2)
    assert np.array_equal(c1, c2)
    dt = padded_edt(gt[0])
    assert all(dt[int(y), int(x)] >= 0.5 * dt.max() for y, x, _ in c1)
    assert len({(int(y), int(x)) for y, x, _ in c1}) > 1


def test_last_and_random_clicks():
    clicks = np.array([[[1, 2, 1], [3, 4, -1], [-1, -1, 0]],
                       [[5, 6, 1], [-1, -1, 0], [7, 8, 1]],
                       [[-1, -1, 0], [-1, -1, 0], [-1, -1, 0]]], np.float32)
    assert last_clicks(clicks).tolist() == [[3, 4, -1], [7, 8, 1], [-1, -1, 0]]
    r = random_clicks(clicks, np.random.default_rng(0))
    assert r[0].tolist() in ([1, 2, 1], [3, 4, -1]) and r[2].tolist() == [-1, -1, 0]


# --------------------------------------------------------------------------------------------------
# focus view
# --------------------------------------------------------------------------------------------------

def test_focus_boxes_contain_click_and_fit():
    rng = np.random.default_rng(0)
    pts = np.stack([rng.integers(0, 384, 64), rng.integers(0, 384, 64), np.ones(64)], 1).astype(np.float32)
    boxes = sample_focus_boxes(pts, 384, 384, rng)
    y0, x0, y1, x1 = boxes.T
    side = y1 - y0
    assert np.array_equal(side, x1 - x0)
    assert (side >= round(0.2 * 384)).all() and (side <= round(0.6 * 384)).all()
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y1 <= 384).all() and (x1 <= 384).all()
    assert ((pts[:, 0] >= y0) & (pts[:, 0] < y1) & (pts[:, 1] >= x0) & (pts[:, 1] < x1)).all()
    # with a valid region the box stays inside its bounding box
    valid = np.zeros((64, 384, 384), bool)
    valid[:, 100:300, :] = True
    pts[:, 0] = np.clip(pts[:, 0], 100, 299)
    boxes = sample_focus_boxes(pts, 384, 384, rng, valid=valid)
    assert (boxes[:, 0] >= 100).all() and (boxes[:, 2] <= 300).all()
    assert (boxes[:, 2] - boxes[:, 0] <= round(0.6 * 200)).all()


def test_crop_resize_identity_and_click_remap():
    x = torch.arange(2 * 3 * 50 * 60, dtype=torch.float32).reshape(2, 3, 50, 60)
    boxes = np.array([[10, 20, 30, 40], [0, 0, 20, 20]], np.float32)
    out = crop_resize(x, boxes, out_size=20)
    assert torch.allclose(out[0], x[0, :, 10:30, 20:40]) and torch.allclose(out[1], x[1, :, :20, :20])
    clicks = np.array([[[15, 25, 1], [5, 5, -1]], [[19, 19, -1], [-1, -1, 0]]], np.float32)
    rc = remap_clicks(clicks, boxes, 20)
    assert rc.tolist() == [[[5, 5, 1], [-1, -1, 0]], [[19, 19, -1], [-1, -1, 0]]]


def test_focus_view_upscaled_click_lands_on_its_marker():
    rng = np.random.default_rng(3)
    B, S = 6, 96
    clicks = np.stack([rng.integers(0, S, B), rng.integers(0, S, B), np.ones(B)], 1).astype(np.float32)[:, None]
    marker = torch.zeros(B, 1, S, S)
    for b in range(B):
        marker[b, 0, int(clicks[b, 0, 0]), int(clicks[b, 0, 1])] = 1
    image = torch.rand(B, 3, S, S)
    boxes = sample_focus_boxes(clicks[:, 0], S, S, rng, size_range=(0.2, 0.6))
    fv = focus_view(boxes, image, marker, prev=marker, clicks=torch.from_numpy(clicks), out_size=S,
                    valid=torch.ones(B, 1, S, S))
    assert fv["image"].shape == (B, 3, S, S) and fv["mask"].shape == (B, 1, S, S)
    assert fv["valid"].min() == 1
    assert isinstance(fv["clicks"], torch.Tensor)
    near = crop_resize(marker, boxes, S, mode="nearest")
    for b in range(B):
        y, x, s = fv["clicks"][b, 0].tolist()
        assert s == 1 and near[b, 0, int(y), int(x)] == 1
        # the upscaled marker of mask/prev covers the remapped click too
        assert fv["mask"][b, 0, int(y), int(x)] == 1 and fv["prev"][b, 0, int(y), int(x)] == 1


def test_sampled_boxes_surround_the_object_and_follow_a_crop():
    import numpy as np
    from training.data import NO_BOX, remap_boxes, sample_boxes

    gt = np.zeros((3, 1, 64, 64), bool)
    gt[0, 0, 10:30, 20:50] = True
    gt[1, 0, 40:64, 0:10] = True
    boxes = sample_boxes(gt, np.random.default_rng(0), noise=0.0)
    assert boxes[0].tolist() == [10, 20, 30, 50] and boxes[1].tolist() == [40, 0, 64, 10]
    assert boxes[2].tolist() == list(NO_BOX)                      # nothing to box
    noisy = sample_boxes(gt, np.random.default_rng(1), noise=0.1)
    assert np.all(np.abs(noisy[:2] - boxes[:2]) <= 0.2 * 30 + 1e-4) and not np.array_equal(noisy, boxes)
    # crop (0, 16, 32, 48) of the first sample, resized x2: the box is clipped to the crop
    crop = np.array([[0, 16, 32, 48], [0, 0, 32, 32], [0, 0, 64, 64]], np.float32)
    out = remap_boxes(boxes, crop, 64)
    assert out[0].tolist() == [20, 8, 60, 64]
    assert out[1].tolist() == list(NO_BOX)                        # the box misses its crop
    assert out[2].tolist() == list(NO_BOX)


def test_box_maps_mark_the_inside():
    import torch
    from model.clicks import box_maps

    m = box_maps(torch.tensor([[2.0, 3.0, 5.0, 7.0], [-1, -1, -1, -1]]), 2, 8, 10)
    assert m.shape == (2, 1, 8, 10) and m[1].sum() == 0
    assert m[0, 0, 2:5, 3:7].all() and m[0].sum() == 12
