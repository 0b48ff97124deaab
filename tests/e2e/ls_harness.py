"""Install and run a real Label Studio server for the end-to-end test.

Label Studio pins rq < 2.7 and redis < 5.3, which clash with our stack, so it lives in its own
virtual environment (default ~/.cache/simclick/ls-venv, reused when present; SIMCLICK_LS_VENV
overrides). Install by hand with:

    .venv/bin/python tests/e2e/ls_harness.py install

Everything Label Studio writes (database, uploads) goes to a temporary directory.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

LS_VERSION = os.environ.get("SIMCLICK_LS_VERSION", "1.23.2")
LS_VENV = Path(os.environ.get("SIMCLICK_LS_VENV",
                              Path.home() / ".cache" / "simclick" / "ls-venv"))
MARKER = ".simclick-installed"
INDEX_URL = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")


class IndexUnreachable(RuntimeError):
    """The package index cannot be reached: the only reason the end-to-end test may skip."""


def ls_executable() -> Path:
    return LS_VENV / "bin" / "label-studio"


def installed_version() -> str | None:
    """The version of a complete install in LS_VENV, else None."""
    marker = LS_VENV / MARKER
    if not marker.exists() or not ls_executable().exists():
        return None
    return marker.read_text().strip()


def index_reachable(timeout: float = 10.0) -> bool:
    try:
        r = requests.get(INDEX_URL.rstrip("/") + "/label-studio/", timeout=timeout)
        return r.status_code < 500
    except requests.RequestException:
        return False


def base_python() -> str:
    """The interpreter Label Studio's venv is built from: our venv's base Python (3.11)."""
    return os.environ.get("SIMCLICK_LS_PYTHON") or getattr(sys, "_base_executable", sys.executable)


def ensure_installed(log=print) -> Path:
    """Return the label-studio executable, installing LS_VERSION into LS_VENV if needed."""
    if installed_version() == LS_VERSION:
        return ls_executable()
    if not index_reachable():
        raise IndexUnreachable(f"package index {INDEX_URL} unreachable: cannot install "
                               f"label-studio=={LS_VERSION} into {LS_VENV}")
    log(f"installing label-studio=={LS_VERSION} into {LS_VENV} (about 60 s, 1 GB)")
    shutil.rmtree(LS_VENV, ignore_errors=True)
    LS_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base_python(), "-m", "venv", str(LS_VENV)], check=True)
    r = subprocess.run([str(LS_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", f"label-studio=={LS_VERSION}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr)[-3000:]
        if not index_reachable():
            raise IndexUnreachable(f"package index unreachable during install: {tail}")
        raise RuntimeError(f"pip install label-studio=={LS_VERSION} failed:\n{tail}")
    # Written last: a venv without this marker is a half-finished install and is rebuilt.
    (LS_VENV / MARKER).write_text(LS_VERSION)
    if installed_version() != LS_VERSION:
        raise RuntimeError(f"label-studio install in {LS_VENV} is not usable")
    return ls_executable()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None,
              log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-4000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    tail = log_path.read_text()[-4000:] if log_path and log_path.exists() else ""
    raise TimeoutError(f"{url} not up after {timeout:.0f} s:\n{tail}")


class LabelStudio:
    """A Label Studio server in a temp dir, with an admin user and a known legacy token."""

    def __init__(self, workdir: Path, username="admin@example.com", password="simclick-e2e-pw",
                 token="e2e0123456789abcdef0123456789abcdef0123"):
        self.workdir = Path(workdir)
        self.username, self.password, self.token = username, password, token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "label-studio.log"

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "VIRTUAL_ENV", "PYTHON"))}
        for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "HOME"):
            d = self.workdir / var.lower()
            d.mkdir(parents=True, exist_ok=True)
            env[var] = str(d)
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.workdir / "ls-data"),
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.token,
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
        })
        return env

    def start(self, timeout: float = 180.0) -> "LabelStudio":
        exe = ensure_installed()
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir)
        wait_http(self.url + "/health", timeout, self.proc, self.log_path)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def api(self, method: str, path: str, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        headers.setdefault("Authorization", f"Token {self.token}")
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kw)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "install":
        print(ensure_installed())
    else:
        print(__doc__)
