"""A project's finished annotations from Label Studio -> a checked, local training set.

1. Tasks: through label-studio-sdk (`LabelStudio(base_url, api_key)`: a legacy token or a personal
   access token, which the SDK exchanges and refreshes itself), or from a Label Studio JSON export
   file (offline fine-tuning: `python -m backend.jobs enqueue --export FILE`).
2. Regions: every non-cancelled annotation's brush region (RLE decoded with the SDK's converter,
   training.brush.decode_ls_brush) or polygon region (rasterised) is one object mask.
3. Images: downloaded exactly as the backend downloads them (backend.labelstudio.fetch.ImageFetcher with the
   backend's settings: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, LOCAL_FILES_ROOT, size limits).
4. Checks: a region is skipped, with its reason logged and kept in the report, when its mask is
   empty or smaller than `min_area`, its RLE does not match its declared size, the image it was
   drawn on is gone (deleted upload, 404) or has another size than the annotation says.
5. Split: by task (an image is never in both): a task is in the holdout when its hash
   (SHA-1 of "<seed>:ls:<task id>") is below `holdout_fraction`, so a task keeps its split as the
   project grows; while fewer than `min_holdout` tasks fall there, the lowest hashes are added.

The result is a folder with images/ and two Label Studio-format exports (train.json, holdout.json,
every region rewritten as brush RLE) that training.data.LabelStudioSource reads.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from PIL import Image

from model.checkpoint import atomic_write_bytes
from model.images import load_image, to_rgb8
from training.data.mixture import key_hash
from training.brush import decode_ls_brush
from training.data.labelstudio import ls_url_basename
from training.data.sources import IMAGE_EXTS

from .fetch import FetchError
from .masks import mask_to_rle, polygon_to_mask

log = logging.getLogger(__name__)

MASK_TYPES = ("brushlabels", "polygonlabels")


class PullError(RuntimeError):
    """The project's annotations could not be read (Label Studio unreachable, bad token...)."""


# -- reading tasks ---------------------------------------------------------------------------------
def ls_client(url: str, api_key: str, timeout: float = 60.0):
    if not url:
        raise PullError("LABEL_STUDIO_URL is not set: the worker cannot read the project's annotations")
    if not api_key:
        raise PullError("LABEL_STUDIO_API_KEY is not set: the worker needs a Label Studio user's personal "
                        "access token (or legacy token) to read annotations")
    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout)


def _plain(obj: Any) -> Any:
    if hasattr(obj, "dict") and not isinstance(obj, dict):
        return obj.dict()
    return obj


def fetch_tasks(client, project_id: int) -> Tuple[dict, List[dict]]:
    """(project info, annotated tasks with their annotations as plain dicts) through the SDK."""
    try:
        project = client.projects.get(id=int(project_id))
        info = {"id": int(project_id), "title": getattr(project, "title", None),
                "label_config": getattr(project, "label_config", None)}
        tasks = []
        for t in client.tasks.list(project=int(project_id), fields="all", only_annotated=True, page_size=100):
            task = _plain(t)
            anns = task.get("annotations")
            # Some servers list lightweight annotation stubs: read the task's annotations then.
            if not anns or any("result" not in a for a in anns):
                task["annotations"] = [_plain(a) for a in client.annotations.list(id=int(task["id"]))]
            tasks.append(task)
    except ApiError as e:
        raise PullError(f"Label Studio refused to list project {project_id}'s tasks ({e.status_code}): "
                        f"{str(e.body)[:300]}") from None
    except Exception as e:  # httpx connection errors and the like
        raise PullError(f"cannot read project {project_id} from Label Studio: {type(e).__name__}: {e}") from None
    return info, tasks


def load_export(path: os.PathLike | str) -> List[dict]:
    data = json.loads(Path(path).read_text())
    return [data] if isinstance(data, dict) else list(data)


# -- regions ---------------------------------------------------------------------------------------
@dataclass
class Region:
    task_id: Any
    annotation_id: Any
    index: int
    label: str
    mask: np.ndarray          # H x W bool
    result: dict              # the region as brush RLE (Label Studio result format)


