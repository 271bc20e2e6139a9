"""
What a client may send: its action frames, decoded and checked, without I/O.

Every client frame is a JSON object with ``action``; :func:`parse_client_frame`
turns one into an action object or raises
:class:`~notifyd.exceptions.ProtocolError` with the error code the client is
answered with (``docs/protocol.md``). A new action's frame is added here, and
what the server does with it in :mod:`notifyd.actions`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .exceptions import ProtocolError
from .protocol import seq_of_cursor

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "MAX_HISTORY_LIMIT",
    "MAX_READ_IDS",
    "Auth",
    "ClientAction",
    "Delete",
    "DemoSend",
    "History",
    "Ping",
    "Read",
    "ReadAll",
    "Refresh",
    "Unread",
    "clean_text",
    "parse_client_frame",
]


@dataclass(frozen=True, slots=True)
class Ping:
    """
    ``{"action":"ping"}``: answered with ``{"event":"pong"}``.
    """


@dataclass(frozen=True, slots=True)
class Auth:
    """
    ``{"action":"auth","token":"...","since":"<cursor>"}``: first-frame auth.
    """

    token: str
    since: str | None


@dataclass(frozen=True, slots=True)
class Refresh:
    """
    ``{"action":"refresh","token":"..."}``: extend the session with a new
    token of the same user before the current one expires.
    """

    token: str
    request_id: object = None


@dataclass(frozen=True, slots=True)
class Read:
    """
    ``{"action":"read","ids":[...]}``: mark these messages read.
    """

    ids: list[str]
    request_id: object = None


@dataclass(frozen=True, slots=True)
class Unread:
    """
    ``{"action":"unread","ids":[...]}``: mark these messages unread again.
    """

    ids: list[str]
    request_id: object = None


@dataclass(frozen=True, slots=True)
class Delete:
    """
    ``{"action":"delete","ids":[...]}``: remove these messages from the
    user's inbox (hidden for this user; see docs/protocol.md).
    """

    ids: list[str]
    request_id: object = None


@dataclass(frozen=True, slots=True)
class ReadAll:
    """
    ``{"action":"read_all","type":null}``: mark all (of a type) read.
    """

    type: str | None
    request_id: object = None


@dataclass(frozen=True, slots=True)
class History:
    """
    ``{"action":"history","before":<cursor|null>,"limit":20,...}``.
    """

    before_seq: int | None
    limit: int
    type: str | None
    unread_only: bool
    request_id: object = None


@dataclass(frozen=True, slots=True)
class DemoSend:
    """
    ``{"action":"demo_send","to":"bob","title":...,"content":...,"skipUrl":...,
    "type":...}``: insert a message (of a category, when ``type`` is given)
    for a demo user. Honoured by ``notifyd demo`` only;
    any other server answers ``unknown_action``.
    """

    to: str
    title: str | None
    content: str | None
    skip_url: str | None
    request_id: object = None
    type: str | None = None


ClientAction = Ping | Auth | Refresh | Read | Unread | Delete | ReadAll | History | DemoSend

MAX_READ_IDS = 1000
MAX_HISTORY_LIMIT = 100
DEFAULT_HISTORY_LIMIT = 20
_MAX_TEXT = 255
_MAX_REQUEST_ID = 64
_MAX_DEMO_CONTENT = 2000
# An echoed integer id must survive orjson (64-bit) and JavaScript (2**53).
_MAX_SAFE_INTEGER = 2**53 - 1


def clean_text(value: str) -> bool:
    """
    Whether a client string can reach Postgres and the encoder: no NUL
    (text columns refuse it) and no lone surrogate (JSON's ``"\\ud800"``
    decodes to one; UTF-8 cannot encode it). Never raises.
    """
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _request_id(frame: Mapping[str, Any]) -> object:
    """
    The client's ``id`` to echo: a short clean string or a JSON-safe
    integer, else None.
    """
    value = frame.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER else None
    if isinstance(value, str) and len(value) <= _MAX_REQUEST_ID and clean_text(value):
        return value
    return None


def _message_ids(frame: Mapping[str, Any], max_ids: int) -> list[str]:
    """
    The ``ids`` of a read, unread or delete: 1 to ``max_ids`` short clean
    strings (the ``read_ids`` limit counts a list that is too long).
    """
    ids = frame.get("ids")
    message = f"ids must be 1 to {max_ids} message id strings"
    if isinstance(ids, list) and len(ids) > max_ids:
        raise ProtocolError("invalid", message, limit="read_ids")
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, str) and 0 < len(i) <= _MAX_TEXT and clean_text(i) for i in ids)
    ):
        raise ProtocolError("invalid", message)
    return ids


def _optional_text(frame: Mapping[str, Any], key: str) -> str | None:
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_TEXT or not clean_text(value):
        raise ProtocolError("invalid", f"{key} must be a short string or null")
    return value


def parse_client_frame(data: str | bytes, *, max_read_ids: int = MAX_READ_IDS) -> ClientAction:
    """
    Decode one client frame.

    Raises :class:`ProtocolError` with an error code (``malformed``,
    ``unknown_action``, ``invalid``) for anything that is not a valid action;
    never raises anything else. Every string that can reach the database is
    :func:`clean_text`.
    """
    if isinstance(data, bytes):
        raise ProtocolError("malformed", "frames must be JSON text")
    try:
        frame = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("malformed", "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError("malformed", "frame must be a JSON object")
    try:
        return _parse_action(frame, max_read_ids)
    except ProtocolError as exc:
        exc.request_id = _request_id(frame)
        raise


def _parse_action(frame: dict[str, Any], max_read_ids: int) -> ClientAction:
    action = frame.get("action")
    if not isinstance(action, str):
        raise ProtocolError("malformed", "frame has no action")
    if action == "ping":
        return Ping()
    if action == "auth":
        token = frame.get("token")
        since = frame.get("since")
        if not isinstance(token, str) or not token:
            raise ProtocolError("invalid", "auth needs a token")
        if since is not None and not isinstance(since, str):
            raise ProtocolError("invalid", "since must be a cursor string")
        return Auth(token, since)
    if action == "refresh":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("invalid", "refresh needs a token")
        return Refresh(token, _request_id(frame))
    if action == "read":
        return Read(_message_ids(frame, max_read_ids), _request_id(frame))
    if action == "unread":
        return Unread(_message_ids(frame, max_read_ids), _request_id(frame))
    if action == "delete":
        return Delete(_message_ids(frame, max_read_ids), _request_id(frame))
    if action == "read_all":
        return ReadAll(_optional_text(frame, "type"), _request_id(frame))
    if action == "history":
        before = frame.get("before")
        before_seq = None
        if before is not None:
            before_seq = seq_of_cursor(before) if isinstance(before, str) else None
            if before_seq is None:
                raise ProtocolError("invalid", "before must be a message cursor or null")
        limit = frame.get("limit", DEFAULT_HISTORY_LIMIT)
        if limit is None:
            limit = DEFAULT_HISTORY_LIMIT
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ProtocolError("invalid", "limit must be a positive integer")
        unread_only = frame.get("unread_only", False)
        if not isinstance(unread_only, bool):
            raise ProtocolError("invalid", "unread_only must be true or false")
        return History(
            before_seq,
            min(limit, MAX_HISTORY_LIMIT),
            _optional_text(frame, "type"),
            unread_only,
            _request_id(frame),
        )
    if action == "demo_send":
        to = frame.get("to")
        if not isinstance(to, str) or not 0 < len(to) <= _MAX_TEXT or not clean_text(to):
            raise ProtocolError("invalid", "to must be a demo user id")
        content = frame.get("content")
        if content is not None and (
            not isinstance(content, str)
            or len(content) > _MAX_DEMO_CONTENT
            or not clean_text(content)
        ):
            raise ProtocolError(
                "invalid", f"content must be a string of at most {_MAX_DEMO_CONTENT} characters"
            )
        return DemoSend(
            to,
            _optional_text(frame, "title"),
            content,
            _optional_text(frame, "skipUrl") or None,
            _request_id(frame),
            _optional_text(frame, "type") or None,
        )
    raise ProtocolError("unknown_action", "unknown action")
