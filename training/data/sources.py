"""Training-instance sources: each turns one data set on disk into (image, object mask) instances.

Every source holds a stable, sorted list of *items* (``source.items``); ``source.load(i, rng)``
reads item ``i`` lazily and returns an :class:`Instance` (image H x W x 3 uint8 RGB, mask H x W
bool) or ``None`` when that draw yields no usable object (the caller draws again). What an item is
depends on the source:

- :class:`BSDSSource`  -- one BSDS500 image; each load picks a random annotator and a random region
  (optionally merged with 1-2 adjacent regions), so one item gives many object/part masks.
- :class:`SODSource`   -- one salient-object mask (on the BSDS500 image with the same id).
- :class:`COCOSource`  -- one instance annotation (polygons or RLE), from one or more COCO jsons.
- :class:`SBDSource`   -- one SBD image; each load picks a random instance of ``GTinst``.
- :class:`LabelStudioSource` -- one brush result of one annotation of a Label Studio export
  (training/data/labelstudio.py).

The default sources and a config's source specs are training/data/catalog.py.

Each item has a ``split_key`` naming the *image* it is drawn on (``"bsds:100075"`` for both the
BSDS region maps and the SOD mask of that image, ``"coco:000000397133"`` for every instance of that
COCO image, whichever subset lists it). The train/validation split is a function of this key only
(:func:`training.data.mixture.split_of`), so no image is ever in both splits.

The benchmark sets (GrabCut, Berkeley, DAVIS, COCO-MVal) must never be trained on: every root and
every file path a source reads goes through :func:`assert_not_benchmark`, which refuses any path
with one of those folder names among its (symlink-resolved) components.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union, cast

import cv2
import numpy as np
import scipy.io
from PIL import Image

from model.images import load_image, to_rgb8
from model.settings import SIMCLICK_TRAIN_ROOT

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

REPO_ROOT = Path(__file__).resolve().parents[2]

# Folder names of the evaluation benchmarks (compared case-insensitively with whole path components).
BENCHMARK_DIR_NAMES = frozenset({"grabcut", "berkeley", "davis", "coco-mval", "coco_mval", "cocomval"})

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class BenchmarkDataError(ValueError):
    """A training source was pointed at an evaluation benchmark (GrabCut, Berkeley, DAVIS, ...)."""


def assert_not_benchmark(path: PathLike) -> Path:
    """Return ``path`` resolved; raise :class:`BenchmarkDataError` if it lies in a benchmark folder.

    The check is on whole path components of both the path as given and its symlink-resolved form,
    so ``.../datasets/Berkeley/images/x.jpg`` and a symlink into it are refused while
    ``.../BSDS500/...`` (the training images) is allowed.
    """
    p = Path(path)
    for cand in (p, p.resolve()):
        for part in cand.parts:
            if part.lower() in BENCHMARK_DIR_NAMES:
                raise BenchmarkDataError(
                    f"refusing to train on benchmark data: {path} (component {part!r}); GrabCut, "
                    "Berkeley, DAVIS and COCO-MVal are evaluation-only")
    return p.resolve()


def default_data_root() -> Path:
    """``$SIMCLICK_TRAIN_ROOT`` if set, else ``<repo>/../shared/datasets/train``."""
    env = SIMCLICK_TRAIN_ROOT.read()
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "datasets" / "train"
    return assert_not_benchmark(root)


@dataclass(frozen=True)
class AreaFilter:
    """Keep a mask when ``area >= min_px``, ``area >= min_frac * H*W`` and ``area <= max_frac * H*W``."""

    min_px: int = 400
    min_frac: float = 0.01
    max_frac: float = 0.8

    def ok(self, area: int, total: int) -> bool:
        return area >= self.min_px and area >= self.min_frac * total and area <= self.max_frac * total


@dataclass(frozen=True)
class Item:
    id: str          # unique within its source, stable across runs
    split_key: str   # the image this item is drawn on; the split is decided by this key
    payload: Any = None


@dataclass
class Instance:
    image: np.ndarray   # H x W x 3 uint8 RGB
    mask: np.ndarray    # H x W bool, non-empty
    source: str
    item_id: str
    split_key: str


class InstanceSource:
    """Base class: a named, stable list of items, each loadable as an :class:`Instance`."""

    name: str = "source"

    def __init__(self, name: str, items: Sequence[Item]):
        self.name = name
        self.items: List[Item] = list(items)
        ids = [it.id for it in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: duplicate item ids")

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, items={len(self)})"

    def load(self, index: int, rng: np.random.Generator) -> Optional[Instance]:
        raise NotImplementedError

    def _instance(self, item: Item, image: np.ndarray, mask: np.ndarray) -> Optional[Instance]:
        if mask.shape != image.shape[:2]:
            log.warning("%s/%s: mask %s does not match image %s; skipped", self.name, item.id,
                        mask.shape, image.shape[:2])
            return None
        if not mask.any():
            return None
        return Instance(image=image, mask=mask, source=self.name, item_id=item.id,
                        split_key=item.split_key)


def _sorted_files(d: Path, exts: Iterable[str]) -> List[Path]:
    exts = tuple(e.lower() for e in exts)
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in exts)


def _load_image_checked(path: Path) -> np.ndarray:
    assert_not_benchmark(path)
    return load_image(path)


def _load_image_matching(path: Path, hw: Tuple[int, int]) -> Optional[np.ndarray]:
    """Load with EXIF orientation applied; if that does not match the annotation's size but the raw
    pixel layout does (annotations drawn on the un-rotated pixels), use the raw layout."""
    img = _load_image_checked(path)
    if img.shape[:2] == tuple(hw):
        return img
    with Image.open(path) as pil:
        if (pil.height, pil.width) == tuple(hw):
            return to_rgb8(np.asarray(pil.convert("RGB")))
    return None


# --------------------------------------------------------------------------------------------------
# BSDS500 region maps
# --------------------------------------------------------------------------------------------------

def read_bsds_segmentations(mat_path: PathLike) -> List[np.ndarray]:
    """All human segmentations (integer region maps, H x W) stored in one BSDS500 groundTruth .mat."""
    gt = scipy.io.loadmat(str(assert_not_benchmark(mat_path)))["groundTruth"]
    return [np.asarray(gt[0][k]["Segmentation"][0, 0]) for k in range(gt.shape[1])]


def _adjacent_labels(seg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
    return np.unique(seg[ring])


class BSDSSource(InstanceSource):
    """BSDS500 images + groundTruth region maps; an object or part region per draw.

    Per load: a random annotator k, a random region among those passing ``area_filter``; with
    probability ``merge_prob`` it is merged with 1..``max_merge`` adjacent regions (keeping the union
    within the filter), which turns part regions into objects.
    """

    def __init__(self, root: PathLike, *, name: str = "bsds", area_filter: AreaFilter = AreaFilter(),
                 merge_prob: float = 0.3, max_merge: int = 2):
        root = assert_not_benchmark(root)
        img_dir, gt_dir = root / "images", root / "groundTruth"
        items = []
        for img in _sorted_files(img_dir, (".jpg",)):
            mat = gt_dir / f"{img.stem}.mat"
            if mat.is_file():
                items.append(Item(id=img.stem, split_key=f"bsds:{img.stem}", payload=(img, mat)))
        if not items:
            raise FileNotFoundError(f"no BSDS500 image/groundTruth pairs under {root}")
        super().__init__(name, items)
        self.area_filter = area_filter
        self.merge_prob = merge_prob
        self.max_merge = max_merge

    def load(self, index: int, rng: np.random.Generator) -> Optional[Instance]:
        item = self.items[index]
        img_path, mat_path = item.payload
        image = _load_image_checked(img_path)
        segs = read_bsds_segmentations(mat_path)
        total = image.shape[0] * image.shape[1]
        for k in rng.permutation(len(segs)):
            seg = segs[k]
            if seg.shape != image.shape[:2]:
                continue
            areas = np.bincount(seg.ravel())
            labels = [lab for lab in np.nonzero(areas)[0] if self.area_filter.ok(int(areas[lab]), total)]
            if not labels:
                continue
            label = labels[rng.integers(len(labels))]
            mask = seg == label
            area = int(areas[label])
            if self.max_merge > 0 and rng.random() < self.merge_prob:
                for _ in range(int(rng.integers(1, self.max_merge + 1))):
                    nbrs = [lab for lab in _adjacent_labels(seg, mask)
                            if self.area_filter.ok(area + int(areas[lab]), total)]
                    if not nbrs:
                        break
                    lab = nbrs[rng.integers(len(nbrs))]
                    mask |= seg == lab
                    area += int(areas[lab])
            return self._instance(item, image, mask)
        return None


# --------------------------------------------------------------------------------------------------
# SOD salient-object masks (drawn on BSDS500 images)
# --------------------------------------------------------------------------------------------------

class SODSource(InstanceSource):
    """SOD masks ``<root>/masks/<id>.png`` on ``<image_dir>/<id>.jpg``; the mask is one object
    (connected components are not split). Masks outside ``area_filter`` are dropped at indexing."""

    def __init__(self, root: PathLike, image_dir: PathLike, *, name: str = "sod",
                 area_filter: AreaFilter = AreaFilter()):
        root = assert_not_benchmark(root)
        image_dir = assert_not_benchmark(image_dir)
        items, self.dropped = [], 0
        for m in _sorted_files(root / "masks", (".png",)):
            img = image_dir / f"{m.stem}.jpg"
            if not img.is_file():
                self.dropped += 1
                continue
            mask = self._read_mask(m)
            if not area_filter.ok(int(mask.sum()), mask.size):
                self.dropped += 1
                continue
            items.append(Item(id=m.stem, split_key=f"bsds:{m.stem}", payload=(img, m)))
        if not items:
            raise FileNotFoundError(f"no SOD masks with images under {root}")
        super().__init__(name, items)

    @staticmethod
    def _read_mask(path: Path) -> np.ndarray:
        a = np.asarray(Image.open(assert_not_benchmark(path)))
        if a.ndim == 3:
            a = a.max(axis=2)
        return a > (0 if a.dtype == np.bool_ else 127)

    def load(self, index: int, rng: np.random.Generator) -> Optional[Instance]:
        item = self.items[index]
        img_path, mask_path = item.payload
        return self._instance(item, _load_image_checked(img_path), self._read_mask(mask_path))


# --------------------------------------------------------------------------------------------------
# COCO-format instance annotations
# --------------------------------------------------------------------------------------------------

def decode_coco_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed RLE or compressed RLE (COCO json ``segmentation``) -> H x W bool."""
    # pycocotools is a training requirement, not a serving one: only the training sources need it
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg, dict):
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unknown COCO segmentation type {type(seg).__name__}")
    return _rle_decode(rle)


