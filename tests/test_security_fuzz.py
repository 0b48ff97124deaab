"""Fuzz /predict and /webhook (issues 11, 22): whatever the body, the answer is never a 5xx (Redis is
up, the images are local), the server stays up, and its memory stays flat.

Hypothesis mutates real Label Studio bodies (keypoints, a smart rectangle, a brush stroke, a batch
request, the captured webhooks, bodies with several regions and labels, images in every format the
backend reads and some it refuses: ICO, an ICO hiding a PNG over the limit, 16-bit and float TIFF,
16-bit PNG, animated GIF and WebP, ICNS): 1-3 values anywhere in the tree are replaced by random
JSON or by values known to hurt (huge and negative numbers, NaN, paths out of /data, broken URLs,
sizes over the limits, those images). Derandomized (a fixed seed), no example database: the same run
on every machine. The real app with a small real model and the real Redis (db 14) behind /webhook.
"""
from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from backend.app import create_app
from backend.bench import keypoint, predict_body
from backend.config import Config
from backend.labelstudio.masks import mask_to_rle
from backend.membench import data_uri, ico_bomb

from .conftest import REDIS_DBS
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIX = Path(__file__).parent / "fixtures" / "labelstudio"
REDIS_DB = REDIS_DBS["test_security_fuzz"]
W, H = 128, 96
EXAMPLES = 500          # per route: about 5 s for both


def _uri() -> str:
    img = np.zeros((H, W, 3), np.uint8)
    img[30:70, 40:90] = (200, 60, 60)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


URI = _uri()


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image_uris() -> list:
    """The 128x96 test image in the formats an attacker would pick, and an ICO bomb."""
    rgb = Image.open(io.BytesIO(base64.b64decode(URI.split(",", 1)[1]))).convert("RGB")
    ramp16 = Image.fromarray((np.arange(W * H).reshape(H, W) * 5).astype(np.uint16))
    floats = Image.fromarray(np.linspace(0, 1, W * H, dtype=np.float32).reshape(H, W), "F")
    frames = [rgb, rgb.rotate(180)]
    files = [_encoded(rgb, "ICO", sizes=[(W, H)]), ico_bomb(8000), _encoded(ramp16, "TIFF"),
             _encoded(floats, "TIFF"), _encoded(ramp16, "PNG"), _encoded(rgb, "ICNS"),
             _encoded(rgb, "GIF", save_all=True, append_images=frames[1:]),
             _encoded(rgb, "WEBP", save_all=True, append_images=frames[1:], lossless=True)]
    return [data_uri(f, "image/x") for f in files]


IMAGES = _image_uris()
TWO_LABELS = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
              '<Label value="Object"/><Label value="Other"/></BrushLabels><KeyPointLabels name="kp" '
              'toName="image" smart="true"><Label value="Object"/><Label value="Other"/></KeyPointLabels>'
              '<RectangleLabels name="rect" toName="image" smart="true"><Label value="Object"/>'
              '<Label value="Other"/></RectangleLabels></View>')


def _capture(name):
    return json.loads((FIX / name).read_text())["body"]


def _predict_bodies() -> list:
    stroke = np.zeros((H, W), bool)
    stroke[40:50, 50:60] = True
    rect = {"original_width": W, "original_height": H, "image_rotation": 0, "type": "rectanglelabels",
            "from_name": "rect", "to_name": "image", "value": {"x": 30, "y": 30, "width": 40, "height": 40,
                                                               "rotation": 0, "rectanglelabels": ["Object"]}}
    brush = {"original_width": W, "original_height": H, "image_rotation": 0, "type": "brushlabels",
             "from_name": "tag", "to_name": "image",
             "value": {"format": "rle", "rle": mask_to_rle(stroke), "brushlabels": ["Object"]}}
    batch = predict_body(1, URI, [])
    batch["params"]["context"] = None
    other = copy.deepcopy(brush)
    other["value"]["brushlabels"] = ["Other"]
    several = predict_body(1, URI, [keypoint(64, 50, W, H), keypoint(20, 20, W, H, i=1, label="Other"),
                                    rect, other, keypoint(70, 40, W, H, False, 2)])
    several["label_config"] = TWO_LABELS
    strokes = predict_body(1, URI, [brush, copy.deepcopy(brush), other])
    strokes["label_config"] = TWO_LABELS
    return [predict_body(1, URI, [keypoint(64, 50, W, H), keypoint(70, 40, W, H, False, 1)]),
            predict_body(1, URI, [rect]), predict_body(1, URI, [brush]), batch, several, strokes,
            _capture("012_POST_predict_interactive.json")] + \
        [predict_body(1, uri, [keypoint(64, 50, W, H)]) for uri in IMAGES]


