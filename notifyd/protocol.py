"""
Wire protocol v1: JSON text frames, without I/O.

Server frames always carry ``event``; client frames carry ``action``. This
module encodes the first and decodes the second, and is the one place where
close codes and error codes are defined (see ``docs/protocol.md``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Any

from .exceptions import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Auth",
    "ClientAction",
    "CloseCode",
    "Ping",
    "close_reason",
    "encode",
    "encode_error",
    "encode_hello",
    "encode_message",
    "encode_resync",
    "parse_client_frame",
]

PROTOCOL_VERSION = 1


class CloseCode(IntEnum):
    """
    Every close code notifyd sends, and why.
    """

    NORMAL = 1000
    POLICY_VIOLATION = 1008  # abuse, limits
    MESSAGE_TOO_BIG = 1009  # client frame over the size limit
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # server restarting: reconnect and resume
    UNAUTHORIZED = 4401  # bad or expired token
    AUTH_TIMEOUT = 4408  # no auth frame in time
    REPLACED = 4409  # a newer session of the same user took this one's place
    TOO_SLOW = 4429  # could not keep up; resume with the last cursor


_CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "bye",
    CloseCode.POLICY_VIOLATION: "policy violation",
    CloseCode.MESSAGE_TOO_BIG: "frame too big",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.SERVICE_RESTART: "server restarting",
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.AUTH_TIMEOUT: "no auth in time",
    CloseCode.REPLACED: "replaced by a newer session",
    CloseCode.TOO_SLOW: "too slow, resume with your cursor",
}


def close_reason(code: CloseCode) -> str:
    """
    The short, fixed reason text sent with ``code``: never exception text.
    """
    return _CLOSE_REASONS[code]


def encode(frame: Mapping[str, Any]) -> str:
    """
    Serialize one server frame as compact JSON, keeping non-ASCII text as is.
    """
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def _iso(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    return value


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def encode_message(row: Mapping[str, Any], cursor: str) -> str:
    """
    The ``message`` frame for one row: the row in camelCase, as the seed's
    Jackson serialisation wrote it, plus ``event`` and ``cursor``.

    ``sendTime`` is ISO 8601 with the UTC offset when the column has a time
    zone, without one when it has not.
    """
    return encode(
        {
            "event": "message",
            "cursor": cursor,
            "id": _text(row["id"]),
            "title": row["title"],
            "content": row["content"],
            "type": row["type"],
            "sendUser": row["send_user"],
            "toUser": row["to_user"],
            "sendTime": _iso(row["send_time"]),
            "skipUrl": row["skip_url"],
            "isRead": _text(row["is_read"]),
        }
    )


def encode_hello(user: str, cursor: str, recovered: bool | None) -> str:
    """
    The first frame of every session.

    ``recovered`` is present only when the client asked to resume: true only
    when everything after its cursor is being replayed.
    """
    frame: dict[str, Any] = {
        "event": "hello",
        "version": PROTOCOL_VERSION,
        "user": user,
        "cursor": cursor,
    }
    if recovered is not None:
        frame["recovered"] = recovered
    return encode(frame)


def encode_resync(cursor: str) -> str:
    """
    Tells the client that it missed messages and should reload its list from
    history, then continue from ``cursor``.
    """
    return encode({"event": "resync", "cursor": cursor})


def encode_error(code: str, message: str, request_id: object = None) -> str:
    """
    An ``error`` frame; the session stays open.
    """
    frame: dict[str, Any] = {"event": "error", "code": code, "message": message}
    if request_id is not None:
        frame["id"] = request_id
    return encode(frame)


PONG = encode({"event": "pong"})


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


ClientAction = Ping | Auth

def parse_client_frame(data: str | bytes) -> ClientAction:
    """
    Decode one client frame.

    Raises :class:`ProtocolError` with an error code (``malformed``,
    ``unknown_action``, ``invalid``) for anything that is not a valid action;
    never raises anything else.
    """
    if isinstance(data, bytes):
        raise ProtocolError("malformed", "frames must be JSON text")
    try:
        frame = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("malformed", "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError("malformed", "frame must be a JSON object")
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
    raise ProtocolError("unknown_action", "unknown action")

