"""Which sources a training run reads: the default ones under the shared training root (and their
weights), the base images a router learns "not the project's" from, and a config's source specs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Optional

from .labelstudio import LabelStudioSource
from .sources import (BSDSSource, COCOSource, InstanceSource, PathLike, SBDSource, SODSource, assert_not_benchmark,
                      default_data_root)

DEFAULT_WEIGHTS = {"bsds": 0.25, "sod": 0.15, "coco": 0.35, "coco128": 0.15, "weizmann": 0.1}


def default_sources(data_root: Optional[PathLike] = None) -> List[InstanceSource]:
    """BSDS500 regions, SOD masks, the three COCO subsets, COCO128 and the Weizmann horses under the
    shared training root (the last two only when present: older copies of the root lack them)."""
    root = assert_not_benchmark(data_root) if data_root is not None else default_data_root()
    sources: List[InstanceSource] = [
        BSDSSource(root / "BSDS500"),
        SODSource(root / "SOD", root / "BSDS500" / "images"),
        COCOSource.from_root(root / "COCO"),
    ]
    for name in ("COCO128", "Weizmann"):
        if (root / name / "instances.json").is_file():
            sources.append(COCOSource([(root / name / "instances.json", root / name / "images")],
                                      name=name.lower(), namespace=name.lower()))
    return sources


def base_image_files(data_root: Optional[PathLike] = None) -> List[Path]:
    """Every image file of the default sources' folders under the training root, sorted (what a
    fine-tuned model's router learns "not the project's" from)."""
    root = assert_not_benchmark(data_root) if data_root is not None else default_data_root()
    files: List[Path] = []
    for folder in (root / "BSDS500" / "images", root / "COCO", root / "COCO128" / "images", root / "Weizmann" / "images"):
        if folder.is_dir():
            files += [p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    return sorted(files)


def source_from_spec(spec: Mapping[str, Any], data_root: Optional[PathLike] = None) -> InstanceSource:
    """Build one source from a config dict, e.g. ``{"type": "sbd", "root": "/data/SBD", "split": "train"}``.

    Types: ``bsds`` (root), ``sod`` (root, image_dir), ``coco`` (root | annotations: [json or
    [json, image_dir]]), ``sbd`` (root, split, list_file), ``labelstudio`` (export, image_dir, labels).
    Relative paths are taken relative to ``data_root`` (default: the shared training root). Keys
    ``weight`` and ``type`` are not passed on; ``name`` is.
    """
    base = Path(data_root) if data_root is not None else default_data_root()
    kw = {k: v for k, v in spec.items() if k not in ("type", "weight")}

    def p(v):
        return None if v is None else (base / v if not Path(v).is_absolute() else Path(v))

    t = spec["type"].lower()
    if t == "bsds":
        return BSDSSource(p(kw.pop("root", "BSDS500")), **kw)
    if t == "sod":
        return SODSource(p(kw.pop("root", "SOD")), p(kw.pop("image_dir", "BSDS500/images")), **kw)
    if t == "coco":
        if "annotations" in kw:
            anns = [(p(a[0]), p(a[1])) if isinstance(a, (list, tuple)) else p(a) for a in kw.pop("annotations")]
            kw.pop("root", None)
            return COCOSource(anns, **kw)
        return COCOSource.from_root(p(kw.pop("root", "COCO")), **kw)
    if t == "sbd":
        root = p(kw.pop("root"))
        if kw.get("list_file"):
            kw["list_file"] = p(kw["list_file"])
        return SBDSource(root, **kw)
    if t in ("labelstudio", "label_studio", "ls"):
        export = p(kw.pop("export"))
        if kw.get("image_dir"):
            kw["image_dir"] = p(kw["image_dir"])
        return LabelStudioSource(export, **kw)
    raise ValueError(f"unknown source type {spec['type']!r}")
