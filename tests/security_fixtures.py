"""Fixtures shared by the test_security_* modules, imported by name into each (tests/conftest.py is
left to the suite-wide ones): pytest finds a fixture in the module that imports it."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small convolutions on one thread: two threads on busy cores spin-wait for each other (a
    64-px pass took 0.9 s instead of 25 ms). Restored after the module that imports this."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    """The small real model, coarse pass only at 64 px: these tests are about what the backend
    does around the model, and the machine running them may be busy."""
    from model.predictor import Predictor
    return Predictor.load(str(tiny_checkpoint), coarse_size=64, refine=False)
