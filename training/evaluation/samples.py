"""One evaluation instance: an image, a binary ground-truth mask and an optional ignore region.

A `Sample` is cheap and picklable (paths plus a reader), so worker processes load the pixels
themselves; `Sample.load()` returns the arrays. In-memory samples (a fine-tuning holdout) are
made with `samples_from_arrays`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from model.images import load_image

Target = Tuple[np.ndarray, Optional[np.ndarray]]  # (gt bool HxW, ignore bool HxW or None)


@dataclass(frozen=True)
class LoadedSample:
    sample_id: str
    image: np.ndarray            # H x W x 3 uint8 RGB
    gt: np.ndarray               # H x W bool, object
    ignore: Optional[np.ndarray]  # H x W bool, neither counted nor clicked; None = nothing ignored


@dataclass(frozen=True)
class Sample:
    sample_id: str
    image: Union[str, Path, np.ndarray]
    read_target: Callable[[], Target]  # picklable (module-level function or functools.partial)

    def load(self) -> LoadedSample:
        image = load_image(self.image)
        gt, ignore = self.read_target()
        gt = np.asarray(gt).astype(bool)
        if gt.shape != image.shape[:2]:
            raise ValueError(f"{self.sample_id}: mask {gt.shape} does not match image {image.shape[:2]}")
        if ignore is not None:
            ignore = np.asarray(ignore).astype(bool)
            if ignore.shape != gt.shape:
                raise ValueError(f"{self.sample_id}: ignore region {ignore.shape} != mask {gt.shape}")
            if not ignore.any():
                ignore = None
            else:
                gt = gt & ~ignore
        return LoadedSample(self.sample_id, image, gt, ignore)


def _fixed_target(gt: np.ndarray, ignore: Optional[np.ndarray]) -> Target:
    return gt, ignore


def samples_from_arrays(pairs: Iterable[Sequence[Any]], prefix: str = "sample",
                        ids: Optional[Sequence[str]] = None) -> list:
    """Samples from in-memory (image, mask) or (image, mask, ignore) tuples, named `prefix` + their
    position, or `prefix` + ids[i] (stable names: results can then be matched across runs).

    mask: bool or integer array (non-zero = object); a uint8 mask may mark ignored pixels 255
    only when it also uses 1 for the object (values {0, 1, 255}); pass an explicit ignore array
    otherwise.
    """
    out = []
    for i, item in enumerate(pairs):
        image, mask = item[0], np.asarray(item[1])
        ignore = np.asarray(item[2]).astype(bool) if len(item) > 2 and item[2] is not None else None
        if ignore is None and mask.dtype != bool and set(np.unique(mask).tolist()) <= {0, 1, 255} \
                and 1 in mask and 255 in mask:
            ignore = mask == 255
            mask = mask == 1
        out.append(Sample(f"{prefix}{i:05d}" if ids is None else f"{prefix}{ids[i]}", np.asarray(image),
                          partial(_fixed_target, mask.astype(bool), ignore)))
    return out
