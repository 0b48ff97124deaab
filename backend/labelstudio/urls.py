"""Which server a URL reaches, decided once, by the parser that sends the request.

requests hands every URL to urllib3's `parse_url`; the standard library's `urlsplit` reads some URLs
differently (`http://a:1\\@b:2/` is host a for urllib3, host b for urlsplit). A credential decision
taken with one parser and a request sent with the other sends the key to the wrong server, so here
a URL is parsed by urllib3 and its string form is what gets sent; a URL the two parsers disagree on,
or one with a backslash, control characters or user:password@, is refused outright.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

DEFAULT_PORTS = {"http": 80, "https": 443}
# The only Label Studio paths a key is sent with: uploaded files and local-storage files.
LS_FILE_PREFIXES = ("/data/upload/", "/data/local-files/")


class UrlError(ValueError):
    """The URL is refused; the message says why."""


@dataclass(frozen=True)
class Target:
    url: str                     # what the request is sent to (urllib3's normalised form)
    origin: tuple                # (scheme, host, port): where a credential may go
    path: str                    # percent-decoded path, as the server will read it


def parse_http_url(url: str) -> Target:
    if not isinstance(url, str) or not url:
        raise UrlError("no URL")
    # urlsplit drops tabs and newlines that urllib3 refuses; a backslash is a path for one parser
    # and part of the host for the other. (Spaces are left to urllib3: encoded in a path, refused
    # in a host.)
    if "\\" in url or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UrlError(f"{short(url)!r} has a backslash or a control character")
    try:
        u = parse_url(url)
        std = urlsplit(url)
        std_port = std.port
    except (LocationParseError, ValueError) as e:
        raise UrlError(f"{short(url)!r} is not a valid URL ({e})") from None
    scheme = (u.scheme or "").lower()
    if scheme not in DEFAULT_PORTS or not u.host:
        raise UrlError(f"{short(url)!r} is not an http(s) URL with a host")
    if u.auth is not None or "@" in std.netloc:
        raise UrlError(f"{short(url)!r} has user:password@ in it")
    origin = (scheme, u.host.lower().strip("[]"), u.port or DEFAULT_PORTS[scheme])
    if (std.scheme.lower(), (std.hostname or "").lower(), std_port or DEFAULT_PORTS.get(std.scheme.lower())) != origin:
        raise UrlError(f"{short(url)!r} names different servers depending on who reads it")
    return Target(url=u.url, origin=origin, path=unquote(u.path or "/"))


def ls_file_path(path: str) -> bool:
    """Whether a (percent-decoded) path names a file Label Studio serves to a key holder: under
    /data/upload/ or /data/local-files/, with no '.' or '..' segment that could climb out."""
    if "\\" in path or "\x00" in path or any(seg in (".", "..") for seg in path.split("/")):
        return False
    return path.startswith(LS_FILE_PREFIXES) or path == "/data/local-files"


def short(url: str, limit: int = 120) -> str:
    """A URL for a message: data: URIs and other long ones cut to `limit` characters."""
    url = str(url)
    return url if len(url) <= limit else url[:limit] + "..."
