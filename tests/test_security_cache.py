"""What the backend keeps between requests, and for whom (issue 22, items 4 and 6).

Memory: every cache is bounded in bytes, what it holds included (keys are hashes, string fields
have a length limit). Isolation: an image or a click session is cached under what decided its
bytes, so one project's /setup cannot decide what another project sees. The real app with a
small real model; real HTTP servers on loopback stand in for Label Studio and for an attacker's
server (tests/e2e/image_server.py checks tokens like Label Studio).
"""
from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.app import create_app
from backend.bench import LABEL_CONFIG, keypoint, predict_body
from backend.config import Config
from backend.labelstudio.masks import rle_to_mask

from .conftest import kept_mb

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from image_server import ImageServer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W, H = 128, 96
MB = 2**20


def png(color=(200, 60, 60), box=(40, 30, 90, 70)) -> bytes:
    img = np.zeros((H, W, 3), np.uint8)
    img[box[1]:box[3], box[0]:box[2]] = color
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def client(predictor, **env):
    return create_app(Config.from_env({k.upper(): str(v) for k, v in env.items()}), predictor).test_client()


# -- 4: memory the caches did not count ---------------------------------------------------------------
@pytest.mark.e2e  # slow (6.4 s of CPU): the unit tier stays within a minute (issue 24)
def test_padded_data_uris_are_not_kept_as_cache_keys(tiny_predictor):
    """The attack: IMAGE_CACHE_MB=1, 24 requests whose data: URI was padded to 20 MB grew the RSS by
    ~500 MB while /health reported 72 bytes of images: the whole URI was the key (of the image and
    of the click session)."""
    c = client(tiny_predictor, image_cache_mb=1)
    image = png()

    def attack():
        for i in range(24):             # zero bytes after the PNG's end: 20 MB of base64, 24 distinct URIs
            uri = "data:image/png;base64," + base64.b64encode(image + bytes(15 * MB - 3 * i)).decode()
            r = c.post("/predict", json=predict_body(1, uri, [keypoint(64, 50, W, H)]))
            assert r.status_code == 200, r.get_json()
    kept = kept_mb(attack)
    caches = c.get("/health").get_json()["caches"]
    assert caches["images"]["bytes"] <= MB, caches
    assert kept < 60, f"24 padded URIs kept +{kept:.0f} MB; the caches account for {caches}"


@pytest.mark.e2e  # slow (3.5 s of CPU): the unit tier stays within a minute (issue 24)
def test_setup_fields_are_bounded_and_setups_are_a_bounded_cache(tiny_predictor):
    """The attack: /setup with a 20 MB project string kept 20 MB per call, without limit."""
    c = client(tiny_predictor)
    body = {"schema": LABEL_CONFIG, "hostname": "", "access_token": ""}

    def attack():
        for i in range(10):
            r = c.post("/setup", json=dict(body, project=f"{i}." + "7" * (20 * MB)))
            assert r.status_code == 400 and "project" in r.get_json()["error"], r.get_json()
    assert kept_mb(attack) < 40
    for field in ("hostname", "access_token"):
        r = c.post("/setup", json=dict(body, project="1.1", **{field: "x" * 100_000}))
        assert r.status_code == 400 and field in r.get_json()["error"], r.get_json()
    # Many projects, each a legal /setup: kept within their byte budget, the oldest dropped.
    backend = c.application.extensions["simclick"]
    token = "t" * 4000
    for i in range(3000):
        assert c.post("/setup", json=dict(body, project=f"{i}.1795584533", access_token=token)).status_code == 200
    stats = backend.setups.stats()
    assert 0 < stats["entries"] < 3000 and stats["bytes"] <= stats["max_bytes"], stats
    assert backend.setups.get("2999.1795584533").access_token == token


@pytest.mark.e2e  # slow (4.0 s of CPU): the unit tier stays within a minute (issue 24)
def test_label_configs_are_cached_within_a_byte_budget(tiny_predictor):
    """The attack: the label-config cache held up to 64 configs of up to 32 MB each (their XML as
    the key). 16 distinct 20 MB configs must not stay in memory."""
    c = client(tiny_predictor)
    head, tail = LABEL_CONFIG.rsplit("</View>", 1)

    def attack():
        for i in range(16):
            schema = f"{head}<!-- {i} {'x' * (20 * MB)} --></View>{tail}"
            assert c.post("/setup", json={"project": "1.1", "schema": schema}).status_code == 200
    kept = kept_mb(attack)
    assert kept < 60, f"16 label configs of 20 MB kept +{kept:.0f} MB"


@pytest.mark.e2e  # slow (2.0 s of CPU): the unit tier stays within a minute (issue 24)
def test_webhook_history_is_bounded_in_bytes(tiny_predictor):
    """GET /webhook/events keeps the last WEBHOOK_HISTORY events: 100 of them, each with a 10 MB
    'action' string, would be 1 GB."""
    c = client(tiny_predictor)

    def attack():
        for i in range(30):
            r = c.post("/webhook", json={"action": f"{i}" + "A" * (10 * MB), "project": {"id": 1}})
            assert r.status_code == 400 and "action" in r.get_json()["error"], r.get_json()
    assert kept_mb(attack) < 40
    assert c.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}}).status_code == 200


# -- 6: one project's /setup decides nothing for another ------------------------------------------------
def mask_of(r) -> np.ndarray:
    items = r.get_json()["results"][0]["result"]
    return rle_to_mask(items[0]["value"]["rle"], H, W) if items else np.zeros((H, W), bool)


def test_one_projects_setup_cannot_poison_another_projects_images(tiny_predictor):
    """The attack: without LABEL_STUDIO_URL each project's server is its /setup hostname, but images
    and sessions were cached by URL alone: /setup of project 666 naming the attacker's server, then a
    /predict of project 666 for /data/upload/1/img.png, made project 1's request for the same path
    get the attacker's image and mask."""
    real, fake = png((200, 60, 60), (40, 30, 90, 70)), png((60, 200, 60), (0, 0, 30, 20))
    with ImageServer({"img.png": real}) as ls, \
            ImageServer({"img.png": fake}, legacy_token="attacker-token-0123456789") as evil:
        def setup(c, project, server):
            r = c.post("/setup", json={"project": project, "schema": LABEL_CONFIG, "hostname": server.url,
                                       "access_token": server.legacy_token})
            assert r.status_code == 200, r.get_json()

        def ask(c, project):
            body = predict_body(1, "/data/upload/1/img.png", [keypoint(64, 50, W, H)])
            body["project"] = project
            r = c.post("/predict", json=body)
            assert r.status_code == 200, r.get_json()
            return mask_of(r)

        fresh = client(tiny_predictor)
        setup(fresh, "1.1795584533", ls)
        expected = ask(fresh, "1.1795584533")

        c = client(tiny_predictor)
        setup(c, "1.1795584533", ls)
        setup(c, "666.1", evil)
        ask(c, "666.1")
        assert len(evil.requests) == 1
        served = len(ls.requests)
        got = ask(c, "1.1795584533")
        assert len(ls.requests) == served + 1, "project 1's image came from the cache the attacker filled"
        assert np.array_equal(got, expected)
        # The same project sending the same path again is served from the cache.
        ask(c, "1.1795584533")
        assert len(ls.requests) == served + 1
