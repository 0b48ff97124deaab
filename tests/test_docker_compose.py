"""Docker cannot run here: check docker/compose.yaml, the Dockerfiles and docker/README.md against
each other and against the code (every variable is one the code reads, shared values agree, the
commands exist, the pinned torch matches the requirements the images install)."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from backend.config import Config
from backend.jobs import parser
from model import settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
SIMCLICK = ("backend", "worker", "worker-cuda")
LS_VARS = {"LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED"}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def known_vars():
    return {s.name for s in settings.ALL}


def interpolation_default(value):
    m = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", str(value))
    return (m.group(1), m.group(2)) if m else (None, None)


def test_services_and_their_wiring(compose):
    services = compose["services"]
    assert set(services) == {"label-studio", "redis", "backend", "worker", "worker-cuda", "rq-dashboard",
                             "backend-replica", "backend-gpu0", "backend-gpu1", "backend-lb"}
    assert services["worker-cuda"]["profiles"] == ["cuda"] and services["rq-dashboard"]["profiles"] == ["dashboard"]
    known = known_vars()
    envs = {name: {k: str(v) for k, v in services[name]["environment"].items()} for name in SIMCLICK}
    for name, env in envs.items():
        unknown = set(env) - known
        assert not unknown, f"{name}: variables no code reads: {sorted(unknown)}"
        url = urlsplit(env["REDIS_URL"])
        assert url.scheme == "redis" and url.hostname in services and url.hostname == "redis"
        ls = urlsplit(env["LABEL_STUDIO_URL"])
        assert ls.hostname == "label-studio" and "8080:8080" in services["label-studio"]["ports"]
        assert f"simclick-data:{env['DATA_DIR']}" in services[name]["volumes"], name
        Config.from_env({k: v for k, v in env.items() if not v.startswith("${")})   # valid values
    # Backend and workers agree on everything they share.
    for var in ("REDIS_URL", "TRAINING_QUEUE", "DATA_DIR", "LABEL_STUDIO_URL", "SIMCLICK_EVAL_DB", "MODEL_CHECKPOINT"):
        assert len({envs[n][var] for n in SIMCLICK}) == 1, var
    assert set(services["label-studio"]["environment"]) <= LS_VARS
    assert services["label-studio"]["environment"]["SSRF_PROTECTION_ENABLED"] == "false"
    assert set(compose["volumes"]) == {"label-studio-data", "redis-data", "simclick-data"}
    bind = envs["backend"]["GUNICORN_BIND"]
    assert bind.startswith("0.0.0.0:") and f"{bind.split(':')[1]}:{bind.split(':')[1]}" in services["backend"]["ports"]
    assert services["worker-cuda"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_defaults_match_the_code(compose):
    declared = {s.name: s for s in settings.ALL}
    checked = 0
    for name in ("backend", "worker"):
        for var, value in compose["services"][name]["environment"].items():
            ref, default = interpolation_default(value)
            # the evaluation history goes in the data volume (the code's default is a path in the checkout)
            if ref == var and var in declared and var != "SIMCLICK_EVAL_DB":
                s = declared[var]
                assert s.parse(default) == s.read({}), (name, var, default, s.default)
                checked += 1
    assert checked >= 5


def test_commands_exist(compose):
    s = compose["services"]
    for name in ("worker", "worker-cuda"):
        cmd = s[name]["command"]
        assert cmd[:3] == ["python", "-m", "backend.jobs"]
        assert parser().parse_args(cmd[3:]).command == "worker"
    assert s["backend"]["command"] == ["gunicorn", "-c", "backend/gunicorn.conf.py"]
    conf = (REPO / "backend" / "gunicorn.conf.py").read_text()
    assert 'wsgi_app = "backend.wsgi:app"' in conf and (REPO / "backend" / "wsgi.py").exists()
    assert "GUNICORN_BIND" in conf
    makefile = (REPO / "Makefile").read_text()
    assert "$(PY) -m backend.jobs worker" in makefile


def pins(name):
    """{package: version} of a requirements file, following its `-r` includes."""
    out = {}
    for line in (REPO / name).read_text().splitlines():
        if line.startswith("-r "):
            out.update(pins(line[3:].strip()))
        elif "==" in line and not line.startswith("#"):
            package, version = line.split("==")
            out[package] = version
    return out


def test_dockerfiles(compose):
    reqs = pins("requirements-training.txt")
    assert not {"pytest", "hypothesis", "selenium", "ruff", "mypy"} & set(reqs)   # no test tools in the images
    assert set(reqs) | set(pins("requirements-test.txt")) == set(pins("requirements.txt"))
    for name, df in (("backend", "Dockerfile.cpu"), ("worker-cuda", "Dockerfile.cuda")):
        build = compose["services"][name]["build"]
        assert build["dockerfile"] == f"docker/{df}" and (DOCKER / build["context"]).resolve() == REPO
        text = (DOCKER / df).read_text()
        assert f"torch=={reqs['torch']}" in text and f"torchvision=={reqs['torchvision']}" in text
        for src in re.findall(r"^COPY (\S+) ", text, re.M):
            assert (REPO / src).exists(), f"{df}: COPY {src} does not exist"
        assert "pip install -r requirements-training.txt" in text and "DATA_DIR=/data" in text
        assert 'CMD ["gunicorn", "-c", "backend/gunicorn.conf.py"]' in text
        ignore = (DOCKER / f"{df}.dockerignore").read_text()
        assert "!requirements-runtime.txt" in ignore and "!requirements-training.txt" in ignore
        assert "!training/**" in ignore
    assert "cu1" in (DOCKER / "Dockerfile.cuda").read_text() and "/whl/cpu" in (DOCKER / "Dockerfile.cpu").read_text()


def test_readme_matches_compose(compose):
    readme = (DOCKER / "README.md").read_text()
    for service in compose["services"]:
        assert f"`{service}`" in readme, service
    # Every variable the compose file takes from the environment is documented with its default.
    taken = {}
    for svc in compose["services"].values():
        for value in (svc.get("environment") or {}).values():
            ref, default = interpolation_default(value)
            if ref:
                taken.setdefault(ref, set()).add(default)
    for svc in compose["services"].values():
        for vol in svc.get("volumes") or []:
            ref, default = interpolation_default(str(vol).split(":/")[0])
            if ref:
                taken.setdefault(ref, set()).add(default)
    assert len(taken) >= 10
    for var, defaults in taken.items():
        row = next((line for line in readme.splitlines() if f"`{var}`" in line and line.startswith("|")), None)
        assert row is not None, f"{var} is not in docker/README.md"
        shown = row.split("[", 1)[1].split("]", 1)[0] if "[" in row else ""
        for default in defaults:
            assert re.search(rf"(^|[ ;]){re.escape(default)}($|[ ;])", shown), \
                f"docker/README.md gives another default for {var}: {row} (compose: {default!r})"
    for fixed in ("LABEL_STUDIO_URL=http://label-studio:8080", "REDIS_URL=redis://redis:6379/0", "DATA_DIR=/data"):
        assert fixed in readme
    for line in ("docker compose up -d --build", "--profile cuda", "--profile dashboard"):
        assert line in readme and line in (DOCKER / "compose.yaml").read_text()


REPLICAS = ("backend-replica", "backend-gpu0", "backend-gpu1")


def test_replicas_profile(compose):
    """N backend replicas behind the official nginx image: the same settings as `backend` (plus
    SHARED_PROMPTS, DEVICE), one GPU each, and an nginx config that reaches them."""
    s = compose["services"]
    assert s["backend-replica"]["profiles"] == ["replicas"]
    assert s["backend-gpu0"]["profiles"] == s["backend-gpu1"]["profiles"] == ["replicas-cuda"]
    assert s["backend-lb"]["profiles"] == ["replicas", "replicas-cuda"]
    known = known_vars()
    backend_env = {k: str(v) for k, v in s["backend"]["environment"].items()}
    for name in REPLICAS:
        svc = s[name]
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert not set(env) - known, (name, sorted(set(env) - known))
        assert {k: v for k, v in env.items() if k not in ("SHARED_PROMPTS", "DEVICE")} == backend_env, name
        assert env["SHARED_PROMPTS"] == "on" and env["REDIS_URL"] == "redis://redis:6379/0"
        Config.from_env({k: v for k, v in env.items() if not v.startswith("${")})   # valid, Redis set for "on"
        assert svc["command"] == s["backend"]["command"] and "simclick-data:/data" in svc["volumes"]
        assert "ports" not in svc, f"{name}: replicas are reached through backend-lb only"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert interpolation_default(s["backend-replica"]["deploy"]["replicas"]) == ("BACKEND_REPLICAS", "2")
    gpus = [s[n]["deploy"]["resources"]["reservations"]["devices"][0] for n in ("backend-gpu0", "backend-gpu1")]
    assert all(g["driver"] == "nvidia" and g["capabilities"] == ["gpu"] and "count" not in g for g in gpus)
    assert [g["device_ids"] for g in gpus] == [["0"], ["1"]]                 # each its own GPU
    assert s["backend-gpu0"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert s["backend-gpu0"]["environment"]["DEVICE"] == "cuda"

    lb = s["backend-lb"]
    image, tag = lb["image"].split(":")
    assert image == "nginx" and tag.startswith("1.27")                      # official image, `resolve` needs 1.27.3+
    assert set(lb["depends_on"]) == set(REPLICAS) and all(d["required"] is False for d in lb["depends_on"].values())
    src, dst = lb["volumes"][0].rsplit(":", 1)[0].split(":")
    assert dst.startswith("/etc/nginx/templates/") and dst.endswith(".conf.template")
    template = (DOCKER / src).read_text()
    listen = re.search(r"^\s*listen (\d+);", template, re.M).group(1)
    host_port, lb_port = lb["ports"][0].split(":")
    assert lb_port == listen and host_port not in ("8080", "9090", "9181")   # no clash with the other services
    ref, default = interpolation_default(lb["environment"]["SIMCLICK_BACKENDS"])
    assert ref == "SIMCLICK_BACKENDS" and "${SIMCLICK_BACKENDS}" in template
    bind_port = s["backend"]["environment"]["GUNICORN_BIND"].split(":")[1]
    servers = re.findall(r"server ([\w-]+):(\d+)( resolve)?;", default)
    assert servers == [("backend-replica", bind_port, " resolve")]
    # The GPU example in the compose header names the GPU services, on the backend's port.
    head = (DOCKER / "compose.yaml").read_text().split("services:")[0]
    gpu_line = re.search(r'SIMCLICK_BACKENDS="([^"]+)"', head).group(1)
    assert {(n, p) for n, p, _ in re.findall(r"server ([\w-]+):(\d+)( resolve)?;", gpu_line)} == \
        {("backend-gpu0", bind_port), ("backend-gpu1", bind_port)}

    # The rendered config: what the image's envsubst makes of the template.
    rendered = template.replace("${SIMCLICK_BACKENDS}", default)
    body = "\n".join(line.split("#")[0] for line in rendered.splitlines())       # without comments
    # Nothing left for envsubst but nginx's own variables.
    assert "$" not in re.sub(r"\$(host|proxy_add_x_forwarded_for|scheme)\b", "", body)
    assert body.count("{") == body.count("}")
    assert re.search(r"upstream simclick_backends \{[^}]*zone simclick_backends", body)   # `resolve` needs a zone
    assert "resolver 127.0.0.11" in body and "proxy_pass http://simclick_backends;" in body
    body_mb = int(re.search(r"client_max_body_size (\d+)m;", body).group(1))
    assert body_mb * 2**20 == settings.MAX_CONTENT_LENGTH.read({})
    read_s = int(re.search(r"proxy_read_timeout (\d+)s;", body).group(1))
    assert read_s > settings.PREDICT_TIMEOUT.read({}) + settings.FETCH_TIMEOUT.read({})
    assert not re.search(r"\b(ip_hash|sticky|hash)\b", body)               # not sticky: replays are exact
