"""Training instances from a Label Studio JSON export: one brush result of one annotation each,
decoded with the backend's own brush decoder (training/brush.py: alpha > 127)."""
from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from training.brush import decode_ls_brush

from .sources import (IMAGE_EXTS, Instance, InstanceSource, Item, PathLike, _load_image_matching, _rle_decode,
                      assert_not_benchmark)

log = logging.getLogger(__name__)

_LS_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


def ls_url_basename(url: str) -> str:
    """File name an image URL refers to: ``/data/upload/3/ab12cd34-cat.jpg`` -> ``ab12cd34-cat.jpg``,
    ``/data/local-files/?d=photos/cat.jpg`` -> ``cat.jpg``, ``s3://bucket/a/cat.jpg`` -> ``cat.jpg``."""
    parsed = urllib.parse.urlparse(url)
    query = urllib.parse.parse_qs(parsed.query)
    path = query["d"][0] if "d" in query else parsed.path
    return Path(urllib.parse.unquote(path)).name


class LabelStudioSource(InstanceSource):
    """Brush masks from a Label Studio JSON export (a file path or the list of task dicts).

    Every non-cancelled annotation's ``brushlabels`` result with an RLE is one instance (optionally
    only those whose label is in ``labels``). The task's image is found by ``resolver(url)`` if given,
    else in ``image_dir`` by the URL's basename (also without Label Studio's ``xxxxxxxx-`` upload
    prefix). Masks are decoded once at indexing (training/brush.py, the backend's decoder too) and kept
    as COCO RLE.
    """

    def __init__(self, export: Union[PathLike, Sequence[Mapping[str, Any]]], *,
                 image_dir: Optional[PathLike] = None, resolver: Optional[Callable[[str], Optional[PathLike]]] = None,
                 data_key: Optional[str] = None, labels: Optional[Iterable[str]] = None,
                 name: str = "ls", namespace: str = "ls", min_area: int = 400):
        # pycocotools is a training requirement, not a serving one: only the training sources need it
        from pycocotools import mask as mask_utils

        if isinstance(export, (str, os.PathLike)):
            with open(assert_not_benchmark(export)) as f:
                tasks = json.load(f)
        else:
            tasks = list(export)
        if isinstance(tasks, dict):
            tasks = [tasks]
        if image_dir is not None:
            image_dir = assert_not_benchmark(image_dir)
        labels = set(labels) if labels is not None else None
        self.stats = {"tasks": 0, "no_image": 0, "results": 0, "small": 0, "bad_rle": 0}
        items = []
        for task in tasks:
            self.stats["tasks"] += 1
            data = task.get("data", {})
            url = data.get(data_key) if data_key else (
                data.get("image") or next((v for v in data.values() if isinstance(v, str)
                                           and ls_url_basename(v).lower().endswith(IMAGE_EXTS)), None))
            path = self._resolve(url, image_dir, resolver) if url else None
            if path is None:
                self.stats["no_image"] += 1
                continue
            for ann in task.get("annotations", task.get("completions", [])):
                if ann.get("was_cancelled"):
                    continue
                for r_idx, res in enumerate(ann.get("result", [])):
                    if str(res.get("type", "")).lower() != "brushlabels":
                        continue
                    value = res.get("value") or {}
                    if "rle" not in value and "rle" not in res:
                        continue
                    res_labels = value.get("brushlabels", res.get("brushlabels", []))
                    if labels is not None and not labels.intersection(res_labels):
                        continue
                    self.stats["results"] += 1
                    try:
                        mask = decode_ls_brush(res)
                    except (ValueError, KeyError, IndexError) as e:
                        log.warning("task %s: undecodable brush result: %s", task.get("id"), e)
                        self.stats["bad_rle"] += 1
                        continue
                    if int(mask.sum()) < min_area:
                        self.stats["small"] += 1
                        continue
                    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                    items.append(Item(id=f"{task.get('id')}/{ann.get('id', 0)}/{r_idx}",
                                      split_key=f"{namespace}:{path.stem}",
                                      payload=(path, rle)))
        items.sort(key=lambda it: it.id)
        if not items:
            raise FileNotFoundError("no usable brush annotations in the Label Studio export")
        super().__init__(name, items)

    @staticmethod
    def _resolve(url: str, image_dir: Optional[Path], resolver) -> Optional[Path]:
        if resolver is not None:
            p = resolver(url)
            return assert_not_benchmark(p) if p is not None and Path(p).is_file() else None
        if image_dir is None:
            return None
        name = ls_url_basename(url)
        for cand in (name, _LS_UPLOAD_PREFIX.sub("", name)):
            p = image_dir / cand
            if p.is_file():
                return assert_not_benchmark(p)
        return None

    def load(self, index: int, rng: np.random.Generator) -> Optional[Instance]:
        item = self.items[index]
        path, rle = item.payload
        mask = _rle_decode(rle)
        image = _load_image_matching(path, mask.shape)
        if image is None:
            log.warning("%s/%s: image %s does not match the mask size %s; skipped",
                        self.name, item.id, path, mask.shape)
            return None
        return self._instance(item, image, mask)
