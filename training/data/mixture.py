"""A weighted mixture of instance sources with a deterministic train/validation split by image.

Split: every item carries a ``split_key`` ``"<namespace>:<image>"``. Within each namespace the
distinct keys are ranked by ``SHA-1("<seed>:<key>")`` and the first ``round(val_fraction * n)`` go to
validation (:func:`assign_splits`), so each namespace holds out exactly its fraction of *images*.
The split depends only on the seed and the set of keys of the namespace (not on file order, weights
or other sources), and an image used by two sources (a BSDS500 image with region maps and an SOD
mask, namespace ``bsds``; a COCO image listed by two subsets) is in the same split for both.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .catalog import DEFAULT_WEIGHTS
from .sources import Instance, InstanceSource

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


def key_hash(key: str, seed: int = 0) -> float:
    """A stable pseudo-random number in [0, 1) for a split key (independent of PYTHONHASHSEED)."""
    h = hashlib.sha1(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def assign_splits(keys: Iterable[str], seed: int = 0, val_fraction: float = 0.05) -> Set[str]:
    """The validation keys among ``keys``: per namespace (text before the first ':'), the
    ``round(val_fraction * n)`` keys of lowest :func:`key_hash`."""
    by_ns: Dict[str, List[str]] = {}
    for k in set(keys):
        by_ns.setdefault(k.split(":", 1)[0], []).append(k)
    val: Set[str] = set()
    for ns_keys in by_ns.values():
        ns_keys.sort(key=lambda k: (key_hash(k, seed), k))
        val.update(ns_keys[:int(round(val_fraction * len(ns_keys)))])
    return val


class Mixture:
    """Sources + per-source weights + the split.

    ``weights``: a mapping name -> weight (missing names get weight 1.0, or the
    :data:`DEFAULT_WEIGHTS` entry), a sequence aligned with ``sources``, or None (defaults). Weights
    are renormalised over the sources that have items in the split drawn from.
    """

    def __init__(self, sources: Sequence[InstanceSource],
                 weights: Optional[Union[Mapping[str, float], Sequence[float]]] = None,
                 val_fraction: float = 0.05, seed: int = 0, train_only: Sequence[str] = ()):
        """``train_only``: names of sources none of whose items is held out (a fine-tuning job's
        own annotations, mixed with base data whose validation split must stay held out)."""
        if not sources:
            raise ValueError("a mixture needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique: {names}")
        self.sources = list(sources)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        if weights is None or isinstance(weights, Mapping):
            w = weights or {}
            unknown = set(w) - set(names)
            if unknown:
                log.warning("weights for sources that are not in the mixture: %s", sorted(unknown))
            self.weights = np.array([float(w.get(n, DEFAULT_WEIGHTS.get(n, 1.0))) for n in names])
        else:
            self.weights = np.asarray(list(weights), dtype=np.float64)
            if self.weights.shape != (len(sources),):
                raise ValueError("weights must match sources")
        if (self.weights < 0).any():
            raise ValueError("weights must be >= 0")
        unknown_only = set(train_only) - set(names)
        if unknown_only:
            raise ValueError(f"train_only names sources that are not in the mixture: {sorted(unknown_only)}")
        self.val_keys = assign_splits((it.split_key for src in self.sources if src.name not in train_only
                                       for it in src.items), self.seed, self.val_fraction)
        self._split_items: Dict[str, List[np.ndarray]] = {s: [] for s in SPLITS}
        for src in self.sources:
            flags = np.array([src.name not in train_only and it.split_key in self.val_keys for it in src.items],
                             dtype=bool)
            self._split_items["val"].append(np.nonzero(flags)[0])
            self._split_items["train"].append(np.nonzero(~flags)[0])

    # ------------------------------------------------------------------------------------------
    def indices(self, split: str) -> List[np.ndarray]:
        """Per source (aligned with ``self.sources``), the sorted item indices in ``split``."""
        return self._split_items[split]

    def split_of(self, key: str) -> str:
        return "val" if key in self.val_keys else "train"

    def split_keys(self, split: str) -> set:
        return {src.items[i].split_key for src, idx in zip(self.sources, self.indices(split)) for i in idx}

    def items(self, split: str) -> List[Tuple[int, int]]:
        """Every (source index, item index) of ``split`` in a stable order (sources, then items)."""
        return [(s, int(i)) for s, idx in enumerate(self.indices(split)) for i in idx]

    def probabilities(self, split: str) -> np.ndarray:
        w = self.weights * np.array([len(idx) > 0 for idx in self.indices(split)])
        if w.sum() <= 0:
            raise ValueError(f"no items with positive weight in split {split!r}")
        return w / w.sum()

    def summary(self) -> Dict[str, Dict[str, int]]:
        return {src.name: {sp: int(len(self.indices(sp)[k])) for sp in SPLITS}
                for k, src in enumerate(self.sources)}

    # ------------------------------------------------------------------------------------------
    def load(self, source_index: int, item_index: int, rng: np.random.Generator) -> Optional[Instance]:
        return self.sources[source_index].load(item_index, rng)

    def draw(self, rng: np.random.Generator, split: str = "train",
             max_tries: int = 20) -> Tuple[int, Instance]:
        """A weighted random source, a uniform random item of it in ``split``, loaded; retries on
        items that yield nothing. Returns (source index, instance)."""
        p = self.probabilities(split)
        for _ in range(max_tries):
            s = int(rng.choice(len(p), p=p))
            idx = self.indices(split)[s]
            inst = self.load(s, int(idx[rng.integers(len(idx))]), rng)
            if inst is not None:
                return s, inst
        raise RuntimeError(f"{max_tries} draws from split {split!r} yielded no instance")

    def instances(self, split: str = "val", seed: Optional[int] = None) -> Iterator[Tuple[int, Instance]]:
        """Every item of ``split`` loaded once at full resolution, deterministically (item k uses
        the generator seeded with ``[seed, k]``); for a robot-user NoC evaluation on the split."""
        seed = self.seed if seed is None else seed
        for k, (s, i) in enumerate(self.items(split)):
            inst = self.load(s, i, np.random.default_rng([seed, k]))
            if inst is not None:
                yield s, inst
