"""Write a Label Studio JSON export (brush RLE annotations) from the SOD training masks.

    python -m backend.labelstudio.make_export --count 20 --out /tmp/ls20 [--skip 0] [--url-style local-files]

For trying the fine-tuning job without annotating by hand (`python -m backend.jobs enqueue
--project 1 --export /tmp/ls20/export.json`) and for tests. Each task is one BSDS500 training image
(never a benchmark image) with its SOD salient-object mask as one brush region, in the format a
real export has (task id, data.image, annotations[].result[] with original_width/height and
value.rle from label-studio-sdk's mask2rle). Image URLs are `/data/local-files/?d=<name>` with the
images copied to <out>/images (set LOCAL_FILES_ROOT=<out>/images for the worker), or absolute paths.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from training.data.sources import SODSource, assert_not_benchmark, default_data_root

from .masks import mask_to_rle


def sod_pairs(train_root: Path, count: int, skip: int = 0):
    src = SODSource(train_root / "SOD", train_root / "BSDS500" / "images")
    for item in src.items[skip:skip + count]:
        img_path, mask_path = item.payload
        yield item.id, assert_not_benchmark(img_path), SODSource._read_mask(mask_path)


def brush_result(mask: np.ndarray, label: str = "Object", rid: str = "r1") -> dict:
    h, w = mask.shape
    return {"id": rid, "from_name": "tag", "to_name": "image", "type": "brushlabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


def make_export(out: Path, count: int, skip: int = 0, url_style: str = "local-files",
                train_root: Path | None = None, first_id: int = 1) -> Path:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tasks = []
    for k, (stem, img_path, mask) in enumerate(sod_pairs(Path(train_root or default_data_root()), count, skip)):
        dest = out / "images" / img_path.name
        shutil.copyfile(img_path, dest)
        url = f"/data/local-files/?d={dest.name}" if url_style == "local-files" else str(dest)
        tid = first_id + k
        tasks.append({"id": tid, "data": {"image": url},
                      "annotations": [{"id": 1000 + tid, "was_cancelled": False, "ground_truth": False,
                                       "created_at": f"2026-01-01T00:00:{k % 60:02d}Z",
                                       "updated_at": f"2026-01-01T00:00:{k % 60:02d}Z",
                                       "result": [brush_result(mask, rid=f"sod{stem}")]}],
                      "predictions": []})
    path = out / "export.json"
    path.write_text(json.dumps(tasks))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.labelstudio.make_export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--skip", type=int, default=0, help="start at the N-th SOD mask")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--url-style", choices=["local-files", "path"], default="local-files")
    ap.add_argument("--train-root", type=Path, default=None)
    args = ap.parse_args(argv)
    print(make_export(args.out, args.count, args.skip, args.url_style, args.train_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
