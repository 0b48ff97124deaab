"""HTTP statuses come from exception types (backend/errors.py), not from the error text; the routes
are a Blueprint over the service object (backend/routes.py, backend/app.py:Backend)."""
from __future__ import annotations

import pytest
from flask import Flask

import backend.app as app_module
from backend.app import Backend, create_app
from backend.config import Config
from backend.errors import ERROR_STATUS, ApiError, api_error, status_for
from backend.jobs import JobConflict, JobInterrupted, JobNotFound
from backend.registry import ProjectRegistry, RegistryError, RollbackConflict, VersionNotFound

ADMIN = {"Authorization": "Bearer an-admin-token-for-tests"}


def test_the_specific_errors_are_the_old_ones_for_other_callers():
    assert issubclass(JobNotFound, RuntimeError) and issubclass(JobConflict, RuntimeError)
    assert issubclass(VersionNotFound, RegistryError) and issubclass(RollbackConflict, RegistryError)
    assert issubclass(RegistryError, ValueError)


@pytest.mark.parametrize("error, status", [
    (JobNotFound("no job x"), 404),
    (JobConflict("job x is finished: nothing to cancel"), 409),
    (VersionNotFound("project 5 has no version 'v9'"), 404),
    (RollbackConflict("project 5 has no promoted version to roll back"), 409),
    (RegistryError("not a project id: '../x'"), 400),
])
def test_status_by_type(error, status):
    assert status_for(error, 599) == status
    e = api_error(error, 599)
    assert isinstance(e, ApiError) and (e.status, str(e)) == (status, str(error))


def test_status_does_not_depend_on_the_text():
    # The old routes matched text: "no job ..." -> 404, "... roll back ..." -> 409.
    assert status_for(JobConflict("no job is allowed to do that"), 500) == 409
    assert status_for(VersionNotFound("nothing to roll back"), 500) == 404
    assert status_for(RuntimeError("no job x"), 409) == 409          # not listed: the caller's default
    assert status_for(JobInterrupted("interrupted"), 503) == 503


def test_table_lists_subclasses_before_their_bases():
    for i, (kind, _) in enumerate(ERROR_STATUS):
        for later, _ in ERROR_STATUS[i + 1:]:
            assert not issubclass(later, kind), f"{later.__name__} is shadowed by {kind.__name__}"


def test_the_registry_raises_the_specific_types(tmp_path, tiny_checkpoint):
    reg = ProjectRegistry(tmp_path, 5)
    with pytest.raises(VersionNotFound, match="has no versions"):
        reg.rollback()
    base = reg.ensure_base(tiny_checkpoint)
    with pytest.raises(VersionNotFound, match="has no version 'p5-v404'"):
        reg.get("p5-v404")
    with pytest.raises(VersionNotFound, match="not a version name"):
        reg.rollback("../etc")
    with pytest.raises(RollbackConflict, match="no promoted version"):
        reg.rollback()
    reg.promote(base.name)
    with pytest.raises(RollbackConflict, match="first promoted"):
        reg.rollback()


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    from model.predictor import Predictor
    return Predictor.load(str(tiny_checkpoint), coarse_size=64, refine=False)


@pytest.fixture
def app(predictor, tmp_path):
    # A Redis URL nobody listens on: the client connects lazily, the job service is stubbed.
    a = create_app(Config.from_env({"MODEL_REGISTRY": str(tmp_path / "registry"), "MODEL_RELOAD_INTERVAL": "0",
                                    "REDIS_URL": "redis://127.0.0.1:1/0", "ADMIN_TOKEN": ADMIN["Authorization"][7:]}),
                   predictor)
    yield a
    a.extensions["simclick"].models.stop()


@pytest.mark.parametrize("raised, status", [
    (JobNotFound("no job j1"), 404),
    (JobConflict("job j1 is finished: nothing to cancel"), 409),
    (RuntimeError("something else the job service refused"), 409),   # as before the types
    (ConnectionError("refused"), 503),
])
def test_cancel_route_status_from_the_type(app, monkeypatch, raised, status):
    def cancel(conn, job_id, actor, wait=0.0):
        raise raised
    monkeypatch.setattr(app_module, "cancel_training_job", cancel)
    r = app.test_client().post("/admin/jobs/j1/cancel", headers=ADMIN)
    assert r.status_code == status and str(raised) in r.get_json()["error"]


def test_rollback_route_status_from_the_type(app, tiny_checkpoint):
    c = app.test_client()
    assert c.post("/admin/rollback", json={"project": 5}, headers=ADMIN).status_code == 404      # no versions
    reg = ProjectRegistry(app.extensions["simclick"].cfg.registry_root(), 5)
    reg.promote(reg.ensure_base(tiny_checkpoint).name)
    r = c.post("/admin/rollback", json={"project": 5}, headers=ADMIN)
    assert r.status_code == 409 and "first promoted" in r.get_json()["error"]
    assert c.post("/admin/rollback", json={"project": 5, "to": "p5-v404"}, headers=ADMIN).status_code == 404
    assert c.post("/admin/rollback", json={"project": "../x"}, headers=ADMIN).status_code == 400


def test_routes_are_a_blueprint_over_the_service(app):
    assert "simclick" in app.blueprints
    service = app.extensions["simclick"]
    assert isinstance(service, Backend)
    # The service answers without a request: the routes only carry its answers.
    assert service.health()["status"] == "UP"
    answer = app.test_client().get("/health").get_json()
    assert answer.keys() == service.health().keys() and answer["model_version"] == service.version
    with pytest.raises(ApiError) as e:
        service.jobs(None, "0")
    assert e.value.status == 400
    # Error handlers are app-wide: an unknown path gets the JSON error answer too.
    r = app.test_client().get("/no-such-route")
    assert r.status_code == 404 and r.get_json()["status"] == 404
    assert isinstance(app, Flask)
