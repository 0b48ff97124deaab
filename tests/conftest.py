"""Shared fixtures. The repository root is put on sys.path so tests import model/, backend/, training/."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests run on CPU with two OpenMP threads unless OMP_NUM_THREADS says otherwise: small passes gain
# nothing from more, and more oversubscribe a machine that runs other work.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Idle OpenMP threads sleep instead of spinning: on a loaded machine (a training run beside the
# tests) spinning threads made a small forward pass 36x slower; on an idle one it costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The tests' predictors run in PyTorch unless INFERENCE_RUNTIME says otherwise: converting each test's
# checkpoint to OpenVINO would cost seconds apiece and fill a cache. tests/test_model_runtime.py
# tests the runtimes themselves.
os.environ.setdefault("INFERENCE_RUNTIME", "torch")

DATASETS = Path(os.environ.get("SIMCLICK_DATA_ROOT", ROOT.parent / "shared" / "datasets"))

# The Redis db each test module flushes, in one table: make test runs modules in two processes at
# once, and two modules sharing a db flushed each other's jobs. (Tests on db 0 keep to key names of
# their own and flush nothing.)
REDIS_DBS = {"test_security_limits": 7, "test_security_queue": 8, "test_jobs_enqueue": 9,
             "test_jobs_enqueue_lock": 10, "test_jobs_worker": 11, "test_jobs_stop": 12,
             "test_jobs_e2e_labelstudio": 13, "test_security_fuzz": 14, "test_jobs_attempts": 15}
assert len(set(REDIS_DBS.values())) == len(REDIS_DBS), "two test modules share a Redis db"


# -- shared by the fine-tuning tests (test_jobs_*, test_registry*, test_finetune_*) ----------------
import pytest  # noqa: E402


_TINY = {}


def pytest_collection_modifyitems(config, items):
    """Two tiers (markers in pyproject.toml): a test is `e2e` when its module or itself says so
    (a real Label Studio, Redis, PostgreSQL, browser, or a real training run); every other test is
    `unit`. `make test-fast` = -m "not e2e"; `-m unit` selects the same tests."""
    for item in items:
        if item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.unit)


def make_tiny_checkpoint(path, seed=0, version="tiny"):
    """A small real network (efficientnet-lite2 backbone, 128 px input, 32-channel heads, random
    init; `seed` perturbs every weight, so each seed is another model) saved as a SimClick
    checkpoint: cheap enough to fine-tune and evaluate in tests."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.network import InteractiveSegNet

    if "net" not in _TINY:      # building the backbone costs seconds: once per process
        torch.manual_seed(0)
        _TINY["net"] = InteractiveSegNet(ModelConfig(input_size=128, aspp_channels=32, decoder_channels=32),
                                         pretrained=False)
    net = _TINY["net"]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    if seed:
        g = torch.Generator().manual_seed(seed)
        for k, v in state.items():
            if v.is_floating_point() and v.numel() > 1:
                state[k] = v + 0.01 * v.std().nan_to_num(0.0) * torch.randn(v.shape, generator=g)
    return save_checkpoint(path, state, net.config, {"version": version})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


@pytest.fixture(scope="session")
def label_studio_server(tmp_path_factory):
    """One real Label Studio 1.23 for the whole session (tests/e2e/ls_harness.py); skipped only when
    it is not installed and the package index is unreachable. SIMCLICK_LS_URL + SIMCLICK_LS_TOKEN
    reuse a running server."""
    sys.path.insert(0, str(Path(__file__).parent / "e2e"))
    import ls_harness

    if os.environ.get("SIMCLICK_LS_URL"):
        ls = ls_harness.LabelStudio(tmp_path_factory.mktemp("ls"), token=os.environ["SIMCLICK_LS_TOKEN"])
        ls.url = os.environ["SIMCLICK_LS_URL"].rstrip("/")
        yield ls
        return
    try:
        ls_harness.ensure_installed()
    except ls_harness.IndexUnreachable as e:
        pytest.skip(f"cannot install Label Studio for the end-to-end test: {e}")
    ls = ls_harness.LabelStudio(tmp_path_factory.mktemp("ls"))
    try:
        ls.start()
        yield ls
    finally:
        ls.stop()


@pytest.fixture(scope="session")
def label_studio_pat(label_studio_server):
    """The admin's personal access token on that server. Label Studio 1.23 gives a user one valid
    token (a second POST /api/token/ is 409), so every test of the session must share this one.
    SIMCLICK_LS_PAT: the token of a reused server."""
    if os.environ.get("SIMCLICK_LS_PAT"):
        return os.environ["SIMCLICK_LS_PAT"]
    r = label_studio_server.api("POST", "/api/token/")
    assert r.status_code == 201, f"cannot create a personal access token: {r.status_code} {r.text[:300]}"
    return r.json()["token"]


# -- shared by the security tests (test_security_*) -------------------------------------------------
@pytest.fixture(scope="module")
def one_torch_thread():
    """Small convolutions on one thread: two threads on busy cores spin-wait for each other (a
    64-px pass took 0.9 s instead of 25 ms). Restored after the module that asked for it."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_predictor(tiny_checkpoint):
    """The small real model, coarse pass only at 64 px: the security tests are about what the
    backend does around the model, and the machine running them may be busy."""
    from model.predictor import Predictor
    return Predictor.load(str(tiny_checkpoint), coarse_size=64, refine=False)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def trim() -> None:
    """Hand the memory this process has freed back to the system (glibc's malloc_trim), so that the
    RSS counts what is held: freed memory the allocator kept would absorb a new allocation unseen."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_mb() -> float:
    return _status_mb("VmRSS")


def kept_mb(fn) -> float:
    """How much more RSS this process holds after fn() than before it (MB)."""
    trim()
    before = rss_mb()
    fn()
    trim()
    return rss_mb() - before


def peak_growth_mb(fn):
    """(fn(), how far this process's peak RSS rose above its RSS while fn ran, in MB). The peak is
    reset first (Linux: 5 > /proc/self/clear_refs), so what earlier tests allocated does not count."""
    trim()
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_mb()
    result = fn()
    return result, _status_mb("VmHWM") - before
