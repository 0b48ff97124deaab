"""Flask-client tests of the ML backend with the real predictor, replaying requests captured from
Label Studio 1.23.2 (tests/fixtures/labelstudio). Images come over real HTTP from a local server
that checks tokens like Label Studio (legacy tokens, personal access tokens with refresh)."""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.app import create_app
from backend.bench import keypoint
from backend.config import Config
from backend.labelstudio.masks import mask_to_rle, rle_to_mask
from model.images import load_image, load_mask
from training.evaluation.clicker import RobotClicker

from .conftest import DATASETS

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from image_server import ImageServer, make_jwt  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "labelstudio"
BERKELEY = DATASETS / "Berkeley"
STEM = "376043"   # one object, well inside the frame
ENQUEUED = []


def record_enqueue(event):
    """TRAINING_ENQUEUE target used by test_webhooks_replayed (a real import path)."""
    ENQUEUED.append(event.summary())
    return f"job-{len(ENQUEUED)}"


def capture(name):
    return json.loads((FIX / name).read_text())


@pytest.fixture(scope="module")
def predictor():
    from model.predictor import Predictor
    return Predictor.load(os.environ.get("MODEL_CHECKPOINT", "default"))


@pytest.fixture(scope="module")
def sample():
    img_path = BERKELEY / "images" / f"{STEM}.jpg"
    if not img_path.exists():
        pytest.fail(f"test image missing: {img_path} (set SIMCLICK_DATA_ROOT to the datasets folder)")
    gt = load_mask(BERKELEY / "masks" / f"{STEM}.png")
    return img_path.read_bytes(), load_image(img_path), gt


@pytest.fixture(scope="module")
def server(sample):
    with ImageServer({"img.jpg": sample[0]}, slow_s=2.0) as s:
        yield s


