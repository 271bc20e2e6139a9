"""
Logging set up once, by the CLI: one event per line.

journald (or the container runtime) adds the timestamp, so lines carry the
level, the logger and the message, as ``key=value`` pairs or as JSON
(``NOTIFYD_LOG_FORMAT``). The long-running commands (``serve``, ``demo``)
log to stdout, the stream journald and container runtimes collect as the
service's output. One-shot commands log to stderr, because their results
are their stdout (``$(notifyd token u1)``). Library code only ever calls
``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import json
import logging
from typing import TextIO

__all__ = [
    "JsonFormatter",
    "KeyValueFormatter",
    "configure_logging",
    "line_handler",
    "remote_of",
    "via_of",
]

# websockets' own per-connection lines; notifyd logs "session opened" and
# "session closed" with the user and the close code in their place.
_REPLACED_LINES = frozenset({"connection open", "connection closed"})


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "=\n\t'):
        return value
    return json.dumps(value, ensure_ascii=False)


def remote_of(record: logging.LogRecord) -> str | None:
    """
    The client of the WebSocket connection a record is about: the peer
    ``host:port``, or behind a trusted proxy the address it forwarded
    (proxies do not forward the client's port).

    websockets' connection loggers, and notifyd's calls with
    ``extra={"websocket": connection}``, attach the connection to the record.
    """
    connection = getattr(record, "websocket", None)
    if connection is None:
        return None
    forwarded = getattr(connection, "forwarded_client", None)
    if forwarded is not None:
        return str(forwarded)
    return _peer_of(connection)


def via_of(record: logging.LogRecord) -> str | None:
    """
    The proxy's ``host:port`` when the record's client came through a
    trusted proxy; None otherwise.
    """
    connection = getattr(record, "websocket", None)
    if getattr(connection, "forwarded_client", None) is None:
        return None
    return _peer_of(connection)


def _peer_of(connection: object) -> str | None:
    try:
        host, port = connection.remote_address[:2]  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return None
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class _ReplacedLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("websockets") and record.msg in _REPLACED_LINES)


class _OneLineLibraryFailures(logging.Filter):
    """
    asyncpg's pool logs each failed reconnect with its traceback (every
    retry, for as long as the database is down): an outage is the
    operator's to fix, not a bug, so the line names the failure instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("asyncpg") and record.exc_info and record.exc_info[1]:
            failure = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(failure).__name__}: {failure})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class KeyValueFormatter(logging.Formatter):
    """
    ``level=INFO logger=notifyd.listener msg="LISTEN connection established"``,
    plus ``remote=`` for a record about a WebSocket connection (and ``via=``
    the proxy it came through, behind a trusted one).
    """

    def format(self, record: logging.LogRecord) -> str:
        line = f"level={record.levelname} logger={record.name} msg={_quote(record.getMessage())}"
        remote = remote_of(record)
        if remote is not None:
            line += f" remote={_quote(remote)}"
        via = via_of(record)
        if via is not None:
            line += f" via={_quote(via)}"
        if record.exc_info:
            line += f" exc={_quote(self.formatException(record.exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    """
    ``{"level":"INFO","logger":"notifyd.listener","msg":"..."}``.
    """

    def format(self, record: logging.LogRecord) -> str:
        event = {"level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        remote = remote_of(record)
        if remote is not None:
            event["remote"] = remote
        via = via_of(record)
        if via is not None:
            event["via"] = via
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


def line_handler(fmt: str, stream: TextIO) -> logging.Handler:
    """
    A handler that writes each event to ``stream`` as one line in ``fmt``
    ("kv" or "json").
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(_ReplacedLines())
    handler.addFilter(_OneLineLibraryFailures())
    return handler


def configure_logging(level: str, fmt: str, stream: TextIO) -> None:
    """
    Send every log event to ``stream``, one line each, in ``fmt`` ("kv" or "json").
    """
    handler = line_handler(fmt, stream)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
