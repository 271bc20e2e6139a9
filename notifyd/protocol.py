"""
Wire protocol v1: JSON text frames, without I/O.

Server frames always carry ``event``; client frames carry ``action``. This
module encodes the first (what a client is sent, and how: close codes and
their reasons, the wire frame), and :mod:`notifyd.client_frames` decodes the
second (see ``docs/protocol.md``).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import IntEnum
from typing import Any, Protocol

import orjson

__all__ = [
    "PROTOCOL_VERSION",
    "CloseCode",
    "MessageRow",
    "close_reason",
    "encode",
    "encode_error",
    "encode_hello",
    "encode_message",
    "encode_refreshed",
    "encode_resync",
    "text_frame",
    "with_counts",
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
    TRY_AGAIN_LATER = 1013  # overloaded by handshakes: reconnect after the retry hint
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
    CloseCode.TRY_AGAIN_LATER: "try again later",
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
    return orjson.dumps(frame).decode()


_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def text_frame(payload: bytes) -> bytes:
    """
    ``payload`` (UTF-8 JSON) as one complete WebSocket text frame from the
    server: FIN set, unmasked, no extension (RFC 6455, section 5.2).

    Without per-connection compression these bytes are the same for every
    session, so a message fanned out to many sessions is framed once.
    """
    length = len(payload)
    if length < 126:
        return _SHORT.pack(0x81, length) + payload
    if length < 65536:
        return _MEDIUM.pack(0x81, 126, length) + payload
    return _LONG.pack(0x81, 127, length) + payload


def _iso(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    return value


def _text(value: object) -> str | None:
    return None if value is None else str(value)


_SAFE_ABSOLUTE = re.compile(r"https?://[^\s/?#\\]+(?:[/?#][^\s]*)?", re.IGNORECASE)
_SAFE_PATH = re.compile(r"/(?:[^/\\\s][^\s]*)?")


def safe_url(url: str | None) -> str | None:
    """
    ``url`` if a browser can follow it without running code: an absolute
    http(s) URL or a path starting with a single ``/``; None otherwise
    (``javascript:``, ``data:``, ``//host``, leading spaces, ...).
    """
    if url is None:
        return None
    if _SAFE_ABSOLUTE.fullmatch(url) or _SAFE_PATH.fullmatch(url):
        return url
    return None


class MessageRow(Protocol):
    """
    A message row read by column name: an ``asyncpg.Record`` from
    :mod:`notifyd.db` (which is not a ``Mapping``), or a dict in tests.
    """

    def __getitem__(self, column: str, /) -> Any: ...


def message_frame(row: MessageRow, cursor: str) -> dict[str, Any]:
    """
    A row as the ``message`` frame shows it: camelCase, as the seed's Jackson
    serialisation wrote it, plus ``event`` and ``cursor``.

    ``sendTime`` is ISO 8601 with the UTC offset when the column has a time
    zone, without one when it has not. ``skipUrl`` passes :func:`safe_url`.
    """
    return {
        "event": "message",
        "cursor": cursor,
        "id": _text(row["id"]),
        "title": row["title"],
        "content": row["content"],
        "type": row["type"],
        "sendUser": row["send_user"],
        "toUser": row["to_user"],
        "sendTime": _iso(row["send_time"]),
        "skipUrl": safe_url(row["skip_url"]),
        "isRead": _text(row["is_read"]),
    }


def with_counts(message: bytes, by_type: Mapping[str, int]) -> bytes:
    """
    An encoded ``message`` frame (a JSON object) with the user's unread
    counts after it added: ``unread`` (the total) and ``unreadByType`` (as
    in ``hello``), for a client that asked for them there
    (``?counts=inline``).
    """
    return b"".join(
        (
            message[:-1],
            b',"unread":',
            str(sum(by_type.values())).encode(),
            b',"unreadByType":',
            orjson.dumps(by_type),
            b"}",
        )
    )


def encode_message(row: MessageRow, cursor: str) -> str:
    """
    The ``message`` frame for one row; see :func:`message_frame`.
    """
    return encode(message_frame(row, cursor))


def history_cursor(seq: int) -> str:
    """
    The cursor of a message listed by history: good for paging with
    ``before``, not a resume position.
    """
    return f"~{seq}"


def seq_of_cursor(cursor: str) -> int | None:
    """
    The message position a message cursor ends with (``...~<seq>``), for
    ``before`` in history; None when it has none.
    """
    _, tilde, seq = cursor.rpartition("~")
    if tilde and _DIGITS.fullmatch(seq):
        return int(seq)
    return None


_DIGITS = re.compile("[0-9]{1,19}")


def encode_hello(
    user: str, cursor: str, recovered: bool | None, unread_by_type: Mapping[str, int]
) -> str:
    """
    The first frame of every session, with the user's unread counts: the
    total (``unread``) and by category (``unreadByType``).

    ``recovered`` is present only when the client asked to resume: true only
    when everything after its cursor is being replayed.
    """
    frame: dict[str, Any] = {
        "event": "hello",
        "version": PROTOCOL_VERSION,
        "user": user,
        "cursor": cursor,
        "unread": sum(unread_by_type.values()),
        "unreadByType": unread_by_type,
    }
    if recovered is not None:
        frame["recovered"] = recovered
    return encode(frame)


def encode_unread(by_type: Mapping[str, int]) -> str:
    """
    The user's unread counts changed: the total (``count``) and the full
    counts by category after the change (``byType``).
    """
    return encode({"event": "unread", "count": sum(by_type.values()), "byType": by_type})


def encode_read(ids: list[str] | None, type: str | None, *, read: bool = True) -> str:
    """
    Messages were marked read (or unread again, ``read=False``); ``ids``
    None means all of the user's messages (of ``type`` when given).
    """
    frame: dict[str, Any] = {"event": "read"}
    if ids is None:
        frame.update(all=True, type=type)
    else:
        frame["ids"] = ids
    if not read:
        frame["isRead"] = "0"
    return encode(frame)


def encode_deleted(ids: list[str]) -> str:
    """
    Messages were retracted: remove them from lists.
    """
    return encode({"event": "deleted", "ids": ids})


def encode_history(request_id: object, rows: Sequence[MessageRow], more: bool) -> str:
    """
    The answer to a ``history`` action, newest first.
    """
    frame: dict[str, Any] = {"event": "history"}
    if request_id is not None:
        frame["id"] = request_id
    frame["messages"] = [message_frame(row, history_cursor(row["seq"])) for row in rows]
    frame["more"] = more
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


def encode_refreshed(request_id: object, expires_at: float) -> str:
    """
    The answer to an accepted ``refresh``: the session now lasts until
    ``expires`` (the new token's ``exp``, unix seconds).
    """
    frame: dict[str, Any] = {"event": "refreshed"}
    if request_id is not None:
        frame["id"] = request_id
    frame["expires"] = int(expires_at)
    return encode(frame)
