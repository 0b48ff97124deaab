"""Training data sources: the shared training sets, user-format loaders, benchmark refusal, split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from training.data import (AreaFilter, BenchmarkDataError, BSDSSource, COCOSource, LabelStudioSource,
                           Mixture, SBDSource, SODSource, assert_not_benchmark, default_data_root,
                           default_sources, ls_url_basename, read_bsds_segmentations, source_from_spec)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
TRAIN_ROOT = (SHARED / "train").resolve()   # the sources resolve symlinks; so must the expectations
needs_data = pytest.mark.skipif(not TRAIN_ROOT.is_dir(), reason=f"training data not at {TRAIN_ROOT}")


@pytest.fixture(scope="module")
def sources():
    return {s.name: s for s in default_sources(TRAIN_ROOT)}


# --------------------------------------------------------------------------------------------------
# shared training data
# --------------------------------------------------------------------------------------------------

@needs_data
def test_default_root_is_shared_train(monkeypatch):
    monkeypatch.delenv("SIMCLICK_TRAIN_ROOT", raising=False)
    assert default_data_root() == TRAIN_ROOT.resolve()


def test_default_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SIMCLICK_TRAIN_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path.resolve()
    monkeypatch.setenv("SIMCLICK_TRAIN_ROOT", str(tmp_path / "DAVIS"))
    with pytest.raises(BenchmarkDataError):
        default_data_root()


@needs_data
def test_bsds_regions(sources):
    src = sources["bsds"]
    assert isinstance(src, BSDSSource) and len(src) == 401
    rng = np.random.default_rng(0)
    f = src.area_filter
    for i in rng.choice(len(src), 12, replace=False):
        inst = src.load(int(i), rng)
        assert inst is not None
        H, W = inst.mask.shape
        assert inst.image.shape == (H, W, 3) and inst.image.dtype == np.uint8
        assert inst.mask.dtype == bool
        area = int(inst.mask.sum())
        assert area >= f.min_px and area >= f.min_frac * H * W and area <= f.max_frac * H * W
        # the mask is a union of whole regions of one annotator's map
        segs = read_bsds_segmentations(src.items[int(i)].payload[1])
        assert any(np.array_equal(inst.mask, np.isin(s, np.unique(s[inst.mask]))) for s in segs)
        assert inst.split_key == f"bsds:{inst.item_id}"


@needs_data
def test_bsds_filter_rejects_everything_when_impossible():
    src = BSDSSource(TRAIN_ROOT / "BSDS500", area_filter=AreaFilter(min_px=10 ** 9))
    assert src.load(0, np.random.default_rng(0)) is None


@needs_data
def test_sod_masks(sources):
    src = sources["sod"]
    assert isinstance(src, SODSource) and 150 < len(src) <= 201
    assert src.dropped == 201 - len(src)
    rng = np.random.default_rng(1)
    for i in rng.choice(len(src), 8, replace=False):
        inst = src.load(int(i), rng)
        H, W = inst.mask.shape
        assert inst.image.shape == (H, W, 3)
        assert 0.01 * H * W <= inst.mask.sum() <= 0.8 * H * W
        img_path, _ = src.items[int(i)].payload
        assert img_path.parent.name == "images" and img_path.parent.parent.name == "BSDS500"
        assert img_path.stem == inst.item_id


@needs_data
def test_coco_subsets(sources):
    src = sources["coco"]
    assert isinstance(src, COCOSource)
    assert 1000 < len(src) < 3300
    st = src.stats
    assert st["crowd"] > 0 and st["small"] > 0 and st["no_image"] > 0 and st["duplicate"] > 0
    subsets = {p.relative_to(TRAIN_ROOT / "COCO").parts[0] for p, *_ in (it.payload for it in src.items)}
    assert subsets == {"Obmutescence+COCO-MINI", "enginbozaba+tiny_coco", "zzowenzz+COCO_Tiny"}
    keys = [(it.payload[0].name, it.id.split("/")[1]) for it in src.items]
    assert len(set(keys)) == len(keys)
    rng = np.random.default_rng(2)
    for i in rng.choice(len(src), 10, replace=False):
        inst = src.load(int(i), rng)
        path, h, w, seg, area = src.items[int(i)].payload
        assert inst.image.shape == (h, w, 3)
        assert area >= 1000
        # decoded area agrees with the annotation's area (polygon rasterisation differs slightly)
        assert abs(inst.mask.sum() - area) <= 0.1 * area + 50


@needs_data
def test_coco_image_dirs_for_each_layout():
    root = TRAIN_ROOT / "COCO"
    got = {}
    for js in sorted(root.glob("*/annotations/instances_*.json")):
        src = COCOSource([js])
        got[(js.parts[-3], js.stem)] = {it.payload[0].parent.relative_to(js.parent.parent).as_posix()
                                        for it in src.items}
    assert got[("enginbozaba+tiny_coco", "instances_train2017")] == {"images/train2017"}
    assert got[("Obmutescence+COCO-MINI", "instances_val2017")] == {"val2017"}
    assert got[("zzowenzz+COCO_Tiny", "instances_train2017")] == {"train2017"}


@needs_data
def test_training_images_are_not_benchmark_images(sources):
    """A leak check by file name only: no BSDS500 training image is a Berkeley benchmark image."""
    berkeley = {p.stem for p in (SHARED / "Berkeley" / "images").glob("*.jpg")}
    assert berkeley, "Berkeley benchmark listing is empty"
    train_ids = {it.id for it in sources["bsds"].items} | {it.id for it in sources["sod"].items}
    assert not train_ids & berkeley


# --------------------------------------------------------------------------------------------------
# benchmark refusal
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["GrabCut", "Berkeley", "DAVIS", "davis"])
def test_refuses_benchmark_paths(name, tmp_path):
    with pytest.raises(BenchmarkDataError):
        assert_not_benchmark(SHARED / name / "images" / "x.jpg")
    bench = tmp_path / name / "images"
    bench.mkdir(parents=True)
    with pytest.raises(BenchmarkDataError):
        BSDSSource(tmp_path / name)
    with pytest.raises(BenchmarkDataError):
        SBDSource(tmp_path / name, split=None)
    with pytest.raises(BenchmarkDataError):
        source_from_spec({"type": "coco", "root": str(tmp_path / name)})
    # a symlink that hides the benchmark folder name is resolved and refused too
    link = tmp_path / "innocent"
    link.symlink_to(bench)
    with pytest.raises(BenchmarkDataError):
        assert_not_benchmark(link / "x.jpg")
    assert assert_not_benchmark(tmp_path / "BSDS500" / "x.jpg")  # allowed


def test_coco_json_pointing_into_benchmark_is_refused(tmp_path):
    bench = tmp_path / "Berkeley" / "images"
    bench.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bench / "a.jpg")
    ann_dir = tmp_path / "user" / "annotations"
    ann_dir.mkdir(parents=True)
    js = ann_dir / "instances_x.json"
    js.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 40}],
                              "annotations": []}))
    with pytest.raises(BenchmarkDataError):
        COCOSource([(js, bench)])


# --------------------------------------------------------------------------------------------------
# user formats on generated files
# --------------------------------------------------------------------------------------------------

def _rand_image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_sbd_loader(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "inst").mkdir()
    insts = {}
    for k, sid in enumerate(["2008_000001", "2008_000002", "2008_000003"]):
        Image.fromarray(_rand_image(60, 80, k)).save(tmp_path / "img" / f"{sid}.jpg")
        seg = np.zeros((60, 80), np.uint8)
        seg[5:35, 5:35] = 1         # 900 px
        seg[40:55, 50:75] = 2       # 375 px: below min_px=400, never drawn
        seg[10:40, 45:70] = 3       # 750 px
        insts[sid] = seg
        scipy.io.savemat(tmp_path / "inst" / f"{sid}.mat",
                         {"GTinst": {"Segmentation": seg, "Categories": np.array([[15], [8], [12]]),
                                     "Boundaries": np.zeros((3, 1), object)}})
    (tmp_path / "train.txt").write_text("2008_000001\n2008_000003\n")
    (tmp_path / "val.txt").write_text("2008_000002\n")
    src = SBDSource(tmp_path, split="train")
    assert [it.id for it in src.items] == ["2008_000001", "2008_000003"]
    assert [it.id for it in SBDSource(tmp_path, split="val").items] == ["2008_000002"]
    assert len(SBDSource(tmp_path, split=None)) == 3
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        inst = src.load(1, rng)
        assert inst.image.shape == (60, 80, 3)
        label = int(np.unique(insts["2008_000003"][inst.mask])[0])
        assert np.array_equal(inst.mask, insts["2008_000003"] == label)
        seen.add(label)
    assert seen == {1, 3}
    assert src.items[0].split_key == "sbd:2008_000001"


def test_coco_format_loader(tmp_path):
    from pycocotools import mask as mask_utils

    img_dir = tmp_path / "photos"
    img_dir.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(_rand_image(100, 120, 3)).save(img_dir / name)
    blob = np.zeros((100, 120), np.uint8)
    blob[20:70, 30:100] = 1
    blob[40:50, 50:60] = 0
    rle_c = mask_utils.encode(np.asfortranarray(blob))
    rle_c = {"size": rle_c["size"], "counts": rle_c["counts"].decode("ascii")}
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = blob.flatten(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    counts = np.diff(np.concatenate([[0], change])).tolist()
    counts = [c for c in counts if c] if flat[0] == 0 else [0] + counts
    rle_u = {"size": [100, 120], "counts": counts}
    anns = [
        {"id": 1, "image_id": 1, "iscrowd": 0, "area": 2000.0, "segmentation": [[10, 10, 60, 10, 60, 50, 10, 50]]},
        {"id": 2, "image_id": 1, "iscrowd": 0, "area": float(blob.sum()), "segmentation": rle_c},
        {"id": 3, "image_id": 2, "iscrowd": 0, "area": float(blob.sum()), "segmentation": rle_u},
        {"id": 4, "image_id": 2, "iscrowd": 1, "area": 5000.0, "segmentation": rle_c},
        {"id": 5, "image_id": 2, "iscrowd": 0, "area": 300.0, "segmentation": [[0, 0, 20, 0, 20, 15, 0, 15]]},
        {"id": 6, "image_id": 3, "iscrowd": 0, "area": 3000.0, "segmentation": [[0, 0, 60, 0, 60, 50, 0, 50]]},
    ]
    js = tmp_path / "instances_custom.json"
    js.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 100, "width": 120},
                   {"id": 2, "file_name": "b.jpg", "height": 100, "width": 120},
                   {"id": 3, "file_name": "missing.jpg", "height": 100, "width": 120}],
        "annotations": anns}))
    src = source_from_spec({"type": "coco", "annotations": [[str(js), str(img_dir)]], "name": "mine",
                            "namespace": "mine"})
    assert src.name == "mine"
    assert [it.id for it in src.items] == ["a/1", "a/2", "b/3"]
    assert src.stats["crowd"] == 1 and src.stats["small"] == 1 and src.stats["no_image"] == 1
    rng = np.random.default_rng(0)
    poly = src.load(0, rng).mask
    ys, xs = np.nonzero(poly)
    # pycocotools fills a polygon with corners (10, 10)-(60, 50) as pixels 10..59 x 10..49
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 49, 10, 59) and poly.sum() == 2000
    assert np.array_equal(src.load(1, rng).mask, blob.astype(bool))
    assert np.array_equal(src.load(2, rng).mask, blob.astype(bool))
    assert src.items[2].split_key == "mine:b"


def test_label_studio_export_round_trip(tmp_path):
    from label_studio_sdk.converter.brush import mask2rle

    h, w = 50, 70
    img_dir = tmp_path / "media"
    img_dir.mkdir()
    Image.fromarray(_rand_image(h, w, 5)).save(img_dir / "cat.png")
    Image.fromarray(_rand_image(h, w, 6)).save(img_dir / "dog.png")
    cat = np.zeros((h, w), bool)
    cat[10:40, 5:45] = True
    cat[20:25, 15:20] = False
    dog = np.zeros((h, w), bool)
    dog[5:30, 30:65] = True

    def brush(mask, label, rid):
        return {"id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "image",
                "original_width": w, "original_height": h, "image_rotation": 0,
                "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255),
                          "brushlabels": [label]}}

    tasks = [
        {"id": 1, "data": {"image": "/data/upload/3/ab12cd34-cat.png"},
         "annotations": [
             {"id": 11, "was_cancelled": False, "result": [brush(cat, "Cat", "r1"), brush(dog, "Dog", "r2"),
                                                           {"type": "rectanglelabels", "value": {}}]},
             {"id": 12, "was_cancelled": True, "result": [brush(dog, "Cat", "r3")]}]},
        {"id": 2, "data": {"image": "/data/local-files/?d=pets%2Fdog.png"},
         "annotations": [{"id": 21, "result": [brush(dog, "Cat", "r4")]}]},
        {"id": 3, "data": {"image": "/data/upload/3/ffffffff-absent.png"},
         "annotations": [{"id": 31, "result": [brush(cat, "Cat", "r5")]}]},
    ]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    src = LabelStudioSource(export, image_dir=img_dir)
    assert [it.id for it in src.items] == ["1/11/0", "1/11/1", "2/21/0"]
    assert src.stats["no_image"] == 1
    rng = np.random.default_rng(0)
    got = [src.load(i, rng) for i in range(3)]
    assert np.array_equal(got[0].mask, cat) and np.array_equal(got[1].mask, dog)
    assert np.array_equal(got[2].mask, dog)
    assert np.array_equal(got[2].image, np.asarray(Image.open(img_dir / "dog.png")))
    assert got[0].split_key == got[1].split_key == "ls:cat"
    only_dog = LabelStudioSource(tasks, image_dir=img_dir, labels=["Dog"])
    assert [it.id for it in only_dog.items] == ["1/11/1"]
    resolved = LabelStudioSource(tasks, resolver=lambda url: img_dir / "cat.png" if "cat" in url else None)
    assert [it.id for it in resolved.items] == ["1/11/0", "1/11/1"]


def test_ls_url_basename():
    assert ls_url_basename("/data/upload/3/ab12cd34-cat.jpg") == "ab12cd34-cat.jpg"
    assert ls_url_basename("/data/local-files/?d=photos/my%20cat.jpg") == "my cat.jpg"
    assert ls_url_basename("s3://bucket/a/cat.jpg") == "cat.jpg"
    assert ls_url_basename("https://host/x/cat.jpg?token=abc") == "cat.jpg"


# --------------------------------------------------------------------------------------------------
# mixture and split
# --------------------------------------------------------------------------------------------------

@needs_data
def test_split_disjoint_exact_and_stable(sources):
    srcs = list(sources.values())
    mix = Mixture(srcs, val_fraction=0.05, seed=0)
    train, val = mix.split_keys("train"), mix.split_keys("val")
    assert train and val and not train & val
    n_bsds = len({it.split_key for it in sources["bsds"].items})
    n_coco = len({it.split_key for it in sources["coco"].items})
    assert sum(k.startswith("bsds:") for k in val) == round(0.05 * n_bsds)
    assert sum(k.startswith("coco:") for k in val) == round(0.05 * n_coco)
    # SOD masks live on BSDS images: an image is in the same split for both sources
    for s, idx in enumerate(mix.indices("val")):
        for i in idx:
            assert mix.split_of(srcs[s].items[i].split_key) == "val"
    sod_train = {srcs[1].items[i].split_key for i in mix.indices("train")[1]}
    assert not sod_train & val
    # deterministic; depends on the seed; the BSDS split ignores the other sources
    assert Mixture(srcs, seed=0).split_keys("val") == val
    assert Mixture(srcs, seed=1).split_keys("val") != val
    only_bsds = Mixture([sources["bsds"]], seed=0).split_keys("val")
    assert only_bsds == {k for k in val if k.startswith("bsds:")}


@needs_data
def test_mixture_weights(sources):
    mix = Mixture(list(sources.values()), weights={"bsds": 0.0, "sod": 1.0, "coco": 0.0, "coco128": 0.0, "weizmann": 0.0})
    rng = np.random.default_rng(0)
    for _ in range(5):
        s, inst = mix.draw(rng)
        assert mix.sources[s].name == "sod" and inst.source == "sod"
        assert mix.split_of(inst.split_key) == "train"
    val = list(mix.instances("val"))
    assert val and all(mix.split_of(inst.split_key) == "val" for _, inst in val)
