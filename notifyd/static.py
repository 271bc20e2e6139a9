"""
The static files served next to the WebSocket endpoint: the browser client
(``/notifyd.js`` and its ``/notifyd.d.ts``) and the demo message center
(``/demo``). ``notifyd demo`` also serves the message center at ``/``
through :func:`demo_page`, with the token of a demo user in the page.

:func:`respond` is the whole decision (status, headers, body) as a pure
function of the request; the files are read from the package once, on first
use. :func:`serve` adapts it to a ``websockets`` handshake response.

* ``Cache-Control: no-cache`` with a strong ``ETag``: browsers keep the file
  and revalidate it, so a daemon upgrade is picked up at the next load, and
  ``If-None-Match`` gets a body-less 304.
* CORS, so an app on another origin can ``import`` the module:
  ``Access-Control-Allow-Origin`` echoes the request's ``Origin`` when it is
  in ``NOTIFYD_ALLOWED_ORIGINS``, or is ``*`` when that list is empty;
  always ``Vary: Origin``.
* GET and HEAD only (405 otherwise); 404 for everything when
  ``NOTIFYD_SERVE_STATIC`` is false.
"""

from __future__ import annotations

import email.utils
import hashlib
import html
import http
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .origin import normalise_origin
from .settings import Settings

__all__ = ["ROUTES", "StaticResponse", "demo_page", "handles", "respond", "serve", "to_response"]

logger = logging.getLogger(__name__)

_JS = "text/javascript; charset=utf-8"
_HTML = "text/html; charset=utf-8"

# URL path -> (file in notifyd/static, Content-Type)
ROUTES: dict[str, tuple[str, str]] = {
    "/notifyd.js": ("notifyd.js", _JS),
    "/notifyd.d.ts": ("notifyd.d.ts", "application/typescript; charset=utf-8"),
    "/demo": ("demo.html", _HTML),
    "/demo.html": ("demo.html", _HTML),
    "/demo.js": ("demo.js", _JS),
    "/demo.css": ("demo.css", "text/css; charset=utf-8"),
}

# The demo page loads only its own files and talks only to this daemon.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class StaticResponse:
    """
    An HTTP answer: status, headers (in order), body.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    etag: str


def handles(path: str) -> bool:
    """
    Whether ``path`` (without its query string) is one of the static files.
    """
    return path in ROUTES


@cache
def _load(name: str) -> _File | None:
    try:
        body = resources.files("notifyd").joinpath("static", name).read_bytes()
    except OSError as exc:
        logger.error("static file %s missing from the package: %s", name, exc)
        return None
    return _File(body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def _cors(origin: str | None, allowed_origins: Iterable[str]) -> list[tuple[str, str]]:
    allowed = {normalise_origin(item) for item in allowed_origins if item.strip()}
    if not allowed or "*" in allowed:
        return [("Access-Control-Allow-Origin", "*")]
    if origin is not None and normalise_origin(origin) in allowed:
        return [("Access-Control-Allow-Origin", origin)]
    return []


def _matches(if_none_match: str | None, etag: str) -> bool:
    """
    ``If-None-Match`` with the weak comparison RFC 9110 asks for.
    """
    if if_none_match is None:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def _plain(status: http.HTTPStatus, extra: list[tuple[str, str]] | None = None) -> StaticResponse:
    body = f"{status.phrase}\n".encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        *(extra or []),
    ]
    return StaticResponse(status.value, headers, body)


def respond(
    method: str,
    path: str,
    *,
    origin: str | None,
    if_none_match: str | None,
    enabled: bool,
    allowed_origins: Iterable[str],
) -> StaticResponse | None:
    """
    The answer to a request for a static file; None when ``path`` is not one.
    """
    route = ROUTES.get(path)
    if route is None:
        return None
    if not enabled:
        return _plain(http.HTTPStatus.NOT_FOUND)
    if method not in ("GET", "HEAD"):
        return _plain(http.HTTPStatus.METHOD_NOT_ALLOWED, [("Allow", "GET, HEAD")])
    name, content_type = route
    file = _load(name)
    if file is None:
        return _plain(http.HTTPStatus.NOT_FOUND)
    headers = [
        ("Cache-Control", "no-cache"),
        ("ETag", file.etag),
        ("Vary", "Origin"),
        *_cors(origin, allowed_origins),
        ("X-Content-Type-Options", "nosniff"),
    ]
    if content_type == _HTML:
        headers += [("Content-Security-Policy", _PAGE_POLICY), ("Referrer-Policy", "no-referrer")]
    if path == "/notifyd.js":
        headers.append(("X-TypeScript-Types", "/notifyd.d.ts"))  # Deno picks the types up
    if _matches(if_none_match, file.etag):
        return StaticResponse(http.HTTPStatus.NOT_MODIFIED.value, headers)
    headers += [("Content-Type", content_type), ("Content-Length", str(len(file.body)))]
    return StaticResponse(http.HTTPStatus.OK.value, headers, b"" if method == "HEAD" else file.body)


def demo_page(users: Mapping[str, str], user: str | None) -> StaticResponse:
    """
    The demo message center for ``user`` (the first demo user when None),
    with ``{"user", "token", "users"}`` in a ``<meta name="notifyd-demo">``
    the page reads (the page's policy allows no inline script). 404 for a
    user that is not a demo user. Never cached: it holds a token.
    """
    if user is None and users:
        user = next(iter(users))
    if user is None or user not in users:
        return _plain(http.HTTPStatus.NOT_FOUND)
    file = _load("demo.html")
    if file is None:
        return _plain(http.HTTPStatus.NOT_FOUND)
    config = json.dumps({"user": user, "token": users[user], "users": list(users)})
    meta = f'<meta name="notifyd-demo" content="{html.escape(config, quote=True)}">\n'
    text = file.body.decode()
    anchor = '<meta charset="utf-8">\n'
    body = text.replace(anchor, anchor + "  " + meta, 1).encode()
    headers = [
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Content-Security-Policy", _PAGE_POLICY),
        ("Referrer-Policy", "no-referrer"),
        ("Content-Type", _HTML),
        ("Content-Length", str(len(body))),
    ]
    return StaticResponse(http.HTTPStatus.OK.value, headers, body)


def to_response(answer: StaticResponse) -> Response:
    """
    A :class:`StaticResponse` as a ``websockets`` handshake response.
    """
    status = http.HTTPStatus(answer.status)
    headers = Headers(
        [("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"), *answer.headers]
    )
    return Response(status.value, status.phrase, headers, answer.body)


def serve(request: Request, path: str, settings: Settings) -> Response | None:
    """
    :func:`respond` for a ``websockets`` handshake request. Recent websockets
    pass every method to ``process_request`` (``Request.method``); older ones
    refuse anything but GET before it runs.
    """
    values = request.headers.get_all("If-None-Match")
    answer = respond(
        getattr(request, "method", "GET"),
        path,
        origin=request.headers.get("Origin"),
        if_none_match=", ".join(values) if values else None,
        enabled=settings.serve_static,
        allowed_origins=settings.allowed_origins,
    )
    if answer is None:
        return None
    return to_response(answer)
