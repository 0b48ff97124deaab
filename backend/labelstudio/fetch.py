"""Download task images: Label Studio paths, plain URLs, data: URIs and allowed local files.

Label Studio serves `/data/upload/...` and `/data/local-files/?d=...` only to authenticated users,
so those go to LABEL_STUDIO_URL (or the hostname Label Studio sent in /setup) with an API key:
- a legacy token is sent as `Authorization: Token <key>`;
- a personal access token (a JWT refresh token) is exchanged at POST /api/token/refresh/ for a
  short-lived access token, sent as `Authorization: Bearer <access>`, renewed before it expires
  and once more on a 401.

Where a key goes (README, Security):
- LABEL_STUDIO_API_KEY goes to LABEL_STUDIO_URL's scheme, host and port and nowhere else, and only
  with /data/upload/ and /data/local-files/ paths (percent-decoded, no '.' or '..' segment); the
  token a /setup call brought goes only to the hostname that came with it (or, when
  LABEL_STUDIO_URL is set and LABEL_STUDIO_API_KEY is not, to LABEL_STUDIO_URL).
- Every URL is parsed once, by urllib3, the parser requests sends with (backend/labelstudio/urls.py).
- Redirects are followed here, at most MAX_REDIRECTS, and every hop is checked like the first.
- FETCH_TIMEOUT bounds a whole download: a timer shuts the download's sockets when it is up.
Keys are never logged. Every failure is a FetchError whose message names the cause and the fix.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
import requests
import urllib3

from .. import imagecheck
from ..bytecache import ByteCache
from .urls import Target, UrlError, ls_file_path, parse_http_url, short

log = logging.getLogger(__name__)

# Task paths that mean "a file on the Label Studio server" (anything else without a scheme is a
# local path). Of these, only LS_FILE_PREFIXES (backend/labelstudio/urls.py) are ever fetched.
LS_PATH_PREFIXES = ("/data/", "/storage-data/", "/tasks/")
MAX_REDIRECTS = 5
KEY_FROM_SETUP = "the /setup access_token"


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
    """scheme://host:port of a URL, for messages."""
    try:
        scheme, host, port = parse_http_url(url).origin
    except UrlError:
        return short(url, 60)
    return f"{scheme}://{host}:{port}"


def parse(url: str, shown: str) -> Target:
    try:
        return parse_http_url(url)
    except UrlError as e:
        raise FetchError(f"image URL refused: {e}; give the task a plain http(s) URL", 400) from None


# -- one download: its own session, and a deadline over all of it ----------------------------------
_CURRENT = threading.local()


class _TrackedConnection:
    """Registers every socket it opens with the download running in this thread."""

    def _new_conn(self):
        sock = super()._new_conn()
        download = getattr(_CURRENT, "download", None)
        if download is not None:
            download.track(sock)
        return sock


class _HTTPConnection(_TrackedConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_TrackedConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _TrackingAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class Download:
    """One image download (with its token exchange): a fresh HTTP session whose sockets a timer
    shuts when FETCH_TIMEOUT is up. A read timeout bounds each recv, not their sum: a server that
    drips a byte a second, in the headers or the body, would otherwise hold the thread for minutes."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "simclick-backend"
        self.session.mount("http://", _TrackingAdapter())
        self.session.mount("https://", _TrackingAdapter())
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "Download":
        _CURRENT.download = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _CURRENT.download = None
        self.session.close()

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)      # a blocked recv returns at once
        except OSError:
            pass

    def timeout(self) -> float:
        """Seconds left, the per-operation timeout of the next request."""
        left = self.deadline - time.monotonic()
        if left <= 0 or self.expired:
            raise requests.Timeout()
        return left


class LabelStudioAuth:
    """Authorization header for one Label Studio server and one API key (legacy or PAT)."""

    REFRESH_MARGIN_S = 30.0

    def __init__(self, base_url: str, api_key: str, key_source: str = "LABEL_STUDIO_API_KEY"):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.key_source = key_source
        payload = _jwt_payload(api_key)
        self.is_pat = bool(payload and payload.get("token_type") == "refresh")
        self._access: str | None = None
        self._access_exp = 0.0
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        return "personal access token" if self.is_pat else "legacy token"

    def header(self, download: Download | None = None, force_refresh: bool = False) -> dict:
        """The header to send; a personal access token is exchanged within `download`'s deadline."""
        if not self.is_pat:
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if force_refresh or self._access is None or time.time() > self._access_exp - self.REFRESH_MARGIN_S:
                if download is None:
                    raise ValueError("exchanging a personal access token needs the download it is for")
                self._refresh(download)
            return {"Authorization": f"Bearer {self._access}"}

    def secrets(self) -> list[str]:
        return [s for s in (self.api_key, self._access) if s]

    def _refresh(self, download: Download) -> None:
        url = self.base_url + "/api/token/refresh/"
        try:
            r = download.session.post(url, json={"refresh": self.api_key}, timeout=download.timeout(),
                                      allow_redirects=False)
        except requests.RequestException as e:
            if isinstance(e, requests.Timeout) or download.expired:
                raise FetchError(f"timed out after {download.seconds:g} s (FETCH_TIMEOUT) exchanging the "
                                 f"personal access token at {url}: check that {self.base_url} is "
                                 f"reachable from the backend", 504) from None
            raise FetchError(f"cannot reach Label Studio at {url} to exchange the personal access "
                             f"token ({type(e).__name__}): check LABEL_STUDIO_URL", 502) from None
        with r:
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
                if not isinstance(access, str):
                    raise TypeError("access is not a string")
            except (requests.RequestException, ValueError, KeyError, TypeError):
                raise FetchError(f"unexpected answer {r.status_code} from {url} when exchanging the "
                                 f"personal access token", 502) from None
        payload = _jwt_payload(access) or {}
        self._access = access
        # Label Studio's access tokens live 300 s; without a usable exp claim assume a minute.
        exp = payload.get("exp")
        self._access_exp = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) \
            else time.time() + 60


