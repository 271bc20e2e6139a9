"""
What a WebSocket handshake carries: the token, the subprotocols offered, and
the user a path names.

Pure functions over a request's path and headers: no network, no clock, no
logging. A new place a client may put its token goes here
(:func:`token_from_handshake`), and nowhere else. Every function treats
malformed input as absent and never raises.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Protocol
from urllib.parse import unquote

__all__ = [
    "BEARER_PREFIX",
    "MAX_USER_CHARS",
    "ROUTE_MESSAGE",
    "ROUTE_MESSAGE_USER",
    "SUBPROTOCOL",
    "HeaderLookup",
    "bearer_subprotocol",
    "offered_subprotocols",
    "token_from_handshake",
    "user_from_path",
    "valid_user",
]

MAX_USER_CHARS = 255

# The WebSocket subprotocol a client offers next to a ``bearer.<token>``
# entry; the server selects it, so the token is never echoed back.
SUBPROTOCOL = "notifyd.v1"
BEARER_PREFIX = "bearer."

ROUTE_MESSAGE = "/ws/message"
ROUTE_MESSAGE_USER = "/ws/message/{userId}"


class HeaderLookup(Protocol):
    """
    Anything with ``get(name)`` returning a header value or ``None``.

    websockets' ``Headers`` fits and is case-insensitive; a plain ``dict``
    fits too but then the caller must use the exact header-name spelling.
    """

    def get(self, key: str, /) -> str | None:
        """
        Return the header's value, or ``None`` when it is absent.
        """
        ...


def token_from_handshake(
    *,
    query: Mapping[str, str],
    headers: HeaderLookup,
    cookie_name: str,
) -> str | None:
    """
    Find the token a WebSocket handshake carries.

    Looks, in order, at the ``token`` query parameter, an ``Authorization:
    Bearer <token>`` header (scheme case-insensitive), a ``bearer.<token>``
    entry of ``Sec-WebSocket-Protocol`` and the cookie named
    ``cookie_name``; the first non-empty one wins. Returns ``None`` when
    there is none. Never raises on malformed headers or cookies: garbage
    counts as absent.
    """
    from_query = query.get("token")
    if isinstance(from_query, str) and from_query.strip():
        return from_query.strip()

    authorization = _header(headers, "Authorization")
    if authorization is not None:
        parts = authorization.split()
        if len(parts) == 2 and parts[0].lower() == "bearer":
            return parts[1]

    from_subprotocol = bearer_subprotocol(offered_subprotocols(headers))
    if from_subprotocol is not None:
        return from_subprotocol

    cookie_header = _cookie_header(headers)
    if cookie_header:
        return _cookie_value(cookie_header, cookie_name)
    return None


def offered_subprotocols(headers: HeaderLookup) -> list[str]:
    """
    The entries of every ``Sec-WebSocket-Protocol`` header, in order.

    Never raises: a malformed header yields whatever splits cleanly.
    """
    values = _header_values(headers, "Sec-WebSocket-Protocol")
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def bearer_subprotocol(offered: list[str]) -> str | None:
    """
    The token of the first ``bearer.<token>`` entry (prefix case-
    insensitive), or None. A JWT is base64url and dots, all legal in a
    subprotocol name, so it is carried as is. Never raises.
    """
    for item in offered:
        if item[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX and len(item) > len(BEARER_PREFIX):
            return item[len(BEARER_PREFIX) :]
    return None


def user_from_path(path: str) -> tuple[str, str | None] | None:
    """
    Match a request path against the WebSocket routes.

    Returns ``(ROUTE_MESSAGE, None)`` for ``/ws/message``,
    ``(ROUTE_MESSAGE_USER, user)`` for ``/ws/message/{userId}`` with the
    user id percent-decoded, and ``None`` for any other path or an invalid
    user id (empty, over 255 characters, bad UTF-8, control characters).
    One trailing slash is tolerated. ``path`` must not include the query
    string. Never raises.
    """
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    if path == ROUTE_MESSAGE:
        return ROUTE_MESSAGE, None
    prefix = ROUTE_MESSAGE + "/"
    if not path.startswith(prefix):
        return None
    raw = path[len(prefix) :]
    # Each decoded character is at most 4 UTF-8 bytes of 3 chars ("%XX")
    # each; anything longer cannot decode to a valid id, so skip the work.
    if not raw or "/" in raw or len(raw) > MAX_USER_CHARS * 12:
        return None
    try:
        user = unquote(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        return None
    if not valid_user(user):
        return None
    return ROUTE_MESSAGE_USER, user


def valid_user(user: str) -> bool:
    """
    Whether ``user`` is an acceptable user id: 1-255 characters, none of
    them control characters or lone surrogates.

    Those would break log lines and Postgres text columns (which reject NUL
    and cannot store surrogates). Never raises.
    """
    if not 0 < len(user) <= MAX_USER_CHARS:
        return False
    return not any(unicodedata.category(char) in ("Cc", "Cs") for char in user)


def _header(headers: HeaderLookup, name: str) -> str | None:
    """
    Return a single header value, or ``None`` when absent or repeated.

    websockets' ``Headers.get`` raises ``MultipleValuesError`` (a
    ``LookupError``) for a repeated header; two Authorization headers are
    ambiguous, so they count as none. Never raises.
    """
    try:
        value = headers.get(name)
    except LookupError:
        return None
    return value if isinstance(value, str) else None


def _header_values(headers: HeaderLookup, name: str) -> list[str]:
    """
    Every value of a header that may repeat, in order; a plain mapping gives
    at most its single value. Never raises.
    """
    get_all = getattr(headers, "get_all", None)
    if callable(get_all):
        try:
            return [value for value in get_all(name) if isinstance(value, str)]
        except LookupError:
            return []
    single = _header(headers, name)
    return [single] if single is not None else []


def _cookie_header(headers: HeaderLookup) -> str | None:
    """
    Return the Cookie header, joining repeated ones (legal for HTTP/2).

    Never raises.
    """
    return "; ".join(_header_values(headers, "Cookie")) or None


def _cookie_value(cookie_header: str, name: str) -> str | None:
    """
    Return the first non-empty value of cookie ``name``, or ``None``.

    Each ``;``-separated pair is parsed on its own because ``SimpleCookie``
    discards the whole header when any one pair is malformed, and a stray
    cookie from another app must not hide ours. Never raises.
    """
    for pair in cookie_header.split(";"):
        jar = SimpleCookie()
        try:
            jar.load(pair)
        except CookieError:
            continue
        morsel = jar.get(name)
        if morsel is not None and morsel.value.strip():
            return morsel.value.strip()
    return None
