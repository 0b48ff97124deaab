"""The registry is the only source of served weights, and its versions cannot change (issue 11,
items 6, 7, 13). Real registry folders, real small checkpoints, the real app."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import pytest

from backend.app import create_app
from backend.bench import keypoint, predict_body
from backend.config import Config
from model.checkpoint import file_sha256
from tests.conftest import make_tiny_checkpoint
from backend.registry import ProjectRegistry
pytestmark = pytest.mark.usefixtures("one_torch_thread")

def _uri() -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    img = np.zeros((96, 128, 3), np.uint8)
    img[30:70, 40:90] = (200, 60, 60)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


URI = _uri()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {name: make_tiny_checkpoint(d / f"{name}.safetensors", seed=i + 1, version=name)
            for i, name in enumerate(["p5-v001", "p5-v002", "evil"])}


def private(path, tmp_path):
    """A copy of a shared checkpoint: tests corrupt registered files, which must not reach it."""
    dest = tmp_path / "sources" / path.name
    dest.parent.mkdir(exist_ok=True)
    shutil.copyfile(path, dest)
    return dest


@pytest.fixture
def project(tmp_path, tiny_checkpoint, ckpts):
    """Project 5: base registered, p5-v001 promoted over it."""
    reg = ProjectRegistry(tmp_path / "registry", 5)
    base = reg.ensure_base(private(tiny_checkpoint, tmp_path))
    reg.add("p5-v001", private(ckpts["p5-v001"], tmp_path), parent=base.name)
    reg.promote("p5-v001", served_before=base.name)
    return reg


def app_for(reg, tiny_predictor):
    return create_app(Config.from_env({"MODEL_REGISTRY": str(reg.root), "MODEL_RELOAD_INTERVAL": "0"}),
                      tiny_predictor)


def served_weights(c, project="5.1795584533"):
    """Predict once (200 expected) and return the card version of the weights that answered."""
    body = predict_body(1, URI, [keypoint(64, 50, 128, 96)])
    body["project"] = project
    r = c.post("/predict", json=body)
    assert r.status_code == 200, r.get_json()
    return c.application.extensions["simclick"].models.for_project(project).predictor.info["version"]


def write_pointer(reg, pointer: dict) -> None:
    tmp = reg.pointer_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(pointer))
    os.replace(tmp, reg.pointer_path)


def evil_version_dir(path, evil) -> None:
    """A version folder whose version.json matches the evil file."""
    path.mkdir(parents=True)
    shutil.copyfile(evil, path / "model.safetensors")
    (path / "version.json").write_text(json.dumps({"name": "p5-v009", "sha256": file_sha256(evil)}))


def tamper_absolute(reg, ckpts):
    write_pointer(reg, {"version": "p5-v009", "checkpoint": str(ckpts["evil"])})


def tamper_relative(reg, ckpts):
    shutil.copyfile(ckpts["evil"], reg.root.parent / "evil.safetensors")
    write_pointer(reg, {"version": "p5-v009", "checkpoint": "../../evil.safetensors"})


def tamper_symlinked_version(reg, ckpts):
    evil_version_dir(reg.root.parent / "outside" / "p5-v009", ckpts["evil"])
    os.symlink(reg.root.parent / "outside" / "p5-v009", reg.versions_dir / "p5-v009")
    write_pointer(reg, {"version": "p5-v009", "checkpoint": "versions/p5-v009/model.safetensors"})


def tamper_symlinked_file(reg, ckpts):
    d = reg.versions_dir / "p5-v009"
    evil_version_dir(d, ckpts["evil"])
    (d / "model.safetensors").unlink()
    os.symlink(ckpts["evil"], d / "model.safetensors")
    write_pointer(reg, {"version": "p5-v009", "checkpoint": "versions/p5-v009/model.safetensors"})


def tamper_sha(reg, ckpts):
    v2 = reg.add("p5-v002", private(ckpts["p5-v002"], reg.root.parent), parent="p5-v001")
    v2.checkpoint.chmod(0o644)
    shutil.copyfile(ckpts["evil"], v2.checkpoint)       # a valid checkpoint, not the registered one
    reg.promote("p5-v002")


def tamper_no_version(reg, ckpts):
    write_pointer(reg, {"checkpoint": "versions/p5-v001/model.safetensors"})


@pytest.mark.e2e  # slow (3.8 s of CPU): the unit tier stays within a minute (issue 24)
@pytest.mark.parametrize("tamper", [tamper_absolute, tamper_relative, tamper_symlinked_version,
                                    tamper_symlinked_file, tamper_sha, tamper_no_version])
def test_a_tampered_pointer_never_serves_foreign_weights(project, tiny_predictor, ckpts, tamper, caplog):
    caplog.set_level(logging.INFO)
    c = app_for(project, tiny_predictor).test_client()
    assert served_weights(c) == "p5-v001"
    tamper(project, ckpts)
    assert served_weights(c) == "p5-v001"          # the previous model, not "evil", and no 500
    assert served_weights(c) == "p5-v001"
    why = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
    assert why, "the refusal must be logged with its reason"


def test_registering_copies_the_checkpoint(tmp_path, tiny_checkpoint, ckpts):
    """A version must not share its file with the source: the source stays writable, and
    overwriting it in place leaves the version as registered."""
    src = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_checkpoint, src)
    os.chmod(src, 0o644)
    original = src.read_bytes()
    reg = ProjectRegistry(tmp_path / "registry", 3)
    base = reg.ensure_base(src)
    v = reg.add("p3-v001", src, parent=base.name)
    st = src.stat()
    assert oct(st.st_mode & 0o777) == "0o644" and st.st_nlink == 1
    assert base.checkpoint.stat().st_ino != st.st_ino and v.checkpoint.stat().st_ino != st.st_ino
    with open(src, "r+b") as f:                          # overwritten in place
        f.write(ckpts["evil"].read_bytes())
    for version in (base, v):
        assert version.checkpoint.read_bytes() == original
        assert file_sha256(version.checkpoint) == version.info["sha256"]
    assert oct(base.checkpoint.stat().st_mode & 0o777) == "0o444"


def test_restart_with_a_corrupt_promoted_version_serves_the_last_good_one(project, tiny_predictor, ckpts, caplog):
    caplog.set_level(logging.INFO)
    v2 = project.add("p5-v002", private(ckpts["p5-v002"], project.root.parent), parent="p5-v001")
    project.promote(v2.name)
    v2.checkpoint.chmod(0o644)
    v2.checkpoint.write_bytes(b"\x80\x04corrupt")
    c = app_for(project, tiny_predictor).test_client()        # a restart: nothing loaded yet
    assert served_weights(c) == "p5-v001"
    listing = c.get("/versions?project=5").get_json()
    assert listing["promoted"] == "p5-v002" and listing["model_version"] == "p5-v001"
    assert "p5-v002" in listing["fallback"] and "p5-v001" in listing["fallback"]
    # Nothing loadable at all: the base model, said so too.
    v1 = project.get("p5-v001")
    v1.checkpoint.chmod(0o644)
    v1.checkpoint.write_bytes(b"\x80\x04corrupt")
    for name in [v.name for v in project.versions() if v.name.startswith("p5-base-")]:
        cp = project.get(name).checkpoint
        cp.chmod(0o644)
        cp.write_bytes(b"\x80\x04corrupt")
    c = app_for(project, tiny_predictor).test_client()
    assert served_weights(c) == tiny_predictor.version
    assert "p5-v002" in c.get("/versions?project=5").get_json()["fallback"]


# -- issue 22, item 11: a malformed card is a clean error; the fallback note shows no server paths -----
def malformed(tiny_checkpoint, dest, how: str):
    """A copy of the tiny checkpoint with its card (or one tensor) broken in one way."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        card = json.loads(f.metadata()["simclick"])
    if how == "json-list":
        meta = json.dumps([card])
    elif how == "no-model":
        meta = json.dumps({k: v for k, v in card.items() if k != "model"})
    elif how == "input-size-string":
        meta = json.dumps(dict(card, model=dict(card["model"], input_size="384")))
    else:                                         # a tensor of the wrong shape, the card intact
        name = next(k for k, t in tensors.items() if t.ndim == 4)
        tensors[name] = torch.zeros(3, 3)
        meta = json.dumps(card)
    save_file(tensors, str(dest), metadata={"simclick": meta})
    return dest


