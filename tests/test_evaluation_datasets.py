"""Benchmark loaders: the real GrabCut/Berkeley/DAVIS copies, and SBD/COCO-MVal/VOC files written here."""
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from training.evaluation.datasets import canonical_name, default_data_root, load_dataset
from training.evaluation.reference import OraclePredictor
from training.evaluation.runner import evaluate_dataset

from .conftest import DATASETS

needs_data = pytest.mark.skipif(not (DATASETS / "GrabCut").is_dir(), reason=f"no benchmarks under {DATASETS}")


def test_default_root_is_shared_datasets_next_to_the_repo(monkeypatch):
    monkeypatch.delenv("SIMCLICK_DATA_ROOT", raising=False)
    root = default_data_root()
    assert root.parts[-2:] == ("shared", "datasets")
    monkeypatch.setenv("SIMCLICK_DATA_ROOT", "/some/where")
    assert str(default_data_root()) == "/some/where"


def test_names_are_case_and_dash_insensitive():
    assert canonical_name("davis") == "DAVIS"
    assert canonical_name("coco_mval") == "COCO-MVal"
    assert canonical_name("VOC") == "PascalVOC"
    with pytest.raises(KeyError):
        canonical_name("ImageNet")


@needs_data
def test_real_benchmarks_have_the_standard_instance_counts():
    assert len(load_dataset("GrabCut", DATASETS)) == 50
    assert len(load_dataset("Berkeley", DATASETS)) == 100
    assert len(load_dataset("DAVIS", DATASETS)) == 345


@needs_data
def test_grabcut_ignore_band_and_davis_palette_masks():
    gc = {s.sample_id: s for s in load_dataset("GrabCut", DATASETS)}
    banana = gc["banana1"].load()
    raw = np.asarray(Image.open(DATASETS / "GrabCut" / "boundary_GT" / "banana1.bmp"))
    assert banana.image.shape == (480, 640, 3)
    assert np.array_equal(banana.gt, raw == 255)
    assert np.array_equal(banana.ignore, raw == 128) and banana.ignore.sum() > 1000
    davis = {s.sample_id: s for s in load_dataset("DAVIS", DATASETS)}
    d = davis["195"].load()   # palette indices 0, 1, 2 and 255: every index > 0 is the object
    idx = np.asarray(Image.open(DATASETS / "DAVIS" / "gt" / "195.png"))
    assert np.array_equal(d.gt, idx > 0) and d.ignore is None
    b = load_dataset("Berkeley", DATASETS, limit=1)[0].load()
    assert b.gt.dtype == bool and 0 < b.gt.mean() < 1


@needs_data
@pytest.mark.parametrize("name", ["GrabCut", "Berkeley", "DAVIS"])
def test_oracle_needs_exactly_one_click_on_real_samples(name):
    samples = load_dataset(name, DATASETS, limit=4)
    m = evaluate_dataset(OraclePredictor(), samples, dataset=name, progress=False).metrics()
    assert m["instances"] == 4 and m["noc85"] == 1.0 and m["noc90"] == 1.0 and m["nof90"] == 0


def _jpg(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_sbd_every_instance_of_every_val_image_is_a_sample(tmp_path):
    root = tmp_path / "SBD"
    (root / "inst").mkdir(parents=True)
    maps = {"2008_000001": [1, 2, 3], "2008_000002": [1], "2008_000003": [2, 5]}
    for i, (name, ids) in enumerate(maps.items()):
        seg = np.zeros((20, 30), np.uint8)
        for k, v in enumerate(ids):
            seg[2 + 5 * k:5 + 5 * k, 3 + 8 * k:9 + 8 * k] = v
        savemat(root / "inst" / f"{name}.mat", {"GTinst": {"Segmentation": seg, "Categories": np.array(ids)[:, None],
                                                           "Boundaries": np.zeros((len(ids), 1))}})
        _jpg(root / "img" / f"{name}.jpg", 20, 30, i)
    (root / "val.txt").write_text("2008_000001\n2008_000003\n")  # 000002 is not in val
    samples = load_dataset("SBD", tmp_path)
    assert [s.sample_id for s in samples] == ["2008_000001#1", "2008_000001#2", "2008_000001#3",
                                              "2008_000003#2", "2008_000003#5"]
    s = samples[4].load()
    assert s.gt.sum() == 18 and s.ignore is None and s.image.shape == (20, 30, 3)
    assert len(load_dataset("sbd", tmp_path, limit=2)) == 2
    m = evaluate_dataset(OraclePredictor(), samples, progress=False).metrics()
    assert m["noc90"] == 1.0 and m["instances"] == 5


def test_pascal_voc_objects_with_void_ignored(tmp_path):
    root = tmp_path / "PascalVOC"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "SegmentationObject").mkdir()
    ids = np.zeros((24, 32), np.uint8)
    ids[3:10, 3:12] = 1
    ids[14:22, 16:30] = 2
    ids[2, 2:13] = 255       # void boundary
    ids[13, 15:31] = 255
    png = Image.fromarray(ids, mode="P")
    png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192])
    png.save(root / "SegmentationObject" / "2007_000032.png")
    _jpg(root / "JPEGImages" / "2007_000032.jpg", 24, 32)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n")
    samples = load_dataset("PascalVOC", tmp_path)
    assert [s.sample_id for s in samples] == ["2007_000032#1", "2007_000032#2"]
    s = samples[1].load()
    assert np.array_equal(s.gt, ids == 2)
    assert np.array_equal(s.ignore, ids == 255)
    m = evaluate_dataset(OraclePredictor(), samples, progress=False).metrics()
    assert m["noc90"] == 1.0


