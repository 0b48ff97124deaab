"""What the backend needs of a predictor and of its click session, as typing Protocols.

model.predictor.Predictor and its Session satisfy them; the backend (backend/engine.py,
backend/model_router.py, backend/app.py) is typed against these, so another predictor (a test double, an
evaluation wrapper) only has to provide these members. Static typing only: nothing checks them at
run time.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .predictor import PredictorOptions


class ClickSession(Protocol):
    """One image being annotated. Every call that predicts returns the full-resolution probability
    map (float H x W); each call is one undo step."""

    def add_clicks(self, clicks: Sequence[tuple[float, float, bool]]) -> np.ndarray: ...

    def set_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray: ...

    def undo(self) -> np.ndarray | None: ...

    def reset(self) -> None: ...

    # Replicas share a session through Redis: its state (clicks, undo steps, previous mask) out and
    # back in. `restorable` is False where the state would not give the same next mask.
    @property
    def restorable(self) -> bool: ...

    def state(self) -> dict: ...

    def restore(self, state: dict) -> None: ...


class ClickPredictor(Protocol):
    """Loaded weights that open a session per image. `accepts_box` (a model trained with box
    prompts) is optional: the backend reads it with getattr, default False."""

    version: str
    options: PredictorOptions          # the backend reads max_history (the session's undo depth)

    def open(self, image: np.ndarray, prior_mask: np.ndarray | None = None) -> ClickSession: ...
