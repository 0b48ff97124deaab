"""Where the Label Studio key goes, and who may change the served model (issue 11, items 1-5).

Real HTTP servers on loopback stand in for Label Studio and for an attacker's server (they record
every request with its Authorization header); the backend is the real Flask app with a small real
model. Each test states what an attacker sent and what must not have happened.
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
from backend.bench import keypoint, predict_body
from backend.config import Config
from tests.conftest import make_tiny_checkpoint
from backend.registry import ProjectRegistry

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from image_server import ImageServer  # noqa: E402
pytestmark = pytest.mark.usefixtures("one_torch_thread")

W, H = 128, 96


def _png() -> bytes:
    img = np.zeros((H, W, 3), np.uint8)
    img[30:70, 40:90] = (200, 60, 60)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
SETUP_SCHEMA = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                '<Label value="Object"/></BrushLabels><KeyPointLabels name="kp" toName="image" '
                'smart="true"><Label value="Object" smart="true"/></KeyPointLabels></View>')


@pytest.fixture
def ls():
    """Label Studio: serves /data/upload/1/img.png to a valid token."""
    with ImageServer({"img.png": PNG}) as s:
        yield s


@pytest.fixture
def attacker():
    with ImageServer({"img.png": PNG}, legacy_token="attacker-token-0123456789") as s:
        yield s


def client(tiny_predictor, **env):
    return create_app(Config.from_env({k.upper(): str(v) for k, v in env.items()}), tiny_predictor).test_client()


def predict(c, url, project="1.1795584533", **headers):
    body = predict_body(1, url, [keypoint(64, 50, W, H)])
    body["project"] = project
    return c.post("/predict", json=body, headers=headers)


def leaked(server, *secrets) -> list:
    """Requests the server received that carried one of the secrets (header or token exchange)."""
    return [r for r in server.requests if any(s and s in r[2] for s in secrets)
            or r[1].startswith("/api/token/refresh")]


# -- 1: one URL parser decides where the request goes and whether it carries the key ----------------
@pytest.mark.parametrize("template", [
    "http://127.0.0.1:{evil}\\@127.0.0.1:{ls}/data/upload/1/img.png",     # the reported one
    "http://127.0.0.1:{evil}\\\\@127.0.0.1:{ls}/data/upload/1/img.png",
    "http://user@127.0.0.1:{ls}/data/upload/1/img.png",                    # userinfo
    "http://127.0.0.1:{evil}#@127.0.0.1:{ls}/data/upload/1/img.png",
    "http://127.0.0.1:{evil}?@127.0.0.1:{ls}/data/upload/1/img.png",
])
def test_key_never_follows_a_url_the_parsers_read_differently(tiny_predictor, ls, attacker, template):
    port = lambda s: s.url.rsplit(":", 1)[1]  # noqa: E731
    url = template.format(evil=port(attacker), ls=port(ls))
    c = client(tiny_predictor, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    r = predict(c, url)
    assert not leaked(attacker, ls.legacy_token), attacker.requests
    assert ls.legacy_token not in r.get_data(as_text=True)
    if "\\" in url or "user@" in url:
        assert r.status_code == 400, r.get_json()
        assert "refused" in r.get_json()["error"]


# -- 2: /setup cannot redirect the configured key ------------------------------------------------------
def test_setup_hostname_never_gets_the_configured_key(tiny_predictor, ls, attacker):
    """LABEL_STUDIO_API_KEY set, LABEL_STUDIO_URL not: an unauthenticated /setup names another
    server. Neither the legacy key nor a personal access token (its exchange) may reach it."""
    for key in (ls.legacy_token, ls.pat):
        c = client(tiny_predictor, label_studio_api_key=key)
        r = c.post("/setup", json={"project": "1.1795584533", "schema": SETUP_SCHEMA,
                                   "hostname": attacker.url, "access_token": ""})
        assert r.status_code == 200
        r = predict(c, "/data/upload/1/img.png")
        assert not leaked(attacker, key), attacker.requests
        assert r.status_code >= 400 and "LABEL_STUDIO_URL" in r.get_json()["error"]
    # A hostname from /setup gets the token that came with it, and only that one.
    c = client(tiny_predictor, label_studio_api_key=ls.legacy_token)
    c.post("/setup", json={"project": "2.1", "schema": SETUP_SCHEMA, "hostname": attacker.url,
                           "access_token": attacker.legacy_token})
    r = predict(c, "/data/upload/1/img.png", project="2.1")
    assert r.status_code == 200, r.get_json()
    assert attacker.requests[-1][2] == f"Token {attacker.legacy_token}"
    assert not leaked(attacker, ls.legacy_token)


# -- 3: task paths cannot climb out of /data/upload and /data/local-files ------------------------------
@pytest.mark.parametrize("url", [
    "/data/../api/projects/?x=1",
    "/data/upload/../../api/projects/",
    "/data/upload/%2e%2e/%2e%2e/api/projects/",
    "/data/upload/..%2f..%2fapi/projects/",
    "/data/local-files/../../api/projects/",
    "/data/upload/1/..\\..\\api/projects/",
    "/tasks/1/../../api/projects/",
    "/storage-data/../api/projects/",
])
def test_task_paths_cannot_reach_the_label_studio_api(tiny_predictor, ls, url):
    c = client(tiny_predictor, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    n = len(ls.requests)
    r = predict(c, url)
    # Refused before any request, always with the same status: no probing of what exists.
    assert r.status_code == 400, r.get_json()
    assert ls.requests[n:] == []
    assert "/data/upload/" in r.get_json()["error"]


def test_absolute_urls_on_the_label_studio_server_get_the_key_only_for_files(tiny_predictor, ls):
    c = client(tiny_predictor, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    assert predict(c, f"{ls.url}/data/upload/1/img.png").status_code == 200
    assert ls.requests[-1][2] == f"Token {ls.legacy_token}"
    predict(c, f"{ls.url}/api/projects/")
    assert ls.requests[-1][1] == "/api/projects/" and ls.requests[-1][2] == ""   # anonymous


# -- 4: model-changing routes need a credential -------------------------------------------------------
@pytest.fixture
def registry(tmp_path, tiny_checkpoint):
    root = tmp_path / "registry"
    reg = ProjectRegistry(root, 5)
    base = reg.ensure_base(tiny_checkpoint)
    v1 = reg.add("p5-v001", make_tiny_checkpoint(tmp_path / "v1.safetensors", seed=1, version="p5-v001"),
                 parent=base.name)
    reg.promote(v1.name, served_before=base.name)
    return root, reg


def test_admin_routes_are_off_without_a_credential(tiny_predictor, registry):
    root, reg = registry
    c = client(tiny_predictor, model_registry=root)            # the default: no basic auth, no token
    r = c.post("/admin/rollback", json={"project": 5})
    assert r.status_code == 403 and "ADMIN_TOKEN" in r.get_json()["error"]
    assert reg.promoted().name == "p5-v001"
    r = c.post("/admin/rollback", json={"project": 999})
    assert r.status_code == 403 and not (root / "999").exists()


def test_admin_token(tiny_predictor, registry):
    root, reg = registry
    token = "admin-token-0123456789"
    c = client(tiny_predictor, model_registry=root, admin_token=token)
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic eDp5"},
                    {"Authorization": "Bearer adm\u00efn"}):
        r = c.post("/admin/rollback", json={"project": 5}, headers=headers)
        assert r.status_code == 401, (headers, r.get_json())
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert reg.promoted().name == "p5-v001"
    good = {"Authorization": f"Bearer {token}"}
    r = c.post("/admin/rollback", json={"project": 999}, headers=good)
    assert r.status_code == 404 and not (root / "999").exists()      # no folder for a stranger
    r = c.post("/admin/rollback", json={"project": 5}, headers=good)
    assert r.status_code == 200 and reg.promoted().name.startswith("p5-base-")


# -- 5: basic auth compares bytes ---------------------------------------------------------------------
def _basic(user: str, pw: str, encoding: str = "utf-8") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode(encoding)).decode()}


def test_basic_auth_with_non_ascii_credentials(tiny_predictor):
    c = client(tiny_predictor, basic_auth_user="ls", basic_auth_pass="p\u00e4ssw\u00f6rd-\u2713")
    assert c.get("/versions").status_code == 401
    assert c.get("/versions", headers=_basic("ls", "p\u00e4ssw\u00f6rd-\u2713")).status_code == 200
    assert c.get("/versions", headers=_basic("ls", "passwort")).status_code == 401
    ascii_app = client(tiny_predictor, basic_auth_user="ls", basic_auth_pass="s3cret-pass")
    for headers in (_basic("l\u00df", "s3cret-pass"), _basic("ls", "\u00e9t\u00e9"),
                    _basic("ls", "\u00e9t\u00e9", "latin-1"), {"Authorization": "Basic \u00e9\u00e9"},
                    {"Authorization": "Basic !!!"}):
        r = ascii_app.get("/versions", headers=headers)
        assert r.status_code == 401, (headers, r.status)
    # Python requests (Label Studio's client) encodes basic auth as latin-1.
    latin = client(tiny_predictor, basic_auth_user="ls", basic_auth_pass="p\u00e4ss")
    assert latin.get("/versions", headers=_basic("ls", "p\u00e4ss", "latin-1")).status_code == 200