@dataclass
class PullReport:
    tasks: int = 0
    annotations: int = 0
    regions: int = 0
    kept: int = 0
    skipped: List[dict] = field(default_factory=list)
    train_tasks: List[Any] = field(default_factory=list)
    holdout_tasks: List[Any] = field(default_factory=list)
    train_regions: int = 0
    holdout_regions: int = 0
    latest_annotation: Optional[str] = None    # the newest updated_at/created_at seen

    def skip(self, task, ann, idx, reason: str) -> None:
        entry = {"task": task, "annotation": ann, "region": idx, "reason": reason}
        self.skipped.append(entry)
        log.warning("skipped task %s annotation %s region %s: %s", task, ann, idx, reason)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _image_url(task: dict, data_key: Optional[str]) -> Optional[str]:
    """The task's image URL: data[data_key], else data["image"], else the first value that names
    an image file (the rule training.data.LabelStudioSource uses)."""
    data = task.get("data") or {}
    if data_key:
        return data.get(data_key)
    if isinstance(data.get("image"), str):
        return data["image"]
    for v in data.values():
        if isinstance(v, str) and ls_url_basename(v).lower().endswith(IMAGE_EXTS):
            return v
    return None


def decode_region(res: dict, max_pixels: Optional[int] = None) -> Tuple[np.ndarray, str]:
    """A brush or polygon result -> (H x W bool mask, label); ValueError with the reason if unusable
    (a declared size over `max_pixels` is refused before anything of that size is made)."""
    kind = str(res.get("type", "")).lower()
    value = res.get("value") or {}
    try:
        h, w = int(res["original_height"]), int(res["original_width"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("no original_width/original_height") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"declared size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(f"declared size {w}x{h} is over MAX_IMAGE_PIXELS={max_pixels}")
    if kind == "brushlabels":
        if "rle" not in value and "rle" not in res:
            raise ValueError("brush region without RLE")
        try:
            mask = decode_ls_brush(res)
        except ValueError as e:
            raise ValueError(f"wrong size: {e}") from None
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"undecodable RLE: {type(e).__name__}: {e}") from None
        labels = value.get("brushlabels", res.get("brushlabels", []))
    else:
        points = value.get("points") or []
        if len(points) < 3:
            raise ValueError("polygon with fewer than 3 points")
        mask = polygon_to_mask(points, h, w)
        labels = value.get("polygonlabels", [])
    return mask, (labels[0] if labels else "")


def task_regions(task: dict, report: PullReport, labels: Optional[set] = None,
                 min_area: int = 400, max_pixels: Optional[int] = None) -> List[Region]:
    """The usable regions of one task (every non-cancelled annotation); skips are reported."""
    out = []
    for ann in task.get("annotations") or []:
        if ann.get("was_cancelled"):
            continue
        report.annotations += 1
        stamp = ann.get("updated_at") or ann.get("created_at")
        if stamp and (report.latest_annotation is None or str(stamp) > report.latest_annotation):
            report.latest_annotation = str(stamp)
        for idx, res in enumerate(ann.get("result") or []):
            if str(res.get("type", "")).lower() not in MASK_TYPES:
                continue
            report.regions += 1
            try:
                mask, label = decode_region(res, max_pixels)
            except ValueError as e:
                report.skip(task.get("id"), ann.get("id"), idx, str(e))
                continue
            if labels and label not in labels:
                report.skip(task.get("id"), ann.get("id"), idx, f"label {label!r} not in {sorted(labels)}")
                continue
            area = int(mask.sum())
            if area == 0:
                report.skip(task.get("id"), ann.get("id"), idx, "empty mask")
                continue
            if area < min_area:
                report.skip(task.get("id"), ann.get("id"), idx, f"mask of {area} px < {min_area} px")
                continue
            h, w = mask.shape
            rle_result = {"id": res.get("id") or f"r{idx}", "type": "brushlabels",
                          "from_name": res.get("from_name", "tag"), "to_name": res.get("to_name", "image"),
                          "original_width": w, "original_height": h, "image_rotation": 0,
                          "value": {"format": "rle", "brushlabels": [label] if label else [],
                                    "rle": (res.get("value") or {}).get("rle") if res.get("type", "").lower() == "brushlabels"
                                    else mask_to_rle(mask)}}
            out.append(Region(task.get("id"), ann.get("id"), idx, label, mask, rle_result))
    return out


# -- split -----------------------------------------------------------------------------------------
def split_tasks(task_ids: Iterable[Any], holdout_fraction: float, min_holdout: int, seed: int = 0
                ) -> Tuple[List[Any], List[Any]]:
    """(train ids, holdout ids): hash threshold, topped up to min_holdout; never all of them."""
    ids = sorted(set(task_ids), key=lambda t: (key_hash(f"ls:{t}", seed), str(t)))
    hold = [t for t in ids if key_hash(f"ls:{t}", seed) < holdout_fraction]
    want = min(min_holdout, max(0, len(ids) - 1))
    for t in ids:
        if len(hold) >= want:
            break
        if t not in hold:
            hold.append(t)
    while hold and len(hold) >= len(ids):       # something must be left to train on
        hold.pop()
    hold_set = set(hold)
    return [t for t in ids if t not in hold_set], [t for t in ids if t in hold_set]


# -- the whole pull --------------------------------------------------------------------------------
def _ext(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except Exception:
        return ".img"
    return {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "tiff": ".tif", "webp": ".webp"}.get(fmt, ".img")


def _raw_size(data: bytes) -> Tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


def build_dataset(tasks: List[dict], fetcher, out_dir: os.PathLike | str, *, holdout_fraction: float = 0.2,
                  min_holdout: int = 2, seed: int = 0, labels: Optional[Iterable[str]] = None,
                  min_area: int = 400, data_key: Optional[str] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> PullReport:
    """Check every region, download the images, split, write out_dir/{images/, train.json,
    holdout.json, report.json}. Returns the report (kept/skipped regions, split)."""
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    labels = set(labels) if labels else None
    report = PullReport(tasks=len(tasks))
    usable: Dict[Any, Tuple[dict, List[Region]]] = {}
    for n, task in enumerate(tasks):
        if progress:
            progress(n, len(tasks))
        regions = task_regions(task, report, labels, min_area, fetcher.cfg.max_image_pixels)
        if not regions:
            continue
        tid = task.get("id")
        url = _image_url(task, data_key)
        try:
            data = fetcher.fetch_bytes(url)
            image = fetcher.decode(data, str(url))
        except FetchError as e:
            for r in regions:
                report.skip(tid, r.annotation_id, r.index, f"image unavailable: {e}")
            continue
        kept = []
        for r in regions:
            if r.mask.shape == image.shape[:2]:
                kept.append(r)
            elif r.mask.shape == _raw_size(data):
                kept.append(r)      # drawn on the pixels before EXIF rotation: the source handles it
            else:
                mh, mw = r.mask.shape
                report.skip(tid, r.annotation_id, r.index,
                            f"wrong size: annotation is {mw}x{mh}, image is {image.shape[1]}x{image.shape[0]}")
        if not kept:
            continue
        name = f"task-{tid}{_ext(data)}"
        atomic_write_bytes(img_dir / name, data)
        by_ann: Dict[Any, List[dict]] = {}
        for r in kept:
            by_ann.setdefault(r.annotation_id, []).append(r.result)
        clean = {"id": tid, "data": {"image": name},
                 "annotations": [{"id": a, "result": res, "was_cancelled": False} for a, res in by_ann.items()]}
        usable[tid] = (clean, kept)
        report.kept += len(kept)
    train_ids, hold_ids = split_tasks(usable, holdout_fraction, min_holdout, seed)
    report.train_tasks, report.holdout_tasks = train_ids, hold_ids
    report.train_regions = sum(len(usable[t][1]) for t in train_ids)
    report.holdout_regions = sum(len(usable[t][1]) for t in hold_ids)
    for name, ids in (("train.json", train_ids), ("holdout.json", hold_ids)):
        atomic_write_bytes(out / name, json.dumps([usable[t][0] for t in ids]).encode())
    atomic_write_bytes(out / "report.json", json.dumps(report.to_dict(), indent=2, default=str).encode())
    log.info("pulled %d task(s): %d region(s) kept, %d skipped; train %d task(s), holdout %d task(s)",
             report.tasks, report.kept, len(report.skipped), len(train_ids), len(hold_ids))
    return report


def holdout_instances(out_dir: os.PathLike | str) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """(id, image, mask) of every holdout region, for training.evaluation.samples_from_arrays. The
    id names the task and hashes the image file and the mask, so the same region has the same id
    in every job of the project (a parent's earlier results on it are reused) and an edited one
    gets a new id."""
    out = Path(out_dir)
    instances = []
    for task in json.loads((out / "holdout.json").read_text()):
        path = out / "images" / task["data"]["image"]
        file_bytes = path.read_bytes()
        image = load_image(path)
        for ann in task["annotations"]:
            for res in ann["result"]:
                mask = decode_ls_brush(res)
                if mask.shape != image.shape[:2]:
                    with Image.open(path) as pil:      # drawn on the pixels before EXIF rotation
                        raw = to_rgb8(np.asarray(pil.convert("RGB")))
                    if raw.shape[:2] != mask.shape:
                        continue
                    image = raw
                digest = hashlib.sha1(file_bytes + repr(mask.shape).encode() + np.packbits(mask).tobytes())
                instances.append((f"t{task['id']}-{digest.hexdigest()[:12]}", image, mask))
    return instances

