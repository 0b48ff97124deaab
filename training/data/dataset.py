"""Torch Dataset over a :class:`Mixture`: augmented 384 x 384 samples with initial clicks.

Determinism: sample ``i`` of epoch ``e`` is drawn with ``numpy.random.default_rng([seed, e, i])``
(validation: ``[seed, i]``), so a batch's content does not depend on ``num_workers``, on which worker
produced it, or on what ran before. Call ``dataset.set_epoch(e)`` before creating the epoch's
iterator (``make_loader`` does it; keep ``persistent_workers=False`` so workers see the new epoch).
``worker_init_fn`` additionally seeds the Python/NumPy global generators per worker (from the
DataLoader's seeded base).
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import AugmentConfig, augment, eval_config
from .click_simulation import InitialClickConfig, sample_initial_clicks
from .mixture import Mixture
from .sources import Instance


class ClickSegDataset(Dataset):
    """Samples of one split of a mixture.

    ``split="train"``: ``length`` samples per epoch (default: the number of train items), each a
    weighted random draw from the mixture, augmented with ``augment_cfg``.
    ``split="val"``: one sample per validation item in a fixed order, augmented with the
    deterministic :func:`eval_config` of ``augment_cfg`` (``length`` may cap the count).

    Each sample is a dict: ``image`` (3, S, S) float32 in [0, 1] (not normalised), ``mask``
    (1, S, S) float32 {0, 1}, ``valid`` (1, S, S) float32 (0 on padding), ``clicks`` (K, 3) float32
    initial clicks (see ``training.data.click_simulation``), ``source`` int64 (index into
    ``mixture.sources``), ``index`` int64 and ``id`` str ("<source>/<item id>").
    """

    def __init__(self, mixture: Mixture, split: str = "train", length: Optional[int] = None,
                 augment_cfg: AugmentConfig = AugmentConfig(),
                 click_cfg: InitialClickConfig = InitialClickConfig(),
                 seed: int = 0, epoch: int = 0, max_redraws: int = 30):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.mixture = mixture
        self.split = split
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.click_cfg = click_cfg
        self.max_redraws = max_redraws
        if split == "train":
            self.augment_cfg = augment_cfg
            n_items = sum(len(i) for i in mixture.indices("train"))
            self.length = int(length) if length is not None else n_items
        else:
            self.augment_cfg = eval_config(augment_cfg)
            self._val_items = mixture.items("val")
            self.length = len(self._val_items) if length is None else min(int(length), len(self._val_items))
        if self.length <= 0:
            raise ValueError(f"empty {split} split")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if self.split == "train":
            return np.random.default_rng([self.seed, self.epoch, int(index)])
        return np.random.default_rng([self.seed, int(index)])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = self._rng(index)
        inst: Optional[Instance]
        for attempt in range(self.max_redraws):
            if self.split == "train":
                s, inst = self.mixture.draw(rng, "train")
            else:
                # the val item itself; if it yields nothing, the next items in order (deterministic)
                s, i = self._val_items[(index + attempt) % len(self._val_items)]
                inst = self.mixture.load(s, i, rng)
                if inst is None:
                    continue
            aug = augment(inst.image, inst.mask, rng, self.augment_cfg)
            if aug is None:
                continue
            clicks = sample_initial_clicks(aug.mask, rng, aug.valid, self.click_cfg)
            return {
                # numpy, not torch ops: torch's intra-op thread pool makes these 10x slower here
                "image": torch.from_numpy(np.multiply(aug.image.transpose(2, 0, 1), np.float32(1 / 255),
                                                      dtype=np.float32)),
                "mask": torch.from_numpy(aug.mask[None].astype(np.float32)),
                "valid": torch.from_numpy(aug.valid[None].astype(np.float32)),
                "clicks": torch.from_numpy(clicks),
                "source": torch.tensor(s, dtype=torch.int64),
                "index": torch.tensor(index, dtype=torch.int64),
                "id": f"{inst.source}/{inst.item_id}",
            }
        raise RuntimeError(f"{self.split} sample {index}: no usable instance after {self.max_redraws} draws")


def collate(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack tensors; ``clicks`` rows are padded with (-1, -1, 0) to the longest; ``id`` is a list."""
    out: Dict[str, Any] = {}
    for k in ("image", "mask", "valid", "source", "index"):
        out[k] = torch.stack([b[k] for b in batch])
    m = max(b["clicks"].shape[0] for b in batch)
    clicks = torch.tensor([-1.0, -1.0, 0.0]).repeat(len(batch), m, 1)
    for j, b in enumerate(batch):
        clicks[j, :b["clicks"].shape[0]] = b["clicks"]
    out["clicks"] = clicks
    out["id"] = [b["id"] for b in batch]
    return out


def worker_init_fn(worker_id: int) -> None:
    """Per-worker: seed Python's and NumPy's global generators from the worker's torch seed (which
    the DataLoader derives from its seeded ``generator``); the samples themselves use their own
    per-index generators. (torch already runs workers with one thread. Do NOT call
    cv2.setNumThreads here: after torch has run in the parent it can deadlock in a forked child
    (seen in this project's DataLoader workers); cv2's own pool is fork-safe when left alone.)"""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset: ClickSegDataset, batch_size: int, num_workers: int = 2, epoch: int = 0,
                shuffle: bool = False, drop_last: Optional[bool] = None, pin_memory: bool = False,
                prefetch_factor: Optional[int] = None) -> DataLoader:
    """A DataLoader for ``dataset`` at ``epoch`` (sets the dataset's epoch; seeds the loader's
    generator from (dataset.seed, epoch)). Train samples are already random draws, so ``shuffle``
    is off by default; ``drop_last`` defaults to True for train, False for val."""
    dataset.set_epoch(epoch)
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([dataset.seed, epoch]).generate_state(1)[0]))
    kw: Dict[str, Any] = {}
    if num_workers > 0:
        kw["worker_init_fn"] = worker_init_fn
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate, generator=g, pin_memory=pin_memory,
                      drop_last=(dataset.split == "train") if drop_last is None else drop_last,
                      persistent_workers=False, **kw)