def _webhook_bodies() -> list:
    return [_capture("016_POST_webhook_ANNOTATION_CREATED.json"),
            _capture("017_POST_webhook_START_TRAINING.json"),
            {"action": "PROJECT_UPDATED", "project": {"id": 1}}]


NUMBERS = [-1, 0, 1, 2 ** 63, 10 ** 100, 10 ** 400, -10 ** 400, 1e308, -0.0, 1e-320, float("nan"),
           float("inf"), 30000, 8000, "50", True, None]
URLS = ["", "é" * 40, "\x00", "../../etc/passwd", "/data/../api/projects/", "/data/upload/%2e%2e/api/",
        "/data/local-files/?d=../../etc/passwd", "http://127.0.0.1:9/x.png", "http://h:1:2/",
        "http://a\\@127.0.0.1:9/", "http://u:p@127.0.0.1:9/", "file:///etc/passwd", "data:image/png;base64,!!!",
        "data:,x", "s3://b/k.png", "/dev/zero", "http://[::1/", "ftp://127.0.0.1/x"] + IMAGES
OTHER = [[], {}, [[[[]]]], [0, 0, 0, 16, 255], list(range(300)), "keypointlabels", "brushlabels",
         "rectanglelabels", "rle", "START_TRAINING", "ANNOTATION_CREATED"]
NASTY = st.sampled_from(NUMBERS + URLS + OTHER)
LEAF = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12)
JSON = st.recursive(LEAF, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                    max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


# Half the mutations hit the fields that decide what runs: sizes, coordinates, the image URL, ids.
HOT = {"original_width", "original_height", "x", "y", "width", "height", "rle", "image", "project",
       "id", "is_positive", "rotation", "result", "context", "type", "annotation", "task", "action"}


@st.composite
def mutated(draw, bases):
    body = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(body))
        hot = [p for p in paths if p and p[-1] in HOT]
        path = draw(st.sampled_from(hot) if hot and draw(st.booleans()) else st.sampled_from(paths))
        key = path[-1] if path else None
        pool = st.sampled_from(URLS) if key == "image" else st.sampled_from(NUMBERS) if key in HOT else NASTY
        value = copy.deepcopy(draw(pool | NASTY | JSON))      # NASTY holds shared lists
        if not path:
            body = value
            continue
        parent = body
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1]] = value
    return body


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def app(tiny_checkpoint, tmp_path_factory):
    from model.predictor import Predictor

    conn = redis.Redis(db=REDIS_DB)
    conn.flushdb()
    cfg = Config.from_env({"REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}", "TRAINING_QUEUE": "simclick-test-fuzz",
                           "DATA_DIR": str(tmp_path_factory.mktemp("fuzz")), "SESSION_CACHE_MB": "32",
                           "IMAGE_CACHE_MB": "16", "FETCH_TIMEOUT": "2"})
    app = create_app(cfg, Predictor.load(str(tiny_checkpoint), coarse_size=64, refine=False))
    # Label Studio connects project 1 (the captures'): its training webhooks reach the queue. (No
    # hostname: the images stay local.)
    setup = dict(json.loads((FIX / "007_POST_setup.json").read_text())["body"], hostname="", access_token="")
    assert app.test_client().post("/setup", json=setup).status_code == 200
    yield app
    conn.flushdb()


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _check(r, body):
    assert r.status_code < 500, (r.status_code, r.get_data(as_text=True)[:500], json.dumps(body, default=str)[:1500])
    if r.status_code >= 400:
        assert r.get_json()["error"]


@pytest.mark.e2e  # slow (5.8 s of CPU): the unit tier stays within a minute (issue 24)
def test_fuzz_predict_and_webhook(app):
    c = app.test_client()
    for body in _predict_bodies():                  # warm up: caches, model, allocator
        c.post("/predict", json=body)
    before = rss_mb()

    @FUZZ
    @given(mutated(_predict_bodies()))
    def predict(body):
        _check(c.post("/predict", json=body), body)

    @FUZZ
    @given(mutated(_webhook_bodies()))
    def webhook(body):
        _check(c.post("/webhook", json=body), body)

    predict()
    webhook()
    after = rss_mb()
    assert c.get("/health").status_code == 200
    print(f"\nfuzz: RSS {before:.0f} MB -> {after:.0f} MB")
    assert after - before < 80, f"RSS grew {after - before:.0f} MB over the fuzz run"
