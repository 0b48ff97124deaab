"""Download task images: Label Studio paths, plain URLs, data: URIs and allowed local files.

Label Studio serves `/data/upload/...` and `/data/local-files/?d=...` only to authenticated users,
so those go to LABEL_STUDIO_URL (or the hostname Label Studio sent in /setup) with an API key:
- a legacy token is sent as `Authorization: Token <key>`;
- a personal access token (a JWT refresh token) is exchanged at POST /api/token/refresh/ for a
  short-lived access token, sent as `Authorization: Bearer <access>`, renewed before it expires
  and once more on a 401.
Keys are only ever sent to the Label Studio origin they belong to, and never logged.
Every failure is a FetchError whose message names the cause and the fix.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image

from model.images import ImageError, load_image

log = logging.getLogger(__name__)

LS_PATH_PREFIXES = ("/data/", "/storage-data/", "/tasks/")


class FetchError(Exception):
    """An image could not be obtained. `status` is the HTTP status the backend answers with."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


def _jwt_payload(token: str) -> dict | None:
    """The payload of a JWT (unverified: only to read token_type and exp), None if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def origin(url: str) -> str:
    u = urlsplit(url)
    port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    return f"{u.scheme}://{(u.hostname or '').lower()}:{port}"


class LabelStudioAuth:
    """Authorization header for one Label Studio server and one API key (legacy or PAT)."""

    REFRESH_MARGIN_S = 30.0

    def __init__(self, base_url: str, api_key: str, session: requests.Session, timeout: float,
                 key_source: str = "LABEL_STUDIO_API_KEY"):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.session = session
        self.timeout = timeout
        self.key_source = key_source
        payload = _jwt_payload(api_key)
        self.is_pat = bool(payload) and payload.get("token_type") == "refresh"
        self._access: str | None = None
        self._access_exp = 0.0
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        return "personal access token" if self.is_pat else "legacy token"

    def header(self, force_refresh: bool = False) -> dict:
        if not self.is_pat:
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if force_refresh or self._access is None or time.time() > self._access_exp - self.REFRESH_MARGIN_S:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def secrets(self) -> list[str]:
        return [s for s in (self.api_key, self._access) if s]

    def _refresh(self) -> None:
        url = self.base_url + "/api/token/refresh/"
        try:
            r = self.session.post(url, json={"refresh": self.api_key}, timeout=self.timeout)
        except requests.Timeout:
            raise FetchError(f"timed out exchanging the personal access token at {url}: check that "
                             f"{self.base_url} is reachable from the backend", 504) from None
        except requests.RequestException as e:
            raise FetchError(f"cannot reach Label Studio at {url} to exchange the personal access "
                             f"token ({type(e).__name__}): check LABEL_STUDIO_URL", 502) from None
        if r.status_code in (401, 403):
            raise FetchError(
                f"Label Studio rejected the personal access token in {self.key_source} at "
                f"/api/token/refresh/ ({r.status_code}): it is revoked, expired or from another "
                f"server; create a new one under Account & Settings > Personal Access Token", 502)
        if r.status_code == 404:
            raise FetchError(
                f"{url} does not exist (404): this Label Studio has no personal access tokens; "
                f"use the user's legacy token in {self.key_source}", 502)
        try:
            r.raise_for_status()
            access = r.json()["access"]
        except (requests.HTTPError, ValueError, KeyError, TypeError):
            raise FetchError(f"unexpected answer {r.status_code} from {url} when exchanging the "
                             f"personal access token", 502) from None
        payload = _jwt_payload(access) or {}
        self._access = access
        # Label Studio's access tokens live 300 s; without an exp claim assume a minute.
        self._access_exp = float(payload.get("exp", time.time() + 60))


@dataclass
class SetupInfo:
    """What Label Studio sent in POST /setup for a project: a fallback server and token."""
    hostname: str = ""
    access_token: str = ""


class ImageFetcher:
    def __init__(self, config):
        self.cfg = config
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "simclick-backend"
        self._auths: dict[tuple[str, str], LabelStudioAuth] = {}
        self._lock = threading.Lock()
        self.local_root = Path(config.local_files_root).resolve() if config.local_files_root else None

    # -- public ----------------------------------------------------------------------------------
    def fetch(self, url: str, setup: SetupInfo | None = None) -> np.ndarray:
        """Return the image at a task's data URL as H x W x 3 uint8 RGB (EXIF applied)."""
        return self.decode(self.fetch_bytes(url, setup), url)

    def fetch_bytes(self, url: str, setup: SetupInfo | None = None) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise FetchError("the task has no image URL in the field the label config's "
                             "<Image value=\"$...\"/> names", 400)
        url = url.strip()
        if url.startswith("data:"):
            return self._data_uri(url)
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("s3", "gs", "azure-blob", "azure-spi"):
            raise FetchError(
                f"cloud storage URI {url.split('?')[0]!r}: the backend does not resolve cloud "
                f"storage; give tasks http(s) URLs (e.g. enable presigned URLs) or local files", 400)
        if url.startswith("/data/local-files") and self.local_root is not None:
            d = parse_qs(urlsplit(url).query).get("d", [""])[0]
            return self._read_local(self.local_root / d, url)
        if scheme == "file" or (scheme == "" and not url.startswith(LS_PATH_PREFIXES)):
            path = Path(unquote(urlsplit(url).path) if scheme == "file" else url)
            return self._read_local(path, url)
        if scheme == "":
            base, auth = self._ls_server(setup, url)
            return self._http_get(urljoin(base + "/", url.lstrip("/")), auth, url)
        if scheme not in ("http", "https"):
            raise FetchError(f"unsupported image URL scheme {scheme!r} in {url!r}", 400)
        auth = self._auth_for_origin(url, setup)
        return self._http_get(url, auth, url)

    def decode(self, data: bytes, url: str) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data)) as pil:
                w, h = pil.size
        except Exception as e:  # Pillow raises many types on non-images
            raise FetchError(f"{url} is not an image Pillow can read ({type(e).__name__}: {e}); "
                             f"check that the URL points at the image file, not a web page", 422) from None
        if w * h > self.cfg.max_image_pixels:
            raise FetchError(f"image {url} is {w}x{h} = {w * h} pixels, over MAX_IMAGE_PIXELS="
                             f"{self.cfg.max_image_pixels}; downscale it or raise the limit", 413)
        try:
            return load_image(data)
        except ImageError as e:
            raise FetchError(f"cannot decode image {url}: {e}", 422) from None

    def secrets(self) -> list[str]:
        out = []
        for a in list(self._auths.values()):
            out += a.secrets()
        return out

    # -- servers and keys ------------------------------------------------------------------------
    def _ls_server(self, setup: SetupInfo | None, url: str) -> tuple[str, LabelStudioAuth | None]:
        """Base URL and auth for a Label Studio path: env first, /setup's values as a fallback."""
        if self.cfg.label_studio_url:
            base = self.cfg.label_studio_url.rstrip("/")
            if self.cfg.label_studio_api_key:
                return base, self._auth(base, self.cfg.label_studio_api_key, "LABEL_STUDIO_API_KEY")
            if setup and setup.access_token:
                return base, self._auth(base, setup.access_token, "the /setup access_token")
            return base, None
        if setup and setup.hostname:
            base = setup.hostname.rstrip("/")
            key = self.cfg.label_studio_api_key or setup.access_token
            src = "LABEL_STUDIO_API_KEY" if self.cfg.label_studio_api_key else "the /setup access_token"
            return base, (self._auth(base, key, src) if key else None)
        raise FetchError(
            f"task image {url!r} is a Label Studio path, and the backend does not know the Label "
            f"Studio server: set LABEL_STUDIO_URL (e.g. http://localhost:8080) and "
            f"LABEL_STUDIO_API_KEY", 400)

    def _auth_for_origin(self, url: str, setup: SetupInfo | None) -> LabelStudioAuth | None:
        """A key goes only to the server it belongs to: a plain URL elsewhere gets none."""
        if self.cfg.label_studio_url and origin(url) == origin(self.cfg.label_studio_url):
            return self._ls_server(setup, url)[1]
        if setup and setup.hostname and origin(url) == origin(setup.hostname):
            if not self.cfg.label_studio_url:
                return self._ls_server(setup, url)[1]
            if setup.access_token:
                return self._auth(setup.hostname, setup.access_token, "the /setup access_token")
        return None

    def _auth(self, base: str, key: str, source: str) -> LabelStudioAuth:
        with self._lock:
            k = (base.rstrip("/"), key)
            if k not in self._auths:
                self._auths[k] = LabelStudioAuth(base, key, self.session, self.cfg.fetch_timeout, source)
            return self._auths[k]

    # -- transports ------------------------------------------------------------------------------
    def _http_get(self, url: str, auth: LabelStudioAuth | None, shown: str) -> bytes:
        for attempt in (0, 1):
            headers = auth.header(force_refresh=attempt == 1) if auth else {}
            try:
                r = self.session.get(url, headers=headers, timeout=self.cfg.fetch_timeout, stream=True)
            except requests.Timeout:
                raise FetchError(f"timed out after {self.cfg.fetch_timeout:g} s downloading {shown} "
                                 f"from {origin(url)}: check that the server is reachable from the "
                                 f"backend, or raise FETCH_TIMEOUT for big images", 504) from None
            except requests.RequestException as e:
                raise FetchError(f"cannot connect to {origin(url)} to download {shown} "
                                 f"({type(e).__name__}): check LABEL_STUDIO_URL and that the server "
                                 f"runs and is reachable from the backend (in Docker, localhost is "
                                 f"the container itself)", 502) from None
            with r:
                if r.status_code == 401 and auth is not None and auth.is_pat and attempt == 0:
                    continue  # access token expired early or was revoked: refresh once
                if r.ok and urlsplit(r.url).path.startswith("/user/login"):
                    self._raise_status(401, shown, auth)
                if not r.ok:
                    self._raise_status(r.status_code, shown, auth)
                return self._read_limited(r, shown)
        raise AssertionError("unreachable")

    def _raise_status(self, status: int, shown: str, auth: LabelStudioAuth | None):
        if status in (401, 403):
            if auth is None:
                fix = ("set LABEL_STUDIO_API_KEY to a Label Studio user's personal access token "
                       "(Account & Settings) or legacy token")
            elif auth.key_source == "the /setup access_token":
                fix = ("the token Label Studio sent in /setup is the project owner's legacy token, "
                       "refused unless Label Studio runs with LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="
                       "true: set LABEL_STUDIO_API_KEY to a personal access token")
            elif status == 401:
                fix = (f"the {auth.kind} in {auth.key_source} was refused: check it belongs to "
                       f"this Label Studio server (legacy tokens also need "
                       f"LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true there)")
            else:
                fix = (f"the user of the {auth.kind} in {auth.key_source} has no access to this "
                       f"file: use a token of a member of the project's organization")
            name = "401 Unauthorized" if status == 401 else "403 Forbidden"
            raise FetchError(f"image download refused ({name}) for {shown}: {fix}", 502)
        if status == 404:
            raise FetchError(f"image not found (404) at {shown}: the file is gone from the server, "
                             f"or LABEL_STUDIO_URL points at another server", 502)
        if status >= 500:
            raise FetchError(f"the image server failed ({status}) for {shown}: a missing upload "
                             f"also gives 500 in Label Studio 1.23; check the file exists", 502)
        raise FetchError(f"image download failed with HTTP {status} for {shown}", 502)

    def _read_limited(self, r: requests.Response, shown: str) -> bytes:
        limit = self.cfg.max_image_bytes
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise FetchError(f"image {shown} is {declared} bytes, over MAX_IMAGE_BYTES={limit}", 413)
        buf = bytearray()
        try:
            for chunk in r.iter_content(1 << 16):
                buf += chunk
                if len(buf) > limit:
                    raise FetchError(f"image {shown} is over MAX_IMAGE_BYTES={limit} bytes", 413)
        except requests.RequestException as e:
            raise FetchError(f"download of {shown} broke off ({type(e).__name__}); retry", 502) from None
        return bytes(buf)

    def _read_local(self, path: Path, shown: str) -> bytes:
        if self.local_root is None:
            raise FetchError(f"task image {shown!r} is a local path, and the backend reads no local "
                             f"files: set LOCAL_FILES_ROOT (or LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) "
                             f"to the directory that holds the images", 403)
        try:
            real = path.resolve()
        except (OSError, RuntimeError) as e:
            raise FetchError(f"cannot resolve local path {shown!r}: {e}", 400) from None
        if real != self.local_root and self.local_root not in real.parents:
            raise FetchError(f"local path {shown!r} is outside LOCAL_FILES_ROOT "
                             f"({self.local_root}); the backend reads no files elsewhere", 403)
        try:
            size = real.stat().st_size
            if size > self.cfg.max_image_bytes:
                raise FetchError(f"image {shown} is {size} bytes, over MAX_IMAGE_BYTES="
                                 f"{self.cfg.max_image_bytes}", 413)
            return real.read_bytes()
        except FileNotFoundError:
            raise FetchError(f"local image not found: {shown!r} (looked at {real})", 404) from None
        except IsADirectoryError:
            raise FetchError(f"local image path is a directory: {shown!r}", 400) from None
        except PermissionError:
            raise FetchError(f"no permission to read local image {shown!r}", 403) from None

    def _data_uri(self, url: str) -> bytes:
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise FetchError("data: image URIs must be base64-encoded", 400)
        if len(data) * 3 // 4 > self.cfg.max_image_bytes:
            raise FetchError(f"data: image over MAX_IMAGE_BYTES={self.cfg.max_image_bytes}", 413)
        try:
            return base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError) as e:
            raise FetchError(f"bad base64 in data: image URI: {e}", 400) from None
