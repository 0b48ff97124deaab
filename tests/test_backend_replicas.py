"""Several backend replicas behind a load balancer that is not sticky: a click that lands on the
other replica gives the mask it would have got had it stayed. Two real `python -m backend`
processes, requests alternating between them, against one process answering them all."""
import contextlib
import functools
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from backend.bench import keypoint, predict_body, rectangle
from backend.labelstudio.masks import rle_to_mask

from .conftest import ROOT

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from ls_harness import free_port, wait_http  # noqa: E402  (the e2e harness: one way to start and wait)

W, H = 160, 120


def redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=0.5).ping())
    except Exception:
        return False


@contextlib.contextmanager
def backend_process(workdir: Path, name: str, **env_extra):
    port = free_port()
    log_path = workdir / f"{name}.log"
    env = dict(os.environ, LOG_LEVEL="INFO", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               MODEL_REGISTRY="off", **env_extra)
    env.pop("REDIS_URL", None) if "REDIS_URL" not in env_extra else None
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "backend", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 120, proc, log_path)
        yield {"url": url, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A served test image (an ellipse and a square on a textured background)."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    img = (rng.random((H, W, 3)) * 60 + 40).astype(np.uint8)
    cv2.ellipse(img, (60, 60), (35, 25), 0, 0, 360, (200, 80, 40), -1)
    cv2.rectangle(img, (110, 20), (150, 70), (40, 160, 220), -1)
    cv2.imwrite(str(d / "scene.png"), img)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(d)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two replicas of the shipped model (a random one answers empty masks: nothing to compare),
    sharing Redis when it runs (the box prompt memory)."""
    d = tmp_path_factory.mktemp("replicas")
    extra = {"MODEL_CHECKPOINT": "default"}
    if redis_up():
        extra["REDIS_URL"] = "redis://127.0.0.1:6379/0"
    with backend_process(d, "a", **extra) as a, backend_process(d, "b", **extra) as b:
        yield a, b


def mask_of(answer) -> np.ndarray:
    m = np.zeros((H, W), bool)
    for item in answer["results"][0]["result"]:
        m |= rle_to_mask(item["value"]["rle"], H, W)
    return m


def ask(url, image_url, regions, task=1) -> np.ndarray:
    r = requests.post(url + "/predict", json=predict_body(task, image_url, regions), timeout=120)
    assert r.status_code == 200, r.text
    return mask_of(r.json())


CLICKS = [(60, 60, True), (125, 45, True), (30, 60, False), (90, 62, True), (140, 30, False)]


@pytest.mark.e2e  # two backend processes (and Redis when it is up)
def test_alternating_replicas_give_the_masks_of_one(replicas, images):
    """Label Studio sends every keypoint so far with each click, so the replica that did not see the
    earlier clicks replays them; its mask equals the one the cached session gives."""
    a, b = replicas
    stem = f"{images}/scene.png"
    one = f"{stem}?one-{uuid.uuid4().hex}"          # another URL: a session of its own
    both = f"{stem}?both-{uuid.uuid4().hex}"
    kps = [keypoint(x, y, W, H, pos, i) for i, (x, y, pos) in enumerate(CLICKS)]
    masks_one, masks_both = [], []
    for k in range(1, len(kps) + 1):
        masks_one.append(ask(a["url"], one, kps[:k]))
        masks_both.append(ask((a, b)[(k + 1) % 2]["url"], both, kps[:k]))   # a, b, a, b, a
    # An undo (the last keypoint deleted) on the other replica, then a moved keypoint.
    undo, moved = kps[:3], kps[:2] + [keypoint(28, 58, W, H, False, 2)]
    for regions, k in ((undo, 0), (moved, 1)):
        masks_one.append(ask(a["url"], one, regions))
        masks_both.append(ask((a, b)[k]["url"], both, regions))
    assert any(m.any() for m in masks_one)
    for k, (m1, m2) in enumerate(zip(masks_one, masks_both)):
        assert np.array_equal(m1, m2), f"request {k + 1}: {int((m1 ^ m2).sum())} pixels differ"
    # The other replica's first request (2 keypoints): with Redis it continued the stored session
    # (one run), without it replayed both.
    expected = "2c/1run" if redis_up() else "2c/2run"
    assert re.search(expected, b["log"].read_text()), b["log"].read_text()[-2000:]


@pytest.mark.skipif(not redis_up(), reason="no Redis at 127.0.0.1:6379")
@pytest.mark.e2e  # two backend processes and Redis
def test_a_box_drawn_on_one_replica_applies_to_keypoints_on_the_other(replicas, images):
    """Label Studio sends a smart rectangle in its own request and the later keypoints without it;
    the box is remembered in Redis, so the other replica crops to it as the first one would."""
    a, b = replicas
    stem = f"{images}/scene.png"
    one = f"{stem}?box-one-{uuid.uuid4().hex}"
    both = f"{stem}?box-both-{uuid.uuid4().hex}"
    box = rectangle((20, 30, 100, 92), W, H)
    kp = [keypoint(40, 50, W, H, True, 0), keypoint(95, 85, W, H, False, 1)]
    seq = [[box], kp[:1], kp[:2]]
    masks_one = [ask(a["url"], one, r) for r in seq]
    masks_both = [ask((a, b)[k % 2]["url"], both, r) for k, r in enumerate(seq)]
    for k, (m1, m2) in enumerate(zip(masks_one, masks_both)):
        assert np.array_equal(m1, m2), f"request {k + 1}: {int((m1 ^ m2).sum())} pixels differ"
    assert masks_one[1].any()
    # The crop applied on the replica that never saw the box: nothing outside box + margin.
    assert not masks_both[1][:, 112:].any() and not masks_both[1][:20, :].any()


def test_shared_prompts_fall_back_and_back_off_when_redis_fails():
    from backend.engine import SharedPrompts

    class Down:
        calls = 0

        def __getattr__(self, name):
            def fail(*a, **k):
                Down.calls += 1
                raise ConnectionError("redis down")
            return fail

    shared = SharedPrompts(Down(), ttl=60, retry_after=30)
    key = SharedPrompts.key("http://x/a.jpg", "image", "Object")
    assert shared.get(key) == (False, None) and Down.calls == 1
    shared.put(key, (1, 2, 3, 4))
    assert shared.get(key) == (False, None) and Down.calls == 1      # backing off: Redis not asked again


def test_shared_prompts_config():
    from backend.config import Config
    from model.settings import SettingError

    assert Config.from_env({}).shared_prompts == "auto"
    with pytest.raises(SettingError, match="REDIS_URL"):
        Config.from_env({"SHARED_PROMPTS": "on"})
    from backend.app import make_shared_prompts

    assert make_shared_prompts(Config.from_env({})) is None
    assert make_shared_prompts(Config.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0", "SHARED_PROMPTS": "off"})) is None
    assert make_shared_prompts(Config.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0"})) is not None


@pytest.mark.skipif(not redis_up(), reason="no Redis at 127.0.0.1:6379")
@pytest.mark.e2e  # real Redis
def test_shared_prompts_round_trip_in_redis():
    import redis

    from backend.engine import SharedPrompts

    shared = SharedPrompts(redis.Redis.from_url("redis://127.0.0.1:6379/0"), ttl=30)
    key = SharedPrompts.key(f"http://x/{uuid.uuid4().hex}.jpg", "image", "Object")
    assert shared.get(key) == (True, None)
    shared.put(key, (1.5, 2.0, 30.25, 40.0))
    assert shared.get(key) == (True, (1.5, 2.0, 30.25, 40.0))
    assert 0 < shared.client.ttl(key) <= 30
    shared.put(key, None)
    assert shared.get(key) == (True, None)


NGINX = os.environ.get("SIMCLICK_NGINX") or __import__("shutil").which("nginx")


@pytest.mark.skipif(not NGINX, reason="no nginx binary (PATH or SIMCLICK_NGINX)")
@pytest.mark.e2e  # two backend processes (and Redis when it is up)
def test_through_the_compose_nginx_config(replicas, images, tmp_path):
    """docker/nginx/simclick-replicas.conf.template in front of the two replicas (addresses
    instead of compose's DNS names): round robin, every click answered as by one process."""
    a, b = replicas
    servers = " ".join(f"server {u['url'].split('//')[1]};" for u in (a, b))
    port = free_port()
    conf = (ROOT / "docker" / "nginx" / "simclick-replicas.conf.template").read_text()
    conf = conf.replace("${SIMCLICK_BACKENDS}", servers).replace("listen 9090;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("resolver 127.0.0.11", "# resolver 127.0.0.11")   # no Docker DNS here
    (tmp_path / "logs").mkdir()
    (tmp_path / "default.conf").write_text(conf)
    temp = tmp_path / "tmp"
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/logs/error.log; daemon off;\n"
        "events {}\nhttp {\n  access_log off;\n"
        + "".join(f"  {d}_temp_path {temp};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  include {tmp_path}/default.conf;\n}}\n")
    proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    lb = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if requests.get(lb + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        stem = f"{images}/scene.png"
        one = f"{stem}?lb-one-{uuid.uuid4().hex}"
        via = f"{stem}?lb-via-{uuid.uuid4().hex}"
        kps = [keypoint(x, y, W, H, pos, i) for i, (x, y, pos) in enumerate(CLICKS[:4])]
        before = [u["log"].read_text().count("predict task=") for u in (a, b)]
        for k in range(1, len(kps) + 1):
            m1, m2 = ask(a["url"], one, kps[:k]), ask(lb, via, kps[:k])
            assert np.array_equal(m1, m2), f"click {k}: {int((m1 ^ m2).sum())} pixels differ"
        after = [u["log"].read_text().count("predict task=") for u in (a, b)]
        assert after[1] - before[1] >= 1 and (after[0] - before[0]) - len(kps) >= 1   # both replicas answered
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.skipif(not redis_up(), reason="no Redis at 127.0.0.1:6379")
@pytest.mark.e2e  # real Redis
def test_a_session_continued_from_redis_equals_the_cached_one():
    """Two replicas (Segmenters with their own session caches) sharing Redis: the one that misses
    the session restores the stored state and runs only the new click; masks, scores and what
    an undo or a moved click does are those of one replica answering everything."""
    import redis

    from backend.engine import ByteCache, Segmenter, SharedPrompts
    from backend.payload import Click, Prompt
    from model.predictor import Predictor

    predictor = Predictor.load("default", device="cpu")
    shared = SharedPrompts(redis.Redis.from_url("redis://127.0.0.1:6379/0"), ttl=120, max_session_bytes=4 << 20)
    a, b = (Segmenter(predictor, ByteCache(1 << 30, 600), shared=shared) for _ in range(2))
    one = Segmenter(predictor, ByteCache(1 << 30, 600))
    rng = np.random.default_rng(1)
    image = (rng.random((H, W, 3)) * 60 + 40).astype(np.uint8)
    cv2.ellipse(image, (60, 60), (35, 25), 0, 0, 360, (200, 80, 40), -1)
    key = f"http://x/{uuid.uuid4().hex}.png"
    clicks = [Click(x, y, pos) for x, y, pos in CLICKS]
    seqs = [clicks[:k] for k in range(1, len(clicks) + 1)] + [clicks[:3], clicks[:2] + [Click(28, 58, False)]]
    ran = []
    for i, seq in enumerate(seqs):
        prompt = Prompt(label="Object", to_name="image", clicks=list(seq))
        o1 = one.segment(key + "?one", image, prompt)
        o2 = (a, b)[i % 2].segment(key, image, prompt)
        assert np.array_equal(o1.full_mask(H, W), o2.full_mask(H, W)), f"request {i + 1}"
        assert o1.score == pytest.approx(o2.score, abs=1e-3)   # an undo's float16 history
        ran.append(o2.ran)
    assert any(o.any() for o in [one.segment(key + "?one", image, Prompt("Object", "image", clicks)).full_mask(H, W)])
    # Clicks 2..5 each landed on the replica that did not run the click before: one run each,
    # not a replay. An undo back to a restored state and the moved click replay (3 runs each).
    assert ran == [1, 1, 1, 1, 1, 3, 3], ran


def test_undo_history_keeps_each_pixel_on_its_side_of_the_threshold():
    from types import SimpleNamespace

    from model.predictor import Session

    prob = np.array([0.50001, 0.49999, 0.5, 0.5002, 0.7, 0.0], np.float32)
    fake = SimpleNamespace(predictor=SimpleNamespace(options=SimpleNamespace(threshold=0.5)), prob=prob)
    h = Session._history_copy(fake)
    assert h.dtype == np.float16
    assert np.array_equal(h.astype(np.float32) > 0.5, prob > 0.5)
    assert np.allclose(h, prob, atol=1e-3)
