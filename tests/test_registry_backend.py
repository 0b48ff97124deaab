"""The backend serves each project's promoted registry version, picks up a promotion or rollback
without a restart (sessions of the old version dropped), lists versions, and rolls back through
the admin route (behind basic auth when it is configured). Real app, real small models."""
from __future__ import annotations

import base64
import io
import logging
import time

import numpy as np
import pytest
from PIL import Image

from backend.app import create_app
from backend.bench import keypoint, predict_body
from backend.config import Config
from tests.conftest import make_tiny_checkpoint
from backend.registry import ProjectRegistry


@pytest.fixture(scope="module")
def base_predictor(tiny_checkpoint):
    from model.predictor import Predictor
    return Predictor.load(str(tiny_checkpoint), coarse_size=128)


def _image_uri():
    img = np.zeros((96, 128, 3), np.uint8)
    img[30:70, 40:90] = (200, 60, 60)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


URI = _image_uri()
ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def predict(c, project, clicks=((64, 50),), auth=None):
    body = predict_body(1, URI, [keypoint(x, y, 128, 96, True, i) for i, (x, y) in enumerate(clicks)])
    body["project"] = project
    r = c.post("/predict", json=body, headers=auth or {})
    assert r.status_code == 200, r.get_json()
    return r.get_json()["results"][0]["model_version"]


def sessions_of(segmenter) -> int:
    """The click sessions a model's Segmenter holds in the shared session cache."""
    return sum(1 for e in segmenter.sessions.values() if e.owner == segmenter.id)


def wait_version(c, project, want, timeout=10.0, auth=None):
    deadline = time.monotonic() + timeout
    while True:
        got = predict(c, project, auth=auth)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@pytest.mark.e2e  # slow (1.1 s of CPU): the unit tier stays within a minute (issue 24)
def test_hot_reload_versions_and_rollback(base_predictor, tiny_checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "registry"
    app = create_app(Config.from_env({"MODEL_REGISTRY": str(root), "MODEL_RELOAD_INTERVAL": "0.2",
                                      "ADMIN_TOKEN": ADMIN_TOKEN}), base_predictor)
    c = app.test_client()
    backend = app.extensions["simclick"]
    base_version = base_predictor.version
    assert predict(c, "5.1795584533") == base_version             # no registry yet: the base model
    assert c.get("/versions").get_json()["versions"] == [base_version]

    reg = ProjectRegistry(root, 5)
    base = reg.ensure_base(tiny_checkpoint)
    v1 = reg.add("p5-v001", make_tiny_checkpoint(tmp_path / "v1.safetensors", seed=1, version="p5-v001"),
                 parent=base.name, job_id="job-1", metrics={"holdout": {"parent": {"noc90": 9.0},
                                                                        "candidate": {"noc90": 7.5}}},
                 decision={"promote": True, "reason": "holdout NoC@90 9.00 -> 7.50"})
    assert predict(c, "5.1795584533") == base_version             # registered is not promoted
    old_segmenter = backend.models.for_project("5").segmenter
    assert sessions_of(old_segmenter) == 1
    reg.promote(v1.name, reason="better", served_before=base.name)
    assert wait_version(c, "5.1795584533", v1.name) == v1.name     # no restart
    served = backend.models.for_project("5")
    assert served.segmenter is not old_segmenter and served.predictor.version == "p5-v001"
    assert sessions_of(served.segmenter) == 1                   # a new session on the new model
    assert predict(c, "6.1795584999") == base_version             # other projects untouched
    assert any("now serving p5-v001" in r.getMessage() for r in caplog.records)

    listing = c.get("/versions?project=5").get_json()
    assert listing["promoted"] == v1.name and listing["model_version"] == v1.name
    assert listing["versions"] == [base_version, base.name, v1.name]
    detail = {d["name"]: d for d in listing["details"]}
    assert detail[v1.name]["promoted"] and detail[v1.name]["metrics"]["holdout"]["candidate"]["noc90"] == 7.5
    assert detail[v1.name]["parent"] == base.name and detail[v1.name]["job_id"] == "job-1"
    everything = c.get("/versions").get_json()
    assert everything["projects"]["5"]["promoted"] == v1.name and v1.name in everything["versions"]

    # Admin rollback: back to the base version, picked up by the next requests.
    r = c.post("/admin/rollback", json={"project": 5, "reason": "masks got worse"}, headers=ADMIN)
    assert r.status_code == 200 and r.get_json()["promoted"] == base.name, r.get_json()
    assert wait_version(c, "5.1795584533", base.name) == base.name
    assert c.post("/admin/rollback", json={"project": 5}, headers=ADMIN).status_code == 409   # nothing before the base
    assert c.post("/admin/rollback", json={"project": 5, "to": "p5-v404"}, headers=ADMIN).status_code == 404

    # A promoted version whose file got corrupted on disk: logged, the current model keeps serving.
    v2 = reg.add("p5-v002", make_tiny_checkpoint(tmp_path / "v2.safetensors", seed=2, version="p5-v002"),
                 parent=base.name)
    v2.checkpoint.chmod(0o644)
    v2.checkpoint.write_bytes(b"\x80\x04corrupt")
    reg.promote(v2.name)
    assert wait_version(c, "5.1795584533", "p5-v002", timeout=1.5) == base.name
    assert any("cannot serve version 'p5-v002'" in r.getMessage() for r in caplog.records)


def test_admin_route_behind_basic_auth(base_predictor, tmp_path):
    root = tmp_path / "registry"
    reg = ProjectRegistry(root, 8)
    base = reg.ensure_base(base_predictor.info["checkpoint_path"])
    v = reg.add("p8-v001", base.checkpoint, parent=base.name)
    reg.promote(v.name, served_before=base.name)
    # No ADMIN_TOKEN: basic auth is the admin credential.
    app = create_app(Config.from_env({"MODEL_REGISTRY": str(root), "BASIC_AUTH_USER": "admin",
                                      "BASIC_AUTH_PASS": "s3cret-pass"}), base_predictor)
    c = app.test_client()
    assert c.post("/admin/rollback", json={"project": 8}).status_code == 401
    assert c.get("/versions?project=8").status_code == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"admin:s3cret-pass").decode()}
    r = c.post("/admin/rollback", json={"project": 8}, headers=good)
    assert r.status_code == 200 and r.get_json()["promoted"] == base.name
    assert reg.promoted().name == base.name
    off = create_app(Config.from_env({"MODEL_REGISTRY": "off", "ADMIN_TOKEN": ADMIN_TOKEN}), base_predictor).test_client()
    assert off.post("/admin/rollback", json={"project": 8}, headers=ADMIN).status_code == 404
    assert predict(off, "8.1") == base_predictor.version


