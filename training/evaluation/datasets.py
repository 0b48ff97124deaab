"""Loaders for the benchmark data sets in their standard layouts (see the protocol's table).

Each loader yields `Sample`s lazily in a fixed order (sorted names; list-file order for SBD and
VOC), so `limit` takes the same first N instances every time and never reads more files than it
needs. The root comes from `data_root` / $SIMCLICK_DATA_ROOT, default ../shared/datasets next to
the repository.
"""
from __future__ import annotations

import itertools
import re
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
from PIL import Image
from scipy.io import loadmat

from model.settings import SIMCLICK_DATA_ROOT

from .samples import Sample, Target

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def default_data_root() -> Path:
    env = SIMCLICK_DATA_ROOT.read()
    if env:
        return Path(env).expanduser()
    return (REPO_ROOT / ".." / "shared" / "datasets").resolve()


# ---------------------------------------------------------------- mask readers (module level: picklable)

def _read_array(path: str) -> tuple:
    with Image.open(path) as im:
        mode = im.mode
        a = np.asarray(im)
    if a.ndim == 3:
        a = a.max(axis=2)
    return mode, a


def read_trimap(path: str) -> Target:
    """GrabCut boundary_GT: 255 object, 128 ignore band, 0 background."""
    _, a = _read_array(path)
    return a > 128, a == 128


def read_binary_mask(path: str) -> Target:
    """Object mask: palette PNG -> any index > 0 is the object; grey/RGB -> value > 127."""
    mode, a = _read_array(path)
    if mode == "P":
        return a > 0, None
    if a.dtype == bool:
        return a, None
    return a > 127, None


def read_instance(path: str, instance_id: int, void: Optional[int]) -> Target:
    """One object of an instance-id map (VOC SegmentationObject PNG or SBD inst .mat)."""
    ids = read_instance_map(path)
    return ids == instance_id, (ids == void) if void is not None else None


def read_instance_map(path: str) -> np.ndarray:
    if path.endswith(".mat"):
        gtinst = loadmat(path)["GTinst"]
        return np.asarray(gtinst[0, 0]["Segmentation"]).astype(np.int32)
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: instance maps must be palette/grey index PNGs, got mode {im.mode}")
        return np.asarray(im).astype(np.int32)


# ---------------------------------------------------------------- helpers

def _find(root: Path, candidates: Sequence[str], name: str) -> Path:
    for c in candidates:
        p = root / c
        if p.is_dir():
            return p
    tried = ", ".join(str(root / c) for c in candidates)
    raise FileNotFoundError(f"{name}: no data set folder found (tried {tried}); set --data-root or "
                            f"${SIMCLICK_DATA_ROOT.name}, or pass {name}=/path/to/folder")


def _files_by_stem(folder: Path) -> Dict[str, Path]:
    out: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            # prefer .jpg over .bmp/.png when both exist (none do in the standard packages)
            if p.stem not in out or p.suffix.lower() in (".jpg", ".jpeg"):
                out[p.stem] = p
    return out


def _paired(images_dir: Path, masks_dir: Path, reader: Callable[[str], Target]) -> Iterator[Sample]:
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise FileNotFoundError(f"expected {images_dir} and {masks_dir}")
    images = _files_by_stem(images_dir)
    for stem, mask in sorted(_files_by_stem(masks_dir).items()):
        if stem not in images:
            raise FileNotFoundError(f"{mask}: no image {stem}.* in {images_dir}")
        yield Sample(stem, str(images[stem]), partial(reader, str(mask)))


