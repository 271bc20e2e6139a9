"""
Exceptions raised by notifyd.

Their text is for operators and logs, never for WebSocket clients: what a
client sees is decided in one place, :mod:`notifyd.protocol` (close codes and
error codes).

* :exc:`NotifydError`
    * :exc:`ConfigError` — a setting is missing or invalid (CLI exit code 2).
    * :exc:`DatabaseError` — Postgres is unreachable or unusable.
        * :exc:`ReplicaError` — the database is a hot standby; LISTEN cannot
          work there.
        * :exc:`SchemaError` — the table or its triggers are missing.
        * :exc:`ListenPathError` — NOTIFYs never reach the LISTEN
          connection (a transaction-mode pooler in the way).
    * :exc:`AuthError` — a token was rejected; ``reason`` is for the log only.
    * :exc:`ProtocolError` — a client frame is malformed; ``code`` is the
      error code sent back.
    * :exc:`CursorError` — a client-supplied cursor cannot be decoded.

:func:`describe` puts any exception in one line for a log or a message.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "CursorError",
    "DatabaseError",
    "LineageChanged",
    "ListenPathError",
    "NotifydError",
    "ProtocolError",
    "ReplicaError",
    "SchemaError",
    "describe",
]


class NotifydError(Exception):
    """
    Base class of every exception notifyd raises on purpose.
    """


class ConfigError(NotifydError):
    """
    A setting is missing or invalid.
    """


class DatabaseError(NotifydError):
    """
    Postgres is unreachable or cannot be used.
    """


class LineageChanged(DatabaseError):
    """
    The database's history changed (a standby was promoted, or a restore
    started a new timeline): its connections are refused until delivery has
    repaired what the change may hide (:mod:`notifyd.failover`).
    """


class ReplicaError(DatabaseError):
    """
    The database is in recovery (a hot standby), where LISTEN is impossible.
    """


class SchemaError(DatabaseError):
    """
    The message table, its columns or its triggers are missing.
    """


class ListenPathError(DatabaseError):
    """
    NOTIFYs are sent but never reach the LISTEN connection: something
    between it and Postgres (a transaction-mode pooler) breaks LISTEN.
    """


class AuthError(NotifydError):
    """
    A token was rejected.

    ``reason`` says why, for the log; clients only learn that it failed.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProtocolError(NotifydError):
    """
    A client frame could not be understood.

    ``limit`` names the configured limit the frame went over, if that is
    why (for the metric); the client sees ``code`` either way.
    """

    def __init__(
        self, code: str, message: str, request_id: object = None, *, limit: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.limit = limit


class CursorError(NotifydError):
    """
    A cursor supplied by a client is malformed.
    """


def describe(exc: BaseException) -> str:
    """
    ``exc`` in one line, for a log line or an error message: the first line
    of its text after its type name, which tells what kind of failure it
    was; notifyd's own exceptions without it, their text is written to be
    read alone. The type name alone when there is no text.
    """
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    if isinstance(exc, NotifydError):
        return lines[0]
    return f"{type(exc).__name__}: {lines[0]}"