def _rle_decode(rle: Any) -> np.ndarray:
    # pycocotools is a training requirement, not a serving one: only the training sources need it
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools' __array__ predates numpy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def _image_index(base: Path) -> Dict[str, List[Path]]:
    """basename -> image files under ``base`` (``annotations`` folders skipped)."""
    index: Dict[str, List[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d.lower() != "annotations")
        for f in filenames:
            if f.lower().endswith(IMAGE_EXTS):
                index.setdefault(f, []).append(Path(dirpath) / f)
    return index


def coco_image_dirs(json_path: Path, image_dir: Optional[PathLike] = None) -> List[Path]:
    """Candidate image folders for a COCO json, most specific first.

    Handles the layouts seen in practice: ``<base>/<split>/`` (``train2017``), ``<base>/images/<split>/``,
    ``<base>/images/`` and ``<base>/`` where ``<base>`` is the folder above ``annotations/`` and
    ``<split>`` comes from ``instances_<split>.json``.
    """
    dirs = []
    if image_dir is not None:
        dirs.append(Path(image_dir))
    base = json_path.parent.parent if json_path.parent.name.lower() == "annotations" else json_path.parent
    split = json_path.stem[len("instances_"):] if json_path.stem.startswith("instances_") else None
    if split:
        dirs += [base / split, base / "images" / split]
    dirs += [base / "images", base / "img", base / "JPEGImages", base]
    return [d for d in dirs if d.is_dir()]


class COCOSource(InstanceSource):
    """COCO-format instances from one or more ``(json, image_dir or None)`` pairs.

    Dropped at indexing: ``iscrowd=1``, ``area < min_area``, annotations whose image file is absent
    (e.g. images removed because they belong to COCO-MVal), and duplicates of the same
    (image file, annotation id) listed by several jsons. ``split_key`` is ``<namespace>:<image stem>``
    so one COCO image in two subsets lands in one split.
    """

    def __init__(self, annotation_files: Sequence[Union[PathLike, Tuple[PathLike, Optional[PathLike]]]],
                 *, name: str = "coco", namespace: str = "coco", min_area: float = 1000.0,
                 max_area_frac: float = 1.0):
        items: List[Item] = []
        seen = set()
        self.stats = {"annotations": 0, "crowd": 0, "small": 0, "large": 0, "no_image": 0, "duplicate": 0}
        for entry in annotation_files:
            json_path, image_dir = (entry if isinstance(entry, tuple) else (entry, None))
            json_path = assert_not_benchmark(json_path)
            if image_dir is not None:
                assert_not_benchmark(image_dir)
            with open(json_path) as f:
                data = json.load(f)
            dirs = coco_image_dirs(json_path, image_dir)
            fallback: Optional[Dict[str, List[Path]]] = None
            images = {}
            for im in data.get("images", []):
                fn = im["file_name"]
                path = next((d / fn for d in dirs if (d / fn).is_file()), None)
                if path is None:
                    if fallback is None:
                        fallback = _image_index(dirs[-1] if dirs else json_path.parent)
                    hits = fallback.get(Path(fn).name, [])
                    path = hits[0] if len(hits) == 1 else None
                if path is not None:
                    assert_not_benchmark(path)
                images[im["id"]] = (path, int(im["height"]), int(im["width"]))
            for ann in data.get("annotations", []):
                self.stats["annotations"] += 1
                if ann.get("iscrowd", 0):
                    self.stats["crowd"] += 1
                    continue
                info = images.get(ann["image_id"])
                if info is None or info[0] is None:
                    self.stats["no_image"] += 1
                    continue
                path, h, w = cast(Tuple[Path, int, int], info)     # info[0] is not None (above)
                area = float(ann.get("area", 0.0))
                if area < min_area:
                    self.stats["small"] += 1
                    continue
                if area > max_area_frac * h * w:
                    self.stats["large"] += 1
                    continue
                key = (path.name, ann["id"])
                if key in seen:
                    self.stats["duplicate"] += 1
                    continue
                seen.add(key)
                items.append(Item(id=f"{path.stem}/{ann['id']}", split_key=f"{namespace}:{path.stem}",
                                  payload=(path, h, w, ann["segmentation"], area)))
        items.sort(key=lambda it: it.id)
        if not items:
            raise FileNotFoundError(f"no usable COCO instances in {list(annotation_files)}")
        super().__init__(name, items)

    @classmethod
    def from_root(cls, root: PathLike, **kw) -> "COCOSource":
        """Every ``annotations/instances_*.json`` under ``root`` (the shared ``train/COCO`` folder holds
        three subsets, each with train2017/val2017 jsons and its own image layout)."""
        root = assert_not_benchmark(root)
        jsons = sorted(root.glob("**/annotations/instances_*.json"))
        if not jsons:
            raise FileNotFoundError(f"no annotations/instances_*.json under {root}")
        return cls(jsons, **kw)

    def load(self, index: int, rng: np.random.Generator) -> Optional[Instance]:
        item = self.items[index]
        path, h, w, seg, _ = item.payload
        image = _load_image_matching(path, (h, w))
        if image is None:
            log.warning("%s/%s: image size differs from the annotation's %dx%d; skipped",
                        self.name, item.id, h, w)
            return None
        return self._instance(item, image, decode_coco_segmentation(seg, h, w))


# --------------------------------------------------------------------------------------------------
# SBD (Semantic Boundaries Dataset) instance masks
# --------------------------------------------------------------------------------------------------

def read_sbd_instances(mat_path: PathLike) -> np.ndarray:
    """``GTinst.Segmentation`` of an SBD ``inst/<id>.mat``: integer map, 0 background, 1..N instances."""
    m = scipy.io.loadmat(str(assert_not_benchmark(mat_path)))["GTinst"]
    return np.asarray(m["Segmentation"][0, 0])


class SBDSource(InstanceSource):
    """SBD layout ``img/<id>.jpg``, ``inst/<id>.mat`` and a split list ``<split>.txt`` (one id a line).

    One item per image; each load picks a random instance passing ``area_filter`` (instance value 255,
    if present, is treated as void). ``list_file`` overrides ``<root>/<split>.txt``; ``split=None``
    takes every image with an ``inst`` file.
    """

    def __init__(self, root: PathLike, *, split: Optional[str] = "train", list_file: Optional[PathLike] = None,
                 name: str = "sbd", area_filter: AreaFilter = AreaFilter(min_px=400, min_frac=0.0, max_frac=0.9)):
        root = assert_not_benchmark(root)
        if list_file is not None or split is not None:
            lf = assert_not_benchmark(list_file) if list_file is not None else root / f"{split}.txt"
            ids = [line.strip() for line in lf.read_text().splitlines() if line.strip()]
        else:
            ids = [p.stem for p in _sorted_files(root / "inst", (".mat",))]
        items = []
        for i in sorted(set(ids)):
            img, mat = root / "img" / f"{i}.jpg", root / "inst" / f"{i}.mat"
            if img.is_file() and mat.is_file():
                items.append(Item(id=i, split_key=f"sbd:{i}", payload=(img, mat)))
        if not items:
            raise FileNotFoundError(f"no SBD img/inst pairs under {root}")
        super().__init__(name, items)
        self.area_filter = area_filter

    def load(self, index: int, rng: np.random.Generator) -> Optional[Instance]:
        item = self.items[index]
        img_path, mat_path = item.payload
        image = _load_image_checked(img_path)
        inst = read_sbd_instances(mat_path)
        areas = np.bincount(inst.ravel().astype(np.int64))
        labels = [lab for lab in np.nonzero(areas)[0]
                  if 0 < lab < 255 and self.area_filter.ok(int(areas[lab]), inst.size)]
        if not labels:
            return None
        return self._instance(item, image, inst == labels[rng.integers(len(labels))])