@dataclass
class SetupInfo:
    """What Label Studio sent in POST /setup for a project: a fallback server and token."""
    hostname: str = ""
    access_token: str = ""


# Credentials in use, one per (server, key): a /setup brings its own, so their number is bounded
# in bytes (the least recently used is dropped; a personal access token is then exchanged again).
AUTHS_BYTES = 2**20


class ImageFetcher:
    def __init__(self, config):
        self.cfg = config
        self._auths = ByteCache(AUTHS_BYTES)
        self._lock = threading.Lock()
        self.local_root = Path(config.local_files_root).resolve() if config.local_files_root else None
        self.ls_base = parse_http_url(config.label_studio_url) if config.label_studio_url else None

    # -- public ----------------------------------------------------------------------------------
    def fetch(self, url: str, setup: SetupInfo | None = None) -> np.ndarray:
        """Return the image at a task's data URL as H x W x 3 uint8 RGB (EXIF applied)."""
        return self.decode(self.fetch_bytes(url, setup), url)

    def cache_key(self, url, setup: SetupInfo | None, project: str) -> str:
        """The key of `url`'s image (and of its click sessions) in the caches: a hash of the URL
        and of what decides which bytes it gives. A project's /setup decides that (its hostname
        is the server of Label Studio paths, its token the credential), except when
        LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are both set: then the key also holds the project
        and the server its /setup named, and one project's /setup cannot fill another's cache."""
        parts = [str(url)]
        if setup is not None and (setup.hostname or setup.access_token) \
                and not (self.ls_base is not None and self.cfg.label_studio_api_key):
            parts += [project, setup.hostname]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def fetch_bytes(self, url: str, setup: SetupInfo | None = None) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise FetchError("the task has no image URL in the field the label config's "
                             "<Image value=\"$...\"/> names", 400)
        url = url.strip()
        if url.startswith("data:"):
            return self._data_uri(url)
        try:
            parts = urlsplit(url)
        except ValueError:
            raise FetchError(f"image URL {short(url)!r} is not a valid URL", 400) from None
        scheme = parts.scheme.lower()
        if scheme in ("s3", "gs", "azure-blob", "azure-spi"):
            raise FetchError(
                f"cloud storage URI {short(url.split('?')[0])!r}: the backend does not resolve cloud "
                f"storage; give tasks http(s) URLs (e.g. enable presigned URLs) or local files", 400)
        if url.startswith("/data/local-files") and self.local_root is not None:
            d = parse_qs(parts.query).get("d", [""])[0]
            return self._read_local(self.local_root / d, url)
        if scheme == "file" or (scheme == "" and not url.startswith(LS_PATH_PREFIXES)):
            path = Path(unquote(parts.path) if scheme == "file" else url)
            return self._read_local(path, url)
        if scheme == "":
            return self._http_get(self._ls_target(url, setup), setup, url)
        if scheme not in ("http", "https"):
            raise FetchError(f"unsupported image URL scheme {scheme!r} in {short(url)!r}", 400)
        return self._http_get(parse(url, url), setup, url)

    def decode(self, data: bytes, url: str) -> np.ndarray:
        """The image, refused (413) before decoding when its real frame is over MAX_IMAGE_PIXELS
        (backend/imagecheck.py)."""
        try:
            return imagecheck.decode(data, self.cfg.max_image_pixels)
        except imagecheck.ImageRefused as e:
            raise FetchError(f"image {short(url)} {e}", e.status) from None

    def secrets(self) -> list[str]:
        out = []
        for a in self._auths.values():
            out += a.secrets()
        return out

    # -- servers and keys ------------------------------------------------------------------------
    def _ls_target(self, path: str, setup: SetupInfo | None) -> Target:
        """A Label Studio path (/data/upload/...) on LABEL_STUDIO_URL, else on the /setup hostname."""
        if not ls_file_path(unquote(path.split("?", 1)[0].split("#", 1)[0])):
            raise FetchError(
                f"task image {short(path)!r} refused: only /data/upload/... and /data/local-files/?d=... "
                f"paths (without '.' or '..') are fetched from Label Studio", 400)
        base = self._ls_base(setup)
        if base is None:
            raise FetchError(
                f"task image {short(path)!r} is a Label Studio path, and the backend does not know the "
                f"Label Studio server: set LABEL_STUDIO_URL (e.g. http://localhost:8080) and "
                f"LABEL_STUDIO_API_KEY", 400)
        target = parse(base.url.rstrip("/") + path, path)
        if target.origin != base.origin:
            raise FetchError(f"task image {short(path)!r} refused: it leaves the Label Studio server", 400)
        return target

    def _ls_base(self, setup: SetupInfo | None) -> Target | None:
        if self.ls_base is not None:
            return self.ls_base
        if setup and setup.hostname:
            return parse(setup.hostname, "the /setup hostname")
        return None

    def _credential(self, target: Target, setup: SetupInfo | None) -> LabelStudioAuth | None:
        """The key a request to `target` may carry. LABEL_STUDIO_API_KEY: only to files on
        LABEL_STUDIO_URL. A /setup token: only to files on the hostname it came with (or on
        LABEL_STUDIO_URL when that is set without a key). Nothing for anything else."""
        token = setup.access_token if setup else ""
        if self.ls_base is not None and self._is_file_on(target, self.ls_base):
            if self.cfg.label_studio_api_key:
                return self._auth(self.ls_base, self.cfg.label_studio_api_key, "LABEL_STUDIO_API_KEY")
            return self._auth(self.ls_base, token, KEY_FROM_SETUP) if token else None
        if setup and setup.hostname and token:
            try:
                host = parse_http_url(setup.hostname)
            except UrlError:
                return None
            if self._is_file_on(target, host):
                return self._auth(host, token, KEY_FROM_SETUP)
        return None

    @staticmethod
    def _is_file_on(target: Target, base: Target) -> bool:
        prefix = base.path.rstrip("/")
        return (target.origin == base.origin and target.path.startswith(prefix + "/")
                and ls_file_path(target.path[len(prefix):]))

    def _auth(self, base: Target, key: str, source: str) -> LabelStudioAuth:
        with self._lock:
            k = (base.url.rstrip("/"), key)
            auth = self._auths.get(k)
            if auth is None:
                auth = LabelStudioAuth(base.url, key, source)
                self._auths.put(k, auth, len(k[0]) + len(k[1]) + 2048)   # + an access token, the object
            return auth

    # -- transports ------------------------------------------------------------------------------
    def _http_get(self, target: Target, setup: SetupInfo | None, shown: str) -> bytes:
        with Download(self.cfg.fetch_timeout) as download:
            for _ in range(MAX_REDIRECTS + 1):
                auth = self._credential(target, setup)
                r = self._send(download, target, auth, shown)
                if not r.is_redirect:
                    break
                location = r.headers.get("Location", "")
                r.close()
                try:
                    target = parse_http_url(urljoin(target.url, location))
                except UrlError as e:
                    raise FetchError(f"{origin(target.url)} redirected the download of {short(shown)} "
                                     f"to a refused URL ({e})", 502) from None
                if target.path.startswith("/user/login"):
                    self._raise_status(401, shown, auth, target)   # Label Studio's "log in first"
            else:
                raise FetchError(f"more than {MAX_REDIRECTS} redirects downloading {short(shown)} (the "
                                 f"last to {origin(target.url)}): the server redirects in a loop; check "
                                 f"the image URL", 502)
            with r:
                if not r.ok:
                    self._raise_status(r.status_code, shown, auth, target)
                return self._read_limited(r, shown, download, target)

    def _send(self, download: Download, target: Target, auth: LabelStudioAuth | None,
              shown: str) -> requests.Response:
        for attempt in (0, 1):
            headers = auth.header(download, force_refresh=attempt == 1) if auth else {}
            try:
                r = download.session.get(target.url, headers=headers, timeout=download.timeout(),
                                         stream=True, allow_redirects=False)
            except requests.RequestException as e:
                raise self._transport_error(e, download, target, shown) from None
            if r.status_code == 401 and auth is not None and auth.is_pat and attempt == 0:
                r.close()
                continue  # access token expired early or was revoked: refresh once
            return r
        raise AssertionError("unreachable")

    def _transport_error(self, e: Exception, download: Download, target: Target, shown: str) -> FetchError:
        where = origin(target.url)
        if isinstance(e, requests.Timeout) or download.expired:
            return FetchError(f"timed out after {download.seconds:g} s (FETCH_TIMEOUT) downloading "
                              f"{short(shown)} from {where}: check that the server is reachable from "
                              f"the backend, or raise FETCH_TIMEOUT for big images", 504)
        fix = ("check LABEL_STUDIO_URL and that Label Studio runs and is reachable from the backend "
               "(in Docker, localhost is the container itself)"
               if self.ls_base is not None and target.origin == self.ls_base.origin
               else "check that the server runs and is reachable from the backend")
        return FetchError(f"cannot connect to {where} to download {short(shown)} ({type(e).__name__}): "
                          f"{fix}", 502)

    def _raise_status(self, status: int, shown: str, auth: LabelStudioAuth | None, target: Target):
        shown = short(shown)
        if status in (401, 403):
            if auth is None:
                fix = self._why_no_key(target)
            elif auth.key_source == KEY_FROM_SETUP:
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

    def _why_no_key(self, target: Target) -> str:
        if self.cfg.label_studio_api_key and self.ls_base is None:
            return ("LABEL_STUDIO_API_KEY is only ever sent to LABEL_STUDIO_URL, which is not set: "
                    "set LABEL_STUDIO_URL to this Label Studio's address")
        if self.ls_base is not None and target.origin == self.ls_base.origin \
                and not self._is_file_on(target, self.ls_base):
            return ("the backend sends its key to Label Studio only with /data/upload/... and "
                    "/data/local-files/... paths; give the task such a path")
        return ("set LABEL_STUDIO_API_KEY to a Label Studio user's personal access token "
                "(Account & Settings) or legacy token"
                + ("" if self.ls_base is not None else ", and LABEL_STUDIO_URL to its address"))

    def _read_limited(self, r: requests.Response, shown: str, download: Download, target: Target) -> bytes:
        limit = self.cfg.max_image_bytes
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise FetchError(f"image {short(shown)} is {declared} bytes, over MAX_IMAGE_BYTES={limit}", 413)
        buf = bytearray()
        try:
            for chunk in r.iter_content(1 << 16):
                buf += chunk
                if len(buf) > limit:
                    raise FetchError(f"image {short(shown)} is over MAX_IMAGE_BYTES={limit} bytes", 413)
        except requests.RequestException as e:
            if not download.expired:
                raise FetchError(f"download of {short(shown)} broke off ({type(e).__name__}); retry",
                                 502) from None
        if download.expired:                     # the timer cut the body short
            raise self._transport_error(requests.Timeout(), download, target, shown)
        return bytes(buf)

    def _read_local(self, path: Path, shown: str) -> bytes:
        if self.local_root is None:
            raise FetchError(f"task image {short(shown)!r} is a local path, and the backend reads no "
                             f"local files: set LOCAL_FILES_ROOT (or LABEL_STUDIO_LOCAL_FILES_DOCUMENT_"
                             f"ROOT) to the directory that holds the images", 403)
        try:
            real = path.resolve()
        except (OSError, RuntimeError, ValueError) as e:
            raise FetchError(f"cannot resolve local path {short(shown)!r}: {type(e).__name__}", 400) from None
        if real != self.local_root and self.local_root not in real.parents:
            # The message goes to whoever sent the task: it names no server path.
            log.warning("local path %r resolves outside LOCAL_FILES_ROOT (%s)", shown, self.local_root)
            raise FetchError(f"local path {short(shown)!r} is outside LOCAL_FILES_ROOT; the backend "
                             f"reads no files elsewhere", 403)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: no symlink swapped
            # in after resolve(). Only regular files are read.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise FetchError(f"local image not found: {short(shown)!r}", 404) from None
        except PermissionError:
            raise FetchError(f"no permission to read local image {short(shown)!r}", 403) from None
        except OSError as e:
            raise FetchError(f"cannot open local image {short(shown)!r} ({e.strerror})", 400) from None
        # The descriptor is closed on every way out: a directory opens fine with O_RDONLY, and
        # os.fdopen refusing it (IsADirectoryError) left the descriptor open, one per request.
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FetchError(f"local image path {short(shown)!r} is not a regular file", 400)
            if st.st_size > self.cfg.max_image_bytes:
                raise FetchError(f"image {short(shown)} is {st.st_size} bytes, over MAX_IMAGE_BYTES="
                                 f"{self.cfg.max_image_bytes}", 413)
            data = bytearray()
            while len(data) <= self.cfg.max_image_bytes:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                data += chunk
            if len(data) > self.cfg.max_image_bytes:       # it grew after the fstat
                raise FetchError(f"image {short(shown)} is over MAX_IMAGE_BYTES={self.cfg.max_image_bytes}", 413)
            return bytes(data)
        finally:
            os.close(fd)

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