CARDS = ["json-list", "no-model", "input-size-string", "wrong-shape"]


@pytest.mark.parametrize("how", CARDS)
def test_a_malformed_card_in_model_checkpoint_is_a_clean_error(tiny_checkpoint, tmp_path, monkeypatch, capsys, how):
    """The attack: MODEL_CHECKPOINT naming such a file exited with a raw traceback (rc 1) instead of
    the rc-2 "cannot load the model" message (as registry versions, the same files fell back cleanly)."""
    from backend.__main__ import main
    from model.checkpoint import CheckpointError
    from model.predictor import Predictor

    path = malformed(tiny_checkpoint, tmp_path / f"{how}.safetensors", how)
    with pytest.raises(CheckpointError, match=str(path)):
        Predictor.load(str(path))
    monkeypatch.setenv("MODEL_CHECKPOINT", str(path))
    assert main(["--port", "0"]) == 2                 # never serves: the load fails first
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "Traceback" not in err, err


@pytest.mark.e2e  # slow (starts Python processes that import torch): the unit tier stays within a minute (issue 24)
def test_the_cli_exits_2_on_a_malformed_card(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    path = malformed(tiny_checkpoint, tmp_path / "list.safetensors", "json-list")
    env = dict(os.environ, MODEL_CHECKPOINT=str(path), MODEL_REGISTRY="off")
    p = subprocess.run([sys.executable, "-m", "backend", "--port", "0"], env=env, capture_output=True, text=True,
                       timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 2 and "cannot load the model" in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.e2e  # slow (1.1 s of CPU): the unit tier stays within a minute (issue 24)
def test_the_fallback_note_names_versions_not_paths(project, tiny_predictor, ckpts, tiny_checkpoint, tmp_path):
    """GET /versions (and /health) said why the promoted version is not served, with the absolute
    path of its file on the server, to any client."""
    v2 = project.add("p5-v002", private(ckpts["p5-v002"], project.root.parent), parent="p5-v001")
    project.promote(v2.name)
    for broken in ("pickle", "wrong-shape"):
        v2.checkpoint.chmod(0o644)
        if broken == "pickle":
            v2.checkpoint.write_bytes(b"\x80\x04corrupt")
        else:
            malformed(tiny_checkpoint, v2.checkpoint, "wrong-shape")
        sha = file_sha256(v2.checkpoint)              # registered as it is now: it passes the hashes
        (v2.path / "version.json").write_text(json.dumps(dict(v2.info, sha256=sha)))
        write_pointer(project, dict(project.pointer(), sha256=sha))
        c = app_for(project, tiny_predictor).test_client()
        assert served_weights(c) == "p5-v001"
        note = c.get("/versions?project=5").get_json()["fallback"]
        shown = json.dumps(c.get("/health").get_json()["projects"])
        for text in (note, shown):
            assert "p5-v002" in text and "p5-v001" in text, text
            assert str(tmp_path) not in text and str(project.root) not in text, text
            assert not re.search(r"(^|[\s'\"(])/[\w.-]+/", text), text
