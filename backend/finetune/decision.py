"""The promotion decision of a fine-tuning job, pure: per-instance results of the parent and the
candidate in, (promote, reason, confidence) out. No I/O, no model: unit-tested on numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional


class _PerInstance:
    """A per-instance number of the parent and the candidate (instance id -> value): the ids both
    have and the mean of either side over them."""
    parent: Mapping[str, float]
    candidate: Mapping[str, float]

    @property
    def ids(self) -> List[str]:
        return sorted(self.parent.keys() & self.candidate.keys())

    def mean(self, side: str) -> float:
        values = getattr(self, side)
        return sum(values[i] for i in self.ids) / max(1, len(self.ids))


def _shown(ids: List[str], k: int = 5) -> str:
    """The first k instance ids of a list, for a decision's reason."""
    return ", ".join(ids[:k]) + (" ..." if len(ids) > k else "")


@dataclass
class Paired(_PerInstance):
    """NoC@90 of the parent and the candidate on the same instances (instance id -> clicks)."""
    name: str
    parent: Dict[str, int]
    candidate: Dict[str, int]

    @property
    def better(self) -> List[str]:
        return [i for i in self.ids if self.candidate[i] < self.parent[i]]

    @property
    def worse(self) -> List[str]:
        return [i for i in self.ids if self.candidate[i] > self.parent[i]]

    def text(self) -> str:
        return (f"{self.name} NoC@90 {self.mean('parent'):.2f} -> {self.mean('candidate'):.2f} "
                f"({len(self.better)} of {len(self.ids)} instances better, {len(self.worse)} worse)")

    def to_dict(self) -> dict:
        return {"instances": len(self.ids), "parent": {"noc90": self.mean("parent")},
                "candidate": {"noc90": self.mean("candidate")}, "better": len(self.better),
                "worse": len(self.worse), "per_instance": {i: [self.parent[i], self.candidate[i]] for i in self.ids}}


@dataclass
class BoxPaired(_PerInstance):
    """IoU of the box prompt alone, parent and candidate, on the holdout (instance id -> IoU):
    measured when the parent reads boxes, so that a fine-tune cannot trade the box prompt away
    for clicks unseen (the NoC runs never use a box)."""
    parent: Dict[str, float]
    candidate: Dict[str, float]

    @property
    def worse(self) -> List[str]:
        return [i for i in self.ids if self.candidate[i] < self.parent[i]]

    def text(self) -> str:
        return f"holdout box alone mean IoU {self.mean('parent'):.3f} -> {self.mean('candidate'):.3f}"

    def to_dict(self) -> dict:
        return {"instances": len(self.ids), "parent": self.mean("parent"), "candidate": self.mean("candidate"),
                "worse": len(self.worse),
                "per_instance": {i: [round(self.parent[i], 4), round(self.candidate[i], 4)] for i in self.ids}}


def decide(holdout: Paired, bench: List[Paired], margin: float, min_gain: float = 0.0,
           confident_holdout: int = 0, box: Optional[BoxPaired] = None,
           box_margin: float = 0.02) -> tuple[bool, str, str]:
    """(promote, reason, confidence). Promote iff on the holdout the candidate's mean NoC@90 is
    lower than the parent's by more than min_gain and more instances got better than worse
    (paired, instance by instance), no benchmark's mean NoC@90 rose by more than margin, and (when
    `box` is given: the parent reads boxes) the holdout's box-alone mean IoU fell by at most
    box_margin. The reason names every failed condition and every benchmark that got worse, with
    its instances. confidence "low" when the holdout has fewer than `confident_holdout` instances
    (the reason says so)."""
    problems = []
    gain = holdout.mean("parent") - holdout.mean("candidate")
    if not gain > min_gain:
        problems.append(f"holdout NoC@90 {holdout.mean('candidate'):.2f} is not better than the parent's "
                        f"{holdout.mean('parent'):.2f}" + (f" by more than {min_gain:g}" if min_gain else ""))
    elif len(holdout.worse) >= len(holdout.better):
        problems.append(f"holdout: the mean improved but only {len(holdout.better)} of {len(holdout.ids)} "
                        f"instances got better and {len(holdout.worse)} worse")
    for b in bench:
        worse = b.mean("candidate") - b.mean("parent")
        if worse > margin + 1e-9:
            problems.append(f"{b.name} NoC@90 got worse by {worse:.2f} ({b.mean('parent'):.2f} -> "
                            f"{b.mean('candidate'):.2f}), more than the allowed {margin:g}; "
                            f"{len(b.worse)} of {len(b.ids)} instances worse ({_shown(b.worse)})")
    if box is not None and box.ids:
        drop = box.mean("parent") - box.mean("candidate")
        if drop > box_margin + 1e-9:
            problems.append(f"{box.text()}, a drop of {drop:.3f}, more than the allowed {box_margin:g}; "
                            f"{len(box.worse)} of {len(box.ids)} instances worse ({_shown(box.worse)})")
    if problems:
        reason = "; ".join(problems)
    else:
        reason = "; ".join([holdout.text()] + [b.text() for b in bench]) + (
            f" (benchmark margin {margin:g})" if bench else "; no benchmark configured") + (
            f"; {box.text()}" if box is not None and box.ids else "")
    confidence = "normal"
    if len(holdout.ids) < confident_holdout:
        confidence = "low"
        reason += (f"; low confidence: only {len(holdout.ids)} holdout instance(s), under "
                   f"FINETUNE_CONFIDENT_HOLDOUT={confident_holdout} (annotate more tasks)")
    return not problems, reason, confidence