def _read_list(path: Path) -> List[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _instance_ids(ids: np.ndarray, void: Optional[int]) -> List[int]:
    return [int(v) for v in np.unique(ids) if v > 0 and v != void]


# ---------------------------------------------------------------- the data sets

def grabcut(folder: Path) -> Iterator[Sample]:
    return _paired(folder / "data_GT", folder / "boundary_GT", read_trimap)


def berkeley(folder: Path) -> Iterator[Sample]:
    return _paired(folder / "images", folder / "masks", read_binary_mask)


def davis(folder: Path) -> Iterator[Sample]:  # also COCO-MVal: img/, gt/
    return _paired(folder / "img", folder / "gt", read_binary_mask)


def sbd(folder: Path) -> Iterator[Sample]:
    """SBD val: every instance of every image in val.txt is one sample (no ignore region)."""
    for image_id in _read_list(folder / "val.txt"):
        mat = folder / "inst" / f"{image_id}.mat"
        for k in _instance_ids(read_instance_map(str(mat)), None):
            yield Sample(f"{image_id}#{k}", str(folder / "img" / f"{image_id}.jpg"),
                         partial(read_instance, str(mat), k, None))


def pascal_voc(folder: Path) -> Iterator[Sample]:
    """PascalVOC val: every object of SegmentationObject/<id>.png is a sample; 255 (void) is ignored."""
    for image_id in _read_list(folder / "ImageSets" / "Segmentation" / "val.txt"):
        png = folder / "SegmentationObject" / f"{image_id}.png"
        for k in _instance_ids(read_instance_map(str(png)), 255):
            yield Sample(f"{image_id}#{k}", str(folder / "JPEGImages" / f"{image_id}.jpg"),
                         partial(read_instance, str(png), k, 255))


def train_val(folder: Path, seed: int = 0, val_fraction: float = 0.05) -> Iterator[Sample]:
    """The held-out split of the default training mixture (training.data; the split a training
    run with this seed never trains on): where model choices are made, never on the benchmarks.
    `folder` is the training data root."""
    # training.data imports torch and cv2 (seconds): the benchmarks' loaders, which backend.finetune
    # (and so backend.jobs' enqueue and status commands) imports at its top, stay light
    from training.data import Mixture, default_sources

    return mixture_val_samples(Mixture(default_sources(folder), val_fraction=val_fraction, seed=seed), seed)


def mixture_val_samples(mixture, seed: int) -> Iterator[Sample]:
    """Every instance of a mixture's validation split, sources interleaved (one instance of each in
    turn, so that a limit takes a mix), each drawn as Mixture.instances draws it."""
    per_source: Dict[int, List] = {}
    for k, (s, i) in enumerate(mixture.items("val")):
        per_source.setdefault(s, []).append((k, s, i))
    for group in itertools.zip_longest(*per_source.values()):
        for k, s, i in (x for x in group if x is not None):
            inst = mixture.load(s, i, np.random.default_rng([seed, k]))
            if inst is not None:
                yield Sample(f"{inst.source}/{inst.item_id}", inst.image, partial(_fixed_target, inst.mask.astype(bool)))


def _fixed_target(gt: np.ndarray) -> Target:
    return gt, None


# name -> (loader, folder names tried under the data root)
DATASETS: Dict[str, tuple] = {
    "GrabCut": (grabcut, ("GrabCut",)),
    "Berkeley": (berkeley, ("Berkeley",)),
    "DAVIS": (davis, ("DAVIS",)),
    "SBD": (sbd, ("SBD", "SBD/dataset", "benchmark_RELEASE/dataset")),
    "COCO-MVal": (davis, ("COCO-MVal", "COCO_MVal")),
    "PascalVOC": (pascal_voc, ("PascalVOC", "VOC2012", "VOCdevkit/VOC2012")),
    "TrainVal": (train_val, ("train",)),
}
_ALIASES = {"voc": "PascalVOC", "pascal": "PascalVOC", "coco": "COCO-MVal", "cocomval": "COCO-MVal"}


def canonical_name(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    for known in DATASETS:
        if known.lower().replace("-", "") == key:
            return known
    if key in _ALIASES:
        return _ALIASES[key]
    raise KeyError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}, or NAME=/folder for a folder "
                   "of your own (images/ + masks/)")


def dataset_name(spec: str) -> str:
    """The name a data set spec is reported and recorded under: a known benchmark's canonical
    name ('berkeley' -> 'Berkeley'), or for 'NAME=/folder' with a name of the user's own, that
    name (KeyError for an unknown name without a folder, or a name that is not a plain word)."""
    name, sep, _ = spec.partition("=")
    try:
        return canonical_name(name)
    except KeyError:
        if not sep:
            raise
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise KeyError(f"data set name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def any_folder(folder: Path) -> Iterator[Sample]:
    """A data set of the user's own: images/ + masks/ (the Berkeley layout: mask > 127 or a palette
    index > 0 is the object), img/ + gt/ (DAVIS, COCO-MVal) or data_GT/ + boundary_GT/ (GrabCut's
    trimaps), image and mask paired by file stem."""
    for images, masks, reader in (("images", "masks", read_binary_mask), ("img", "gt", read_binary_mask),
                                  ("data_GT", "boundary_GT", read_trimap)):
        if (folder / images).is_dir() and (folder / masks).is_dir():
            return _paired(folder / images, folder / masks, reader)
    raise FileNotFoundError(f"{folder}: expected images/ and masks/ (or img/ and gt/, or data_GT/ and "
                            "boundary_GT/) with an image and a mask of the same file stem per instance")


def load_dataset(name: str, data_root: Optional[Path] = None, limit: Optional[int] = None,
                 folder: Optional[Path] = None, skip: int = 0) -> List[Sample]:
    """The samples of one data set, the first `skip` left out, then at most `limit`. `name` may
    be 'Name=/explicit/folder': a benchmark's name reads that folder in the benchmark's layout,
    any other name reads a folder of the user's own (`any_folder`)."""
    if "=" in name:
        name, explicit = name.split("=", 1)
        folder = Path(explicit).expanduser()
    shown = dataset_name(name + ("=" if folder is not None else ""))
    if shown in DATASETS:
        loader, candidates = DATASETS[shown]
        if folder is None:
            folder = _find(Path(data_root) if data_root else default_data_root(), candidates, shown)
    else:
        loader = any_folder
    assert folder is not None           # a name of the user's own always comes with its folder
    samples = itertools.islice(loader(Path(folder)), skip, None if limit is None else skip + limit)
    out = list(samples)
    if not out:
        raise FileNotFoundError(f"{shown}: no samples under {folder}" + (f" after the first {skip}" if skip else ""))
    return out