@pytest.fixture(scope="module")
def silent():
    """A server that accepts connections (the kernel's backlog) and never answers."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def make_app(predictor, **env):
    cfg = Config.from_env({k.upper(): str(v) for k, v in env.items()})
    return create_app(cfg, predictor)


def interactive_body(image_url, regions, label_config=None):
    """The captured interactive /predict, with our image and regions in place of the capture's."""
    body = copy.deepcopy(capture("012_POST_predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = image_url
    if label_config is not None:
        body["label_config"] = label_config
    body["params"]["context"]["result"] = regions
    return body


def interior_point(gt):
    """Where the standard robot user puts its first click: the object's deepest pixel."""
    c = RobotClicker(gt).next_click(np.zeros_like(gt))
    return c.x, c.y


def runs_logged(caplog):
    """The 'label:Nc/Mrun' stats of the last predict log line: (clicks, network runs)."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("predict task=")]
    m = re.search(r":(\d+)c(?:\+box)?/(\d+)run", lines[-1])
    return int(m.group(1)), int(m.group(2))


def decoded(resp):
    """-> list of (item, mask) of a /predict answer."""
    out = []
    for item in resp.get_json()["results"][0]["result"]:
        out.append((item, rle_to_mask(item["value"]["rle"], item["original_height"], item["original_width"])))
    return out


def reference_mask(predictor, image, clicks, threshold=0.5):
    s = predictor.open(image)
    prob = None
    for x, y, pos in clicks:
        prob = s.add_click(x, y, pos)
    return prob > threshold


# -- protocol replays -------------------------------------------------------------------------------
def test_health_setup_versions_replayed(predictor):
    c = make_app(predictor).test_client()
    for name in ("006_GET_health.json", "007_POST_setup.json", "008_GET_health.json"):
        cap = capture(name)
        r = c.open(cap["path"], method=cap["method"], json=cap["body"],
                   headers={"User-Agent": cap["headers"]["User-Agent"]})
        assert r.status_code == 200, r.get_json()
    assert c.get("/health").get_json()["status"] == "UP"
    assert c.post("/setup", json=capture("007_POST_setup.json")["body"]).get_json() == {
        "model_version": predictor.version}
    assert c.get("/versions").get_json()["versions"] == [predictor.version]


def test_setup_refuses_a_config_without_mask_output(predictor):
    c = make_app(predictor).test_client()
    body = capture("007_POST_setup.json")["body"]
    body["schema"] = '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>'
    r = c.post("/setup", json=body)
    assert r.status_code == 400 and "BrushLabels" in r.get_json()["error"]
    # The message is also the reason phrase: Label Studio shows only the status line.
    assert "BrushLabels" in r.status


def test_interactive_predict_replayed_with_legacy_token(predictor, sample, server):
    _, image, gt = sample
    h, w = gt.shape
    app = make_app(predictor, label_studio_url=server.url, label_studio_api_key=server.legacy_token)
    c = app.test_client()
    x, y = interior_point(gt)
    body = interactive_body("/data/upload/1/img.jpg", [keypoint(x, y, w, h)])
    n_before = len(server.requests)
    r = c.post("/predict", json=body)
    assert r.status_code == 200, r.get_json()
    got = server.requests[n_before:]
    assert [(m, p, a) for m, p, a in got] == [("GET", "/data/upload/1/img.jpg", f"Token {server.legacy_token}")]
    data = r.get_json()
    assert set(data["results"][0]) == {"result", "score", "model_version"}
    assert data["results"][0]["model_version"] == predictor.version
    expected = reference_mask(predictor, image, [(x, y, True)])
    items = decoded(r)
    if not expected.any():
        assert items == [], "an empty mask must give no region"
        return
    # Same fields as the answer Label Studio relayed to the editor in the capture.
    (ls_answer,) = [json.loads((FIX / "ls_interactive_annotating_response.json").read_text().splitlines()[0])]
    ls_item = ls_answer["data"]["result"][0]
    (item, mask), = items
    assert set(item) == set(ls_item)
    assert set(item["value"]) == set(ls_item["value"])
    assert (item["from_name"], item["to_name"], item["type"]) == ("tag", "image", "brushlabels")
    assert item["value"]["brushlabels"] == ["Object"] and item["value"]["format"] == "rle"
    assert (item["original_width"], item["original_height"]) == (w, h)
    assert 0.5 < item["score"] <= 1.0
    assert np.array_equal(mask, expected)
    # MASK_ALPHA (128 by default): the alpha Label Studio draws the suggestion with
    assert item["value"]["rle"] == mask_to_rle(expected, 128)


def test_personal_access_token_exchanged_refreshed_and_never_logged(predictor, server, caplog):
    caplog.set_level(logging.DEBUG)
    app = make_app(predictor, label_studio_url=server.url, label_studio_api_key=server.pat)
    backend = app.extensions["simclick"]
    refreshes = server.refreshes
    img = backend.fetcher.fetch("/data/upload/1/img.jpg")
    assert img.ndim == 3 and server.refreshes == refreshes + 1
    bearer = server.requests[-1][2]
    assert bearer.startswith("Bearer ") and bearer[7:] in server.access
    backend.fetcher.fetch("/data/upload/1/img.jpg")            # still valid: no new exchange
    assert server.refreshes == refreshes + 1
    server.expire_all_access_tokens()                           # the server says 401 now
    backend.fetcher.fetch("/data/local-files/?d=img.jpg")      # -> refresh once and retry
    assert server.refreshes == refreshes + 2
    (m1, _, a1), (m2, p2, _), (m3, _, a3) = server.requests[-3:]
    assert (m1, m2, p2, m3) == ("GET", "POST", "/api/token/refresh/", "GET")
    assert a1.startswith("Bearer ") and a3.startswith("Bearer ") and a1 != a3
    # A revoked personal access token: the error names the cause and the fix, via /predict too.
    bad = make_jwt({"token_type": "refresh", "exp": 2_000_000_000, "jti": "revoked"})
    c = make_app(predictor, label_studio_url=server.url, label_studio_api_key=bad).test_client()
    r = c.post("/predict", json=interactive_body("/data/upload/1/img.jpg", [keypoint(5, 5, 321, 481)]))
    assert r.status_code == 502 and "Personal Access Token" in r.get_json()["error"]
    secrets = [server.pat, bad] + list(server.access)
    assert not any(s in caplog.text for s in secrets)
    assert not any(s in r.get_data(as_text=True) for s in secrets)


@pytest.mark.parametrize("env, url, status, needle", [
    ({}, "/data/upload/1/img.jpg", 400, "set LABEL_STUDIO_URL"),
    ({"key": None}, "/data/upload/1/img.jpg", 502, "set LABEL_STUDIO_API_KEY"),
    ({"key": "wrong-token-123"}, "/data/upload/1/img.jpg", 502, "401 Unauthorized"),
    ({"key": "legacy"}, "/data/upload/1/missing.jpg", 502, "not found (404)"),
    # The key goes with file paths only: /forbidden/ gets none, and the message says why.
    ({"key": "legacy"}, "{url}/forbidden/img.jpg", 502, "sends its key to Label Studio only with"),
    ({"key": "legacy", "fetch_timeout": "0.5"}, "{silent}/img.jpg", 504, "timed out after 0.5 s"),
    ({"key": "legacy"}, "{url}/login-redirect/img.jpg", 502, "401 Unauthorized"),
    ({"key": "legacy"}, "http://127.0.0.1:9/img.jpg", 502, "cannot connect"),
    ({"key": "legacy", "max_image_bytes": "1000"}, "/data/upload/1/img.jpg", 413, "MAX_IMAGE_BYTES"),
    ({"key": "legacy", "max_image_pixels": "1000"}, "/data/upload/1/img.jpg", 413, "MAX_IMAGE_PIXELS"),
])
def test_image_fetch_failures_name_cause_and_fix(predictor, server, silent, env, url, status, needle):
    env = dict(env)
    if "key" in env:
        key = env.pop("key")
        env["label_studio_url"] = server.url
        if key:
            env["label_studio_api_key"] = server.legacy_token if key == "legacy" else key
    c = make_app(predictor, **env).test_client()
    r = c.post("/predict", json=interactive_body(url.format(url=server.url, silent=silent),
                                                 [keypoint(5, 5, 321, 481)]))
    assert r.status_code == status, r.get_json()
    assert needle in r.get_json()["error"] and needle in r.status
    assert server.legacy_token not in r.get_data(as_text=True)
    assert c.get("/health").status_code == 200           # the worker lives on


def test_setup_token_is_the_fallback(predictor, server):
    """No env at all: the hostname and access_token Label Studio sent in /setup are used."""
    c = make_app(predictor).test_client()
    setup = capture("007_POST_setup.json")["body"]
    setup.update(hostname=server.url, access_token=server.legacy_token)
    assert c.post("/setup", json=setup).status_code == 200
    backend = c.application.extensions["simclick"]
    info = backend.setups.get(setup["project"])
    url = "/data/upload/1/img.jpg"
    img = backend.image(backend.fetcher.cache_key(url, info, setup["project"]), url, info)
    assert img.shape[2] == 3 and server.requests[-1][2] == f"Token {server.legacy_token}"


@pytest.mark.e2e  # slow (2.0 s of CPU): the unit tier stays within a minute (issue 24)
def test_click_sequences_reuse_undo_and_replay(predictor, sample, server, caplog):
    caplog.set_level(logging.INFO, logger="backend")
    _, image, gt = sample
    h, w = gt.shape
    c = make_app(predictor, label_studio_url=server.url,
                 label_studio_api_key=server.legacy_token).test_client()
    x, y = interior_point(gt)
    k1 = keypoint(x, y, w, h, i=1)
    k2 = keypoint(min(w - 1, x + 25), y, w, h, positive=False, i=2)
    k3 = keypoint(x, max(0, y - 30), w, h, i=3)

    def send(*kps):
        r = c.post("/predict", json=interactive_body("/data/upload/1/img.jpg", list(kps)))
        assert r.status_code == 200, r.get_json()
        return r, runs_logged(caplog)

    fetches = len(server.requests)
    r1, st = send(k1)
    assert st == (1, 1)
    r2, st = send(k1, k2)
    assert st == (2, 1)                      # only the new click ran
    assert len(server.requests) == fetches + 1   # the image was downloaded once
    r2b, st = send(k1, k2)
    assert st == (2, 0)                      # the same sequence again: the cached answer
    assert [m.tolist() for _, m in decoded(r2b)] == [m.tolist() for _, m in decoded(r2)]
    r1b, st = send(k1)                       # the negative keypoint deleted: undo, no network run
    assert st == (1, 0)
    m1, m1b = (decoded(r)[0][1] if decoded(r) else np.zeros(gt.shape, bool) for r in (r1, r1b))
    assert np.count_nonzero(m1 != m1b) <= 0.001 * m1.size   # undo restores (fp16 history)
    _, st = send(k1, k3)                      # diverges after k1: one run
    assert st == (2, 1)
    r4, st = send(k3, k1)                     # diverges at the start: reset and replay both
    assert st == (2, 2)
    expected = reference_mask(predictor, image, [(x, max(0, y - 30), True), (x, y, True)])
    got = decoded(r4)[0][1] if decoded(r4) else np.zeros(gt.shape, bool)
    assert np.array_equal(got, expected)      # incremental state == a fresh session


@pytest.mark.e2e  # slow (1.7 s of CPU): the unit tier stays within a minute (issue 24)
def test_rectanglelabels_box_is_a_prompt_and_keypoints_refine_inside(predictor, sample, server, caplog):
    """A RectangleLabels region (the labelled smart rectangle) is the session's box: the answer is
    what session.set_box gives, and a keypoint inside the box (sent without it) refines it."""
    caplog.set_level(logging.INFO, logger="backend")
    _, image, gt = sample
    h, w = gt.shape
    ys, xs = np.nonzero(gt)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    c = make_app(predictor, label_studio_url=server.url, label_studio_api_key=server.legacy_token,
                 box_margin="0.1").test_client()
    rect = {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": x0 / w * 100, "y": y0 / h * 100, "width": (x1 - x0) / w * 100,
                      "height": (y1 - y0) / h * 100, "rotation": 0, "rectanglelabels": ["Object"]},
            "id": "r1", "from_name": "rect", "to_name": "image", "type": "rectanglelabels", "origin": "manual"}
    r = c.post("/predict", json=interactive_body("/data/upload/1/img.jpg", [rect]))
    assert r.status_code == 200 and runs_logged(caplog) == (0, 1)
    ref = predictor.open(image)
    got = decoded(r)[0][1] if decoded(r) else np.zeros(gt.shape, bool)
    assert np.array_equal(got, ref.set_box(x0, y0, x1, y1) > 0.5)
    # A corrective keypoint inside the box arrives without the box: it refines the box session.
    kx, ky = interior_point(gt)
    r = c.post("/predict", json=interactive_body("/data/upload/1/img.jpg", [keypoint(kx, ky, w, h)]))
    assert r.status_code == 200 and runs_logged(caplog) == (1, 1)
    assert np.array_equal(decoded(r)[0][1], ref.add_click(kx, ky, True) > 0.5)


def test_brush_stroke_and_polygon_output(predictor, sample, server, caplog):
    caplog.set_level(logging.INFO, logger="backend")
    _, image, gt = sample
    h, w = gt.shape
    from backend.labelstudio.masks import mask_to_polygons, mask_to_rle
    x, y = interior_point(gt)
    stroke = np.zeros(gt.shape, bool)
    stroke[max(0, y - 4):y + 5, max(0, x - 4):x + 5] = True       # a dab of the brush: a blob
    region = {"original_width": w, "original_height": h, "image_rotation": 0,
              "value": {"format": "rle", "rle": mask_to_rle(stroke), "brushlabels": ["Object"]},
              "id": "b1", "from_name": "tag", "to_name": "image", "type": "brushlabels", "origin": "manual"}
    poly_config = ('<View><Image name="image" value="$image"/>'
                   '<PolygonLabels name="poly" toName="image"><Label value="Object"/></PolygonLabels>'
                   '<BrushLabels name="tag" toName="image" smart="true"><Label value="Object"/></BrushLabels></View>')
    c = make_app(predictor, label_studio_url=server.url, label_studio_api_key=server.legacy_token,
                 output_format="polygon", polygon_tolerance="2").test_client()
    r = c.post("/predict", json=interactive_body("/data/upload/1/img.jpg", [region], poly_config))
    assert r.status_code == 200 and runs_logged(caplog) == (1, 1)
    s = predictor.open(image, prior_mask=stroke)
    expected = s.add_click(float(x), float(y), True) > 0.5
    items = r.get_json()["results"][0]["result"]
    want = mask_to_polygons(expected, 2.0)
    assert [i["value"]["points"] for i in items] == want
    for i in items:
        assert i["type"] == "polygonlabels" and i["from_name"] == "poly"
        assert i["value"]["polygonlabels"] == ["Object"] and i["value"]["closed"] is True


def test_batch_predict_returns_no_prediction(predictor, server):
    c = make_app(predictor).test_client()
    n = len(server.requests)
    r = c.post("/predict", json=capture("015_POST_predict_batch.json")["body"])
    assert r.status_code == 200
    assert r.get_json()["results"] == [[]]     # one empty prediction list per task
    assert "batch predictions are off" in r.get_json()["detail"]   # and the answer says so
    assert len(server.requests) == n          # and no image was fetched for it


def test_webhooks_replayed(predictor):
    ENQUEUED.clear()
    c = make_app(predictor, training_enqueue=f"{__name__}:record_enqueue").test_client()
    assert c.post("/setup", json=capture("007_POST_setup.json")["body"]).status_code == 200   # project 1
    r = c.post("/webhook", json=capture("016_POST_webhook_ANNOTATION_CREATED.json")["body"])
    assert r.status_code == 200 and r.get_json()["job"] == "job-1"
    r = c.post("/webhook", json=capture("017_POST_webhook_START_TRAINING.json")["body"])
    assert r.status_code == 200 and r.get_json()["job"] == "job-2"
    r = c.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert r.get_json()["status"] == "ignored"
    r = c.post("/webhook", json={"action": "START_TRAINING"})
    assert r.status_code == 400 and "project" in r.get_json()["error"]
    assert [e["action"] for e in ENQUEUED] == ["ANNOTATION_CREATED", "START_TRAINING"]
    events = c.get("/webhook/events").get_json()["events"]
    assert [(e["action"], e["project"]) for e in events] == [
        ("ANNOTATION_CREATED", 1), ("START_TRAINING", 1), ("PROJECT_UPDATED", 1)]
    assert events[0]["job"] == "job-1" and "payload" not in events[0]


def test_bad_requests_get_400_with_a_message(predictor, server):
    c = make_app(predictor, max_content_length="20000", label_studio_url=server.url,
                 label_studio_api_key=server.legacy_token).test_client()
    r = c.post("/predict", data="not json", content_type="text/plain")
    assert r.status_code == 400 and "JSON" in r.get_json()["error"]
    r = c.post("/predict", json={"tasks": []})
    assert r.status_code == 400 and "tasks" in r.get_json()["error"]
    r = c.post("/predict", json=interactive_body("/data/upload/1/img.jpg", [keypoint(5, 5, 321, 481, label="Dog")]))
    assert r.status_code == 400 and 'add <Label value="Dog"/>' in r.get_json()["error"]
    from backend.labelstudio.masks import mask_to_rle
    empty = {"original_width": 321, "original_height": 481, "image_rotation": 0, "type": "brushlabels",
             "value": {"format": "rle", "rle": mask_to_rle(np.zeros((481, 321), bool)), "brushlabels": ["Object"]},
             "from_name": "tag", "to_name": "image"}
    r = c.post("/predict", json=interactive_body("/data/upload/1/img.jpg", [empty]))
    assert r.status_code == 400 and "no click" in r.get_json()["error"]
    r = c.post("/predict", json={"tasks": [{"data": {}}], "label_config": "x" * 30000})
    assert r.status_code == 413 and "MAX_CONTENT_LENGTH" in r.get_json()["error"]
    r = c.post("/webhook", json=[1, 2])
    assert r.status_code == 400
    assert c.get("/nope").status_code == 404
    assert c.get("/predict").status_code == 405


def test_basic_auth(predictor):
    c = make_app(predictor, basic_auth_user="ls", basic_auth_pass="s3cret-pass").test_client()
    assert c.get("/health").status_code == 200                    # probes stay open
    setup = capture("007_POST_setup.json")["body"]
    r = c.post("/setup", json=setup)
    assert r.status_code == 401 and "BASIC_AUTH_USER" in r.get_json()["error"]
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert c.post("/setup", json=setup, auth=("ls", "wrong")).status_code == 401
    assert c.post("/setup", json=setup, auth=("ls", "s3cret-pass")).status_code == 200
    assert c.post("/webhook", json={"action": "X", "project": {"id": 1}}).status_code == 401