def test_a_promotion_is_loaded_when_it_happens_and_listed_in_health(base_predictor, tiny_checkpoint, tmp_path,
                                                                    caplog):
    """Issue 14: a promoted version was loaded only at the project's next request, and /health
    showed the old one until then. No /predict is sent here before the checks."""
    caplog.set_level(logging.INFO)
    root = tmp_path / "registry"
    early = ProjectRegistry(root, 4)                   # promoted before the backend starts
    b4 = early.ensure_base(tiny_checkpoint)
    early.add("p4-v001", make_tiny_checkpoint(tmp_path / "p4.safetensors", seed=4, version="p4-v001"), parent=b4.name)
    early.promote("p4-v001", served_before=b4.name)
    app = create_app(Config.from_env({"MODEL_REGISTRY": str(root), "MODEL_RELOAD_INTERVAL": "0.2"}), base_predictor)
    c = app.test_client()

    def health_projects(want, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            got = c.get("/health").get_json()["projects"]
            if got == want or time.monotonic() > deadline:
                return got
            time.sleep(0.1)

    assert health_projects({"4": {"served": "p4-v001", "promoted": "p4-v001"}}) == \
        {"4": {"served": "p4-v001", "promoted": "p4-v001"}}            # loaded at start
    reg = ProjectRegistry(root, 5)
    base = reg.ensure_base(tiny_checkpoint)
    reg.add("p5-v001", make_tiny_checkpoint(tmp_path / "v1.safetensors", seed=1, version="p5-v001"), parent=base.name)
    reg.promote("p5-v001", served_before=base.name)
    want = {"4": {"served": "p4-v001", "promoted": "p4-v001"}, "5": {"served": "p5-v001", "promoted": "p5-v001"}}
    assert health_projects(want) == want                              # loaded without a request
    loads = [r.getMessage() for r in caplog.records if "loaded p5-v001" in r.getMessage()]
    # Once (a fresh machine's first run) the record was missing although /health showed p5-v001
    # served; not reproduced since. Say what was captured and how the logger stood, if it happens.
    router_log = logging.getLogger("backend.model_router")
    assert len(loads) == 1, ([f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records][-15:],
                             f"disabled={router_log.disabled} level={router_log.getEffectiveLevel()}")
    assert predict(c, "5.1795584533") == "p5-v001"                     # the first request finds it loaded
    assert len([r for r in caplog.records if "loaded p5-v001" in r.getMessage()]) == 1
    app.extensions["simclick"].models.stop()


def test_a_request_waits_for_the_watcher_loading_its_project(base_predictor, tiny_checkpoint, tmp_path):
    """The watcher loads a promoted version at start; a request for that project arriving during
    the load waits for it instead of answering with the base model (the load is slowed down here
    to make the overlap certain)."""
    from backend.engine import ByteCache, Segmenter
    from backend.model_router import ModelRouter, Served
    from model.predictor import Predictor

    root = tmp_path / "registry"
    reg = ProjectRegistry(root, 5)
    base = reg.ensure_base(tiny_checkpoint)
    reg.add("p5-v001", make_tiny_checkpoint(tmp_path / "v1.safetensors", seed=1, version="p5-v001"), parent=base.name)
    reg.promote("p5-v001", served_before=base.name)

    def slow_load(path):
        time.sleep(1.5)
        return Predictor.load(str(path), coarse_size=128)

    sessions = ByteCache(2**20, 60)
    router = ModelRouter(Served("base", base_predictor, Segmenter(base_predictor, sessions)), root, 2.0, 4,
                         load=slow_load, make_segmenter=lambda p: Segmenter(p, sessions))
    router.watch()
    deadline = time.monotonic() + 10
    while "5" not in router._slots and time.monotonic() < deadline:   # the watcher has begun loading
        time.sleep(0.01)
    assert router.for_project("5.1795584533").version == "p5-v001"
    router.stop()
