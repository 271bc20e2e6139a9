"""
Unit tests for :mod:`notifyd.credentials`: where a handshake carries its
token and which user a path names. Pure: plain headers and paths, no server.
"""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers

from notifyd.credentials import (
    ROUTE_MESSAGE,
    ROUTE_MESSAGE_USER,
    token_from_handshake,
    user_from_path,
)

# -------------------------------------------------------- token_from_handshake


def _find(query: dict[str, str] | None = None, **headers: str) -> str | None:
    raw = Headers()
    for name, value in headers.items():
        raw[name.replace("_", "-")] = value
    return token_from_handshake(query=query or {}, headers=raw, cookie_name="notifyd_token")


def test_handshake_token_precedence_query_then_header_then_cookie() -> None:
    """?token= beats Authorization, which beats the cookie."""
    everything = {"Authorization": "Bearer H", "Cookie": "notifyd_token=C"}
    assert _find({"token": "Q"}, **everything) == "Q"
    assert _find({}, **everything) == "H"
    assert _find({}, Cookie="notifyd_token=C") == "C"
    assert _find({}) is None


def test_handshake_empty_values_count_as_absent() -> None:
    """An empty ?token= or empty Bearer value falls through to the next source."""
    assert _find({"token": ""}, Authorization="Bearer H") == "H"
    assert _find({"token": "  "}, Authorization="Bearer", Cookie="notifyd_token=C") == "C"
    assert _find({}, Cookie="notifyd_token=") is None


def test_handshake_bearer_scheme_is_case_insensitive_and_others_ignored() -> None:
    """'bearer'/'BEARER' work (header name too); Basic auth is ignored in favour of the cookie."""
    assert _find({}, authorization="bearer abc") == "abc"
    assert _find({}, AUTHORIZATION="BEARER abc") == "abc"
    assert _find({}, Authorization="Basic dXNlcjpwYXNz", Cookie="notifyd_token=C") == "C"
    assert _find({}, Authorization="Bearer a b", Cookie="notifyd_token=C") == "C"


def test_handshake_repeated_authorization_header_is_ignored() -> None:
    """Two Authorization headers are ambiguous and count as none (no exception)."""
    headers = Headers([("Authorization", "Bearer A"), ("Authorization", "Bearer B")])
    assert token_from_handshake(query={}, headers=headers, cookie_name="t") is None


@pytest.mark.parametrize(
    "cookie",
    [
        "notifyd_token=T",
        "a=b; notifyd_token=T; c=d",
        'notifyd_token="T"',
        "garbage; notifyd_token=T",
        'a="unterminated; notifyd_token=T',
        "=; ;;; notifyd_token=T; path=/",
        "other=x; notifyd_token=T; notifyd_token=U",
    ],
)
def test_handshake_cookie_found_despite_garbage(cookie: str) -> None:
    """The named cookie is found among other, quoted or malformed cookies (first one wins)."""
    assert _find({}, Cookie=cookie) == "T"


@pytest.mark.parametrize(
    "cookie",
    ["", ";;;", "garbage", "é=ü", "notifyd_token", "NOTIFYD_TOKEN=T", "x_notifyd_token=T"],
)
def test_handshake_garbage_cookie_header_gives_none(cookie: str) -> None:
    """A Cookie header without our (case-sensitive) cookie yields None, never an exception."""
    assert _find({}, Cookie=cookie) is None


def test_handshake_control_characters_in_cookie_header_give_none() -> None:
    """Bytes websockets itself would refuse (NUL, 0xFF) do not crash the lookup either."""
    headers = {"Cookie": "\x00\xff; notifyd_token\x00=T"}
    assert token_from_handshake(query={}, headers=headers, cookie_name="notifyd_token") is None


def test_handshake_cookie_in_second_cookie_header() -> None:
    """Repeated Cookie headers (HTTP/2 style) are all searched."""
    headers = Headers([("Cookie", "a=b"), ("Cookie", "notifyd_token=T")])
    assert token_from_handshake(query={}, headers=headers, cookie_name="notifyd_token") == "T"


def test_handshake_accepts_plain_mapping_headers() -> None:
    """Any object with .get(name) works, e.g. a dict with canonical header names."""
    headers = {"Authorization": "Bearer abc"}
    assert token_from_handshake(query={}, headers=headers, cookie_name="t") == "abc"


# ------------------------------------------------------------ user_from_path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/ws/message", (ROUTE_MESSAGE, None)),
        ("/ws/message/", (ROUTE_MESSAGE, None)),
        ("/ws/message/alice", (ROUTE_MESSAGE_USER, "alice")),
        ("/ws/message/alice/", (ROUTE_MESSAGE_USER, "alice")),
        ("/ws/message/%E5%BC%A0%E4%B8%89", (ROUTE_MESSAGE_USER, "张三")),
        ("/ws/message/a%20b+c", (ROUTE_MESSAGE_USER, "a b+c")),
        ("/ws/message/42", (ROUTE_MESSAGE_USER, "42")),
        ("/ws/message/" + "u" * 255, (ROUTE_MESSAGE_USER, "u" * 255)),
    ],
)
def test_user_from_path_matches_message_routes(path: str, expected: tuple[str, str | None]) -> None:
    """/ws/message and /ws/message/{userId} match, with the id percent-decoded."""
    assert user_from_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/ws/other",
        "/",
        "",
        "/ws",
        "/ws/messages",
        "/ws/message//",
        "/ws/message/a/b",
        "/WS/MESSAGE",
        "/ws/message/" + "u" * 256,
        "/ws/message/%FF",
        "/ws/message/a%00b",
        "/ws/message/" + "%E5%BC%A0" * 2000,
    ],
)
def test_user_from_path_rejects_other_paths(path: str) -> None:
    """Any other path, or an empty, over-long, bad-UTF-8 or control-character id, gives None."""
    assert user_from_path(path) is None
