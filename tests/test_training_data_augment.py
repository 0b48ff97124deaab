"""Augmentation to the fixed crop, the torch Dataset and the DataLoader (determinism, workers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (AugmentConfig, ClickSegDataset, Mixture, augment, collate, color_jitter,
                           default_sources, make_loader)

TRAIN_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "train"
needs_data = pytest.mark.skipif(not TRAIN_ROOT.is_dir(), reason=f"training data not at {TRAIN_ROOT}")

NO_PHOTO = dict(flip_prob=0.0, jitter_prob=0.0)


def _scene(h, w, box):
    """An image whose red channel is 255 exactly on the object (so geometry can be checked)."""
    mask = np.zeros((h, w), bool)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = True
    image = np.full((h, w, 3), 60, np.uint8)
    image[..., 0] = np.where(mask, 255, 0)
    return image, mask


@pytest.mark.parametrize("hw,box", [((480, 640), (200, 260, 300, 380)),     # small object, downscale
                                    ((200, 150), (20, 60, 30, 90)),          # smaller image, downscale
                                    ((80, 60), (10, 40, 15, 45)),            # tiny image, upscale
                                    ((900, 1200), (100, 850, 50, 1150))])    # object larger than crop
def test_augment_shapes_object_kept_and_aligned(hw, box):
    image, mask = _scene(*hw, box)
    cfg = AugmentConfig(crop_size=128, **NO_PHOTO)
    for seed in range(20):
        a = augment(image, mask, np.random.default_rng(seed), cfg)
        assert a is not None
        assert a.image.shape == (128, 128, 3) and a.image.dtype == np.uint8
        assert a.mask.shape == a.valid.shape == (128, 128) and a.mask.dtype == bool
        assert a.mask.any() and not (a.mask & ~a.valid).any()
        assert (a.image[~a.valid] == 0).all()
        # image and mask went through the same geometry
        red = a.image[..., 0] > 127
        iou = (red & a.mask).sum() / (red | a.mask).sum()
        assert iou > 0.9
        # objects that fit in the crop at this scale are entirely inside it
        bh, bw = (box[1] - box[0]) * a.scale, (box[3] - box[2]) * a.scale
        expected = (box[1] - box[0]) * (box[3] - box[2]) * a.scale ** 2
        if bh <= 126 and bw <= 126:
            assert abs(a.mask.sum() - expected) <= 0.15 * expected + 4 * (bh + bw)
            # and where the scale and window say it is (both resize paths, and the valid region)
            H, W = hw
            sy, sx = round(H * a.scale) / H, round(W * a.scale) / W
            oy, ox = a.window
            ys, xs = np.nonzero(a.mask)
            assert abs(ys.min() - (box[0] * sy - oy)) <= 1.5 and abs(ys.max() + 1 - (box[1] * sy - oy)) <= 1.5
            assert abs(xs.min() - (box[2] * sx - ox)) <= 1.5 and abs(xs.max() + 1 - (box[3] * sx - ox)) <= 1.5
            vy, vx = np.nonzero(a.valid.any(1))[0], np.nonzero(a.valid.any(0))[0]
            assert vy[0] == max(0, -oy) and vx[0] == max(0, -ox)
        else:
            assert a.mask.sum() >= 0.3 * min(expected, 128 * 128)


def test_augment_scale_range_and_base():
    image, mask = _scene(400, 300, (100, 200, 100, 200))
    scales = [augment(image, mask, np.random.default_rng(s), AugmentConfig(crop_size=200, **NO_PHOTO)).scale
              for s in range(30)]
    base = 200 / 400
    assert min(scales) >= 0.75 * base - 1e-9 and max(scales) <= 1.4 * base + 1e-9
    assert max(scales) - min(scales) > 0.3 * base
    obj = augment(image, mask, np.random.default_rng(0),
                  AugmentConfig(crop_size=200, base="object", scale_range=(1, 1), object_fill=0.5))
    assert obj.scale == pytest.approx(0.5 * 200 / 100)


def test_flip_mirrors_the_same_crop():
    image, mask = _scene(300, 300, (50, 120, 40, 200))
    image[..., 1] = np.arange(300, dtype=np.uint8)[None, :]
    a = augment(image, mask, np.random.default_rng(5), AugmentConfig(crop_size=160, flip_prob=0.0, jitter_prob=0))
    b = augment(image, mask, np.random.default_rng(5), AugmentConfig(crop_size=160, flip_prob=1.0, jitter_prob=0))
    assert b.flipped and not a.flipped
    assert np.array_equal(a.image[:, ::-1], b.image) and np.array_equal(a.mask[:, ::-1], b.mask)


def test_color_jitter_identity_and_effect():
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ident = AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0)
    assert np.abs(color_jitter(img, np.random.default_rng(0), ident).astype(int) - img).max() <= 1
    bright = AugmentConfig(brightness=0.5, contrast=0, saturation=0, hue=0)
    outs = [color_jitter(img, np.random.default_rng(s), bright).mean() for s in range(10)]
    assert max(outs) - min(outs) > 10
    # a grey image stays grey under brightness/contrast/saturation (no colour cast)
    grey = np.repeat(img[..., :1], 3, axis=2)
    g = color_jitter(grey, np.random.default_rng(1), AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.9, hue=0))
    assert np.abs(g.astype(int) - g[..., :1]).max() <= 1 and np.abs(g.astype(int) - grey).max() > 3



# --------------------------------------------------------------------------------------------------
# Dataset / DataLoader on the real training data
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixture():
    if not TRAIN_ROOT.is_dir():
        pytest.skip(f"training data not at {TRAIN_ROOT}")
    return Mixture(default_sources(TRAIN_ROOT), seed=0)


@needs_data
def test_dataset_samples(mixture):
    ds = ClickSegDataset(mixture, "train", length=24, seed=0)
    names = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 384, 384) and s["image"].dtype == torch.float32
        assert 0 <= s["image"].min() and s["image"].max() <= 1 and s["image"].max() > 0.2
        assert s["mask"].shape == s["valid"].shape == (1, 384, 384)
        assert set(s["mask"].unique().tolist()) == {0.0, 1.0}
        assert (s["mask"] <= s["valid"]).all()
        c = s["clicks"]
        assert c.shape == (6, 3) and c[0, 2] == 1
        for y, x, sg in c.tolist():
            if sg > 0:
                assert s["mask"][0, int(y), int(x)] == 1
            elif sg < 0:
                assert s["mask"][0, int(y), int(x)] == 0 and s["valid"][0, int(y), int(x)] == 1
        src_name, item_id = s["id"].split("/", 1)
        src = mixture.sources[int(s["source"])]
        assert src.name == src_name
        key = next(it.split_key for it in src.items if it.id == item_id)
        assert mixture.split_of(key) == "train"
        names.add(src_name)
    # 24 weighted draws reach most of the five default sources (bsds, sod, coco, coco128, weizmann)
    assert names <= {src.name for src in mixture.sources} and len(names) >= 4
    assert torch.equal(ds[3]["image"], ds[3]["image"])  # same (seed, epoch, index) -> same sample
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["image"], ClickSegDataset(mixture, "train", length=24, seed=0)[3]["image"])


@needs_data
def test_val_dataset_only_val_images_and_deterministic(mixture):
    val = ClickSegDataset(mixture, "val", seed=0)
    assert len(val) == sum(len(i) for i in mixture.indices("val"))
    val_keys = mixture.split_keys("val")
    for i in range(0, len(val), max(1, len(val) // 8)):
        s = val[i]
        src_name, item_id = s["id"].split("/", 1)
        src = mixture.sources[int(s["source"])]
        key = next(it.split_key for it in src.items if it.id == item_id)
        assert key in val_keys
        assert torch.equal(s["image"], ClickSegDataset(mixture, "val", seed=0)[i]["image"])


@needs_data
def test_loader_deterministic_across_worker_counts(mixture):
    ds = ClickSegDataset(mixture, "train", length=8, seed=3)
    a = list(make_loader(ds, batch_size=4, num_workers=2, epoch=2))
    b = list(make_loader(ds, batch_size=4, num_workers=0, epoch=2))
    c = list(make_loader(ds, batch_size=4, num_workers=0, epoch=3))
    assert len(a) == 2
    for x, y in zip(a, b):
        assert x["image"].shape == (4, 3, 384, 384) and x["clicks"].shape == (4, 6, 3)
        assert x["id"] == y["id"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["clicks"], y["clicks"])
    assert [x["id"] for x in a] != [x["id"] for x in c]


def test_collate_pads_clicks():
    def sample(k):
        return {"image": torch.zeros(3, 8, 8), "mask": torch.zeros(1, 8, 8), "valid": torch.ones(1, 8, 8),
                "clicks": torch.tensor([[1.0, 2.0, 1.0]] * k), "source": torch.tensor(0),
                "index": torch.tensor(k), "id": f"s/{k}"}
    batch = collate([sample(1), sample(3)])
    assert batch["clicks"].shape == (2, 3, 3)
    assert batch["clicks"][0, 1:].tolist() == [[-1, -1, 0], [-1, -1, 0]]
    assert batch["id"] == ["s/1", "s/3"]
