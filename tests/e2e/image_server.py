"""A small HTTP server that serves images the way Label Studio does, for the Flask-client tests.

It checks tokens for real: `Authorization: Token <legacy>` or `Bearer <access>`, where access
tokens come from POST /api/token/refresh/ {"refresh": <personal access token>} and expire after
`access_ttl` seconds (Label Studio: 300 s). Paths:
  /data/upload/<name>           the file `files[name]` (auth required; 404 if unknown)
  /data/local-files/?d=<name>   same (auth required)
  /public/<name>                no auth
  /slow/<name>                  sleeps `slow_s` before answering
  /forbidden/<name>             403 with a valid token
  /login-redirect/<name>        302 to /user/login/ (Label Studio's answer to a browser without a session)
  /user/login/                  an HTML page
"""
from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def _b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")


def make_jwt(payload: dict) -> str:
    """A JWT-shaped token (the backend reads token_type and exp; it does not verify signatures)."""
    return f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(payload)}.c2lnbmF0dXJl"


class ImageServer:
    def __init__(self, files: dict[str, bytes], legacy_token: str = "legacy-token-0123456789abcdef",
                 access_ttl: float = 300.0, slow_s: float = 3.0):
        self.files = files
        self.legacy_token = legacy_token
        self.pat = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "pat1"})
        self.access_ttl = access_ttl
        self.slow_s = slow_s
        self.access: dict[str, float] = {}      # access token -> expiry
        self.refreshes = 0
        self.requests: list[tuple[str, str, str]] = []   # (method, path, Authorization header)
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() waits for serve_forever's next poll: 0.05 s instead of the default 0.5 s per
        # server, which was most of many short tests' time
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def expire_all_access_tokens(self) -> None:
        with self._lock:
            self.access = {k: 0.0 for k in self.access}

    def _authorized(self, header: str) -> bool:
        if header == f"Token {self.legacy_token}":
            return True
        if header.startswith("Bearer "):
            with self._lock:
                exp = self.access.get(header[7:])
            return exp is not None and time.time() < exp
        return False

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_POST(self):
                server.requests.append(("POST", self.path, self.headers.get("Authorization", "")))
                if self.path != "/api/token/refresh/":
                    return self._send(404, b'{"detail":"not found"}')
                data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if data.get("refresh") != server.pat:
                    return self._send(401, b'{"detail":"Token is invalid or expired"}')
                exp = time.time() + server.access_ttl
                access = make_jwt({"token_type": "access", "exp": int(exp) + 1,
                                   "jti": f"a{server.refreshes}"})
                with server._lock:
                    server.refreshes += 1
                    server.access[access] = exp
                self._send(200, json.dumps({"access": access}).encode())

            def do_GET(self):
                auth = self.headers.get("Authorization", "")
                server.requests.append(("GET", self.path, auth))
                u = urlsplit(self.path)
                parts = u.path.strip("/").split("/")
                if u.path.startswith("/user/login"):
                    return self._send(200, b"<html>login</html>", "text/html")
                if u.path.startswith("/data/local-files"):
                    name = parse_qs(u.query).get("d", [""])[0]
                    kind = "upload"
                elif u.path.startswith("/data/upload/"):
                    name, kind = parts[-1], "upload"
                else:
                    kind, name = parts[0], parts[-1]
                if kind == "login-redirect":
                    return self._send(302, b"", "text/html", {"Location": "/user/login/?next=" + u.path})
                if kind in ("upload", "forbidden", "slow") and not server._authorized(auth):
                    return self._send(401, b'{"detail":"Authentication credentials were not provided."}')
                if kind == "forbidden":
                    return self._send(403, b'{"detail":"forbidden"}')
                if kind == "slow":
                    time.sleep(server.slow_s)
                if name not in server.files:
                    return self._send(404, b'{"detail":"not found"}')
                self._send(200, server.files[name], "image/jpeg")

        return Handler
