"""Write a Label Studio JSON export (brush RLE annotations) from a folder of images and masks.

    python -m backend.labelstudio.make_export --folder DIR --out /tmp/proj [--count 100] [--skip 0]
    python -m backend.labelstudio.make_export --count 20 --out /tmp/ls20      # the SOD training masks

For a team that brings masks from another tool, and for trying the fine-tuning job without
annotating by hand (`python -m backend.jobs enqueue --project 1 --export /tmp/proj/export.json`).
`--folder` reads any folder the evaluation reads as a data set of its own (images/ + masks/, img/
+ gt/, or data_GT/ + boundary_GT/; training.evaluation.datasets.any_folder), image and mask paired
by file stem, in sorted order; without it, the SOD salient-object masks on BSDS500 training
images (never a benchmark image). Each task is one image with its mask as one brush region, in
the format a real export has (task id, data.image, annotations[].result[] with
original_width/height and value.rle from label-studio-sdk's mask2rle). Image URLs are
`/data/local-files/?d=<name>` with the images copied to <out>/images (set
LOCAL_FILES_ROOT=<out>/images for the worker), or absolute paths (`--url-style path`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np

from training.data.sources import SODSource, assert_not_benchmark, default_data_root
from training.evaluation.datasets import any_folder

from .masks import mask_to_rle

Pair = Tuple[str, Path, np.ndarray]     # (stem, image path, boolean mask)


def sod_pairs(train_root: Path, count: int, skip: int = 0) -> Iterator[Pair]:
    src = SODSource(train_root / "SOD", train_root / "BSDS500" / "images")
    for item in src.items[skip:skip + count]:
        img_path, mask_path = item.payload
        yield item.id, assert_not_benchmark(img_path), SODSource._read_mask(mask_path)


def folder_pairs(folder: Path, count: Optional[int], skip: int = 0) -> Iterator[Pair]:
    """(stem, image, mask) of a folder of the user's own, in sorted order; pixels in an ignore
    band (GrabCut's trimaps) count as background."""
    for sample in itertools.islice(any_folder(Path(folder)), skip, None if count is None else skip + count):
        gt, _ = sample.read_target()
        yield sample.sample_id, Path(str(sample.image)), np.asarray(gt, dtype=bool)


def brush_result(mask: np.ndarray, label: str = "Object", rid: str = "r1") -> dict:
    h, w = mask.shape
    return {"id": rid, "from_name": "tag", "to_name": "image", "type": "brushlabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


def make_export(out: Path, count: Optional[int] = 20, skip: int = 0, url_style: str = "local-files",
                train_root: Path | None = None, first_id: int = 1, folder: Path | None = None,
                label: str = "Object") -> Path:
    """Write <out>/export.json and copy the images to <out>/images; returns the export's path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pairs = (folder_pairs(folder, count, skip) if folder is not None
             else sod_pairs(Path(train_root or default_data_root()), 20 if count is None else count, skip))
    tasks = []
    for k, (stem, img_path, mask) in enumerate(pairs):
        if not mask.any():
            print(f"{img_path.name}: empty mask, left out", file=sys.stderr)
            continue
        dest = out / "images" / img_path.name
        shutil.copyfile(img_path, dest)
        url = f"/data/local-files/?d={dest.name}" if url_style == "local-files" else str(dest)
        tid = first_id + k
        tasks.append({"id": tid, "data": {"image": url},
                      "annotations": [{"id": 1000 + tid, "was_cancelled": False, "ground_truth": False,
                                       "created_at": f"2026-01-01T00:00:{k % 60:02d}Z",
                                       "updated_at": f"2026-01-01T00:00:{k % 60:02d}Z",
                                       "result": [brush_result(mask, label, rid=f"r{stem}")]}],
                      "predictions": []})
    if not tasks:
        raise FileNotFoundError(f"no image with a non-empty mask in {folder or 'the SOD masks'}"
                                + (f" after the first {skip}" if skip else ""))
    path = out / "export.json"
    path.write_text(json.dumps(tasks))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.labelstudio.make_export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, default=None,
                    help="images/ + masks/ (or img/ + gt/) of your own; default: the SOD training masks")
    ap.add_argument("--count", type=int, default=None, help="at most N tasks (default: all of --folder, 20 SOD)")
    ap.add_argument("--skip", type=int, default=0, help="start at the N-th image (sorted by name)")
    ap.add_argument("--label", default="Object", help="the brush label of every region (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--url-style", choices=["local-files", "path"], default="local-files")
    ap.add_argument("--train-root", type=Path, default=None, help="SOD only: the training data root")
    ap.add_argument("--first-id", type=int, default=1, help="task id of the first task (default 1)")
    args = ap.parse_args(argv)
    try:
        path = make_export(args.out, args.count, args.skip, args.url_style, args.train_root, args.first_id,
                           args.folder, args.label)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
