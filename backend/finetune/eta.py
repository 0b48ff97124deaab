"""How long a fine-tuning job has left: its training steps left at the measured seconds per step,
plus its evaluation clicks left (parent's, then candidate's) at the measured seconds per click.

Until the job has measured a speed, the previous job's on this host (`rates`, the summary's
"rates") stands in; with neither, no ETA (None). The number of evaluation clicks is estimated
before they run (an instance stops at IoU 0.90, so it costs its NoC@90): the parent's from its
earlier results where the history has them, else `GUESS_CLICKS` per instance; the candidate's
from the parent's.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import numpy as np

GUESS_CLICKS = 8    # clicks per instance before anything is known (the base model's NoC@90 on DAVIS: ~10)


class Eta:
    def __init__(self, steps: int, rates: dict, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.steps = steps                   # the run's total steps: `step` below counts from 0 to it
        self.steps_left = steps
        self.step_s: Optional[float] = rates.get("train_step_s")
        self.click_s: Optional[float] = rates.get("eval_click_s")
        self.eval_clicks = 0                 # evaluation clicks still ahead, both models (estimated)
        self.measured: Dict[str, float] = {}
        self._train0: Optional[tuple] = None
        self._eval_t: Optional[float] = None     # when the current evaluation pass started or last counted
        self._eval_spent = 0.0
        self._eval_done = 0

    def step(self, step: int) -> dict:
        """At training step `step` of `steps` (first call: the reference point, start-up excluded)."""
        now = self.clock()
        if self._train0 is None:
            self._train0 = (now, step)
        elif step > self._train0[1]:
            self.step_s = self.measured["train_step_s"] = (now - self._train0[0]) / (step - self._train0[1])
        self.steps_left = max(0, self.steps - step)
        return self.left()

    def eval_start(self) -> dict:
        """An evaluation pass starts (its start-up, loading the model in each worker, is counted
        as evaluation time)."""
        self._eval_t = self.clock()
        return self.left()

    def clicks(self, n: int) -> dict:
        """`n` more evaluation clicks done (one instance), in the pass started last."""
        now = self.clock()
        if self._eval_t is not None:
            self._eval_spent += now - self._eval_t
        self._eval_t = now
        self._eval_done += n
        self.eval_clicks = max(0, self.eval_clicks - n)
        if self._eval_done:
            self.click_s = self.measured["eval_click_s"] = self._eval_spent / self._eval_done
        return self.left()

    def left(self) -> dict:
        if (self.steps_left > 0 and self.step_s is None) or (self.eval_clicks > 0 and self.click_s is None):
            return {"eta_s": None}
        return {"eta_s": round(self.steps_left * (self.step_s or 0.0) + self.eval_clicks * (self.click_s or 0.0), 1)}


def click_seconds(predictor, sample, clicks: int = 3) -> float:
    """Seconds per click of `predictor` on one instance (image encoding included, as in the
    evaluation): the ETA's measure of the evaluation speed when nothing has been measured."""
    loaded = sample.load()
    ys, xs = np.nonzero(loaded.gt)
    k = len(ys) // 2
    t0 = time.perf_counter()
    session = predictor.open(loaded.image)
    for _ in range(clicks):
        session.add_click(float(xs[k]), float(ys[k]), True)
    return (time.perf_counter() - t0) / clicks
