"""The model registry: immutable versions, reservations, the atomic promoted pointer, rollback."""
from __future__ import annotations

import json
import multiprocessing as mp
import pickle

import pytest

from tests.conftest import make_tiny_checkpoint
from backend.registry import ProjectRegistry, RegistryError, default_root, project_key, projects


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return [make_tiny_checkpoint(d / f"m{i}.safetensors", seed=i, version=f"m{i}") for i in range(3)]


def test_project_keys_and_default_root(tmp_path):
    assert project_key(3) == project_key("3") == project_key("3.1795584533") == "3"
    for bad in ("", "../x", "a/b", "3 4"):
        with pytest.raises(RegistryError):
            project_key(bad)
    assert default_root({"DATA_DIR": str(tmp_path)}) == tmp_path / "registry"
    assert default_root({"MODEL_REGISTRY": str(tmp_path / "r"), "DATA_DIR": "/x"}) == tmp_path / "r"
    assert default_root({}).name == "registry" and default_root({}).parent.name == "data"


def test_versions_are_immutable_and_complete(tmp_path, ckpts):
    reg = ProjectRegistry(tmp_path, "7")
    base = reg.ensure_base(ckpts[0])
    assert base.name.startswith("p7-base-") and reg.ensure_base(ckpts[0]).name == base.name
    name = reg.reserve("job-a")
    assert name == "p7-v001" and reg.reserve("job-a") == name and reg.reserve("job-b") == "p7-v002"
    v = reg.add(name, ckpts[1], parent=base.name, job_id="job-a", metrics={"holdout": {"noc90": 3.0}},
                decision={"promote": False, "reason": "r"})
    assert v.checkpoint.read_bytes() == ckpts[1].read_bytes()
    assert (v.info["parent"], v.info["job_id"], v.info["model_version"]) == (base.name, "job-a", "m1")
    # Read-only by its mode. The mode is what is checked: os.access() says writable to root (CI).
    assert oct(v.checkpoint.stat().st_mode & 0o777) == "0o444"
    with pytest.raises(RegistryError, match="already exists"):
        reg.add(name, ckpts[2], parent=base.name)
    assert reg.get(name).checkpoint.read_bytes() == ckpts[1].read_bytes()
    # A crash mid-add leaves only a hidden temp folder: never listed, never reserved over.
    (reg.versions_dir / ".p7-v003.crashed").mkdir()
    assert [x.name for x in reg.versions()] == [base.name, name]
    assert reg.reserve("job-c") == "p7-v003"
    # Only SimClick safetensors checkpoints are registered.
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="pickle"):
        reg.add("p7-v009", bad)
    assert not reg.exists("p7-v009")
    with pytest.raises(RegistryError):
        reg.get("../../etc")
    assert projects(tmp_path) == ["7"]


def test_promote_and_rollback(tmp_path, ckpts):
    reg = ProjectRegistry(tmp_path, 4)
    base = reg.ensure_base(ckpts[0])
    assert reg.promoted() is None and reg.pointer_stamp() is None
    v1 = reg.add("p4-v001", ckpts[1], parent=base.name)
    v2 = reg.add("p4-v002", ckpts[2], parent=v1.name)
    reg.promote(v1.name, reason="better", served_before=base.name)
    s1 = reg.pointer_stamp()
    assert reg.promoted().name == v1.name and reg.pointer()["previous"] is None
    reg.promote(v2.name, reason="better again")
    assert reg.promoted().name == v2.name and reg.pointer_stamp() != s1
    assert reg.rollback(reason="bad masks").name == v1.name
    assert reg.rollback().name == base.name            # served_before made the base reachable
    with pytest.raises(RegistryError, match="first promoted"):
        reg.rollback()
    assert reg.rollback(to=v2.name).name == v2.name     # any registered version by name
    with pytest.raises(RegistryError, match="no version"):
        reg.rollback(to="p4-v099")
    events = [(e["event"], e["version"]) for e in reg.events()]
    assert events[-5:] == [("promoted", v1.name), ("promoted", v2.name), ("rolled back", v1.name),
                           ("rolled back", base.name), ("rolled back", v2.name)]
    d = reg.describe()
    assert d["promoted"] == v2.name and [v["promoted"] for v in d["versions"]] == [False, False, True]
    # The pointer file is always complete JSON (written with a rename), with the checkpoint path.
    p = json.loads(reg.pointer_path.read_text())
    assert (reg.dir / p["checkpoint"]).read_bytes() == ckpts[2].read_bytes()
    assert not [f for f in reg.dir.iterdir() if f.name.endswith(".tmp")]


def _reserve(root, i):
    return ProjectRegistry(root, 9).reserve(f"job-{i}")


def test_concurrent_reservations_get_distinct_names(tmp_path):
    with mp.get_context("fork").Pool(4) as pool:
        names = pool.starmap(_reserve, [(str(tmp_path), i) for i in range(8)])
    assert sorted(names) == [f"p9-v{i:03d}" for i in range(1, 9)]