def test_coco_mval_layout(tmp_path):
    root = tmp_path / "COCO_MVal"
    for i, name in enumerate(["000000001", "000000002"]):
        _jpg(root / "img" / f"{name}.jpg", 16, 20, i)
        m = np.zeros((16, 20), np.uint8)
        m[4:12, 3 + i:15] = 255
        (root / "gt").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "gt" / f"{name}.png")
    samples = load_dataset("COCO-MVal", tmp_path)
    assert [s.sample_id for s in samples] == ["000000001", "000000002"]
    assert samples[1].load().gt.sum() == 8 * 11
    explicit = load_dataset(f"COCO-MVal={root}")
    assert len(explicit) == 2


def test_missing_data_set_has_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="SIMCLICK_DATA_ROOT"):
        load_dataset("DAVIS", tmp_path)


@pytest.mark.e2e  # slow (1.2 s of CPU): the unit tier stays within a minute (issue 24)
@pytest.mark.skipif(not (DATASETS / "train").is_dir(), reason=f"no training data under {DATASETS}")
def test_train_val_is_the_split_training_never_sees_with_sources_interleaved():
    from training.data import Mixture, default_sources

    samples = load_dataset("TrainVal", limit=10)
    assert len(samples) == 10
    sources = [s.sample_id.split("/")[0] for s in samples]
    assert len(set(sources[:5])) == 5                     # one of each source before any repeats
    mixture = Mixture(default_sources(DATASETS / "train"), seed=0)
    train_ids = {f"{src.name}/{src.items[i].id}" for src, idx in zip(mixture.sources, mixture.indices("train"))
                 for i in idx}
    assert not any(s.sample_id in train_ids for s in samples)
    again = load_dataset("TrainVal", limit=10)
    for a, b in zip(samples, again):                      # deterministic (BSDS regions are drawn)
        la, lb = a.load(), b.load()
        assert a.sample_id == b.sample_id and np.array_equal(la.gt, lb.gt) and la.gt.any()


def _folder(root, n=3, layout=("images", "masks")):
    (root / layout[0]).mkdir(parents=True)
    (root / layout[1]).mkdir()
    for i in range(n):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / layout[0] / f"im{i:02d}.jpg")
        m = np.zeros((20, 30), np.uint8)
        m[5:15, 5:20 + i] = 255
        Image.fromarray(m).save(root / layout[1] / f"im{i:02d}.png")
    return root


def test_a_folder_of_ones_own_under_its_own_name_with_skip_and_limit(tmp_path):
    from training.evaluation.datasets import dataset_name

    root = _folder(tmp_path / "lesions", 4)
    samples = load_dataset(f"Skin={root}")
    assert [s.sample_id for s in samples] == ["im00", "im01", "im02", "im03"]
    assert [s.sample_id for s in load_dataset(f"Skin={root}", skip=1, limit=2)] == ["im01", "im02"]
    assert load_dataset(f"Skin={root}")[1].load().gt.sum() == 10 * 16
    assert dataset_name(f"Skin={root}") == "Skin" and dataset_name(f"berkeley={root}") == "Berkeley"
    davis_like = _folder(tmp_path / "d", 2, ("img", "gt"))
    assert len(load_dataset(f"mine={davis_like}")) == 2
    with pytest.raises(KeyError):
        dataset_name("Skin")                             # an unknown name needs its folder
    with pytest.raises(KeyError):
        dataset_name(f"no/slash={root}")
    with pytest.raises(FileNotFoundError, match="images/ and masks/"):
        load_dataset(f"Skin={tmp_path}")
    with pytest.raises(FileNotFoundError, match="after the first 9"):
        load_dataset(f"Skin={root}", skip=9)


def test_make_export_from_a_folder_reads_back_as_the_same_masks(tmp_path):
    from backend.labelstudio.make_export import main
    from training.data.labelstudio import LabelStudioSource

    root = _folder(tmp_path / "lesions", 3)
    assert main(["--folder", str(root), "--out", str(tmp_path / "out"), "--skip", "1"]) == 0
    src = LabelStudioSource(tmp_path / "out" / "export.json", image_dir=tmp_path / "out" / "images", min_area=10)
    masks = [src.load(i, np.random.default_rng(0)).mask for i in range(len(src))]
    assert [m.sum() for m in masks] == [10 * 16, 10 * 17]
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["im01.jpg", "im02.jpg"]
