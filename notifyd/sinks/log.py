"""
The built-in log sink: one JSON line per message, an audit trail.

``NOTIFYD_LOG_SINK_PATH`` is a file opened for appending (``-``: stdout,
which ``notifyd serve`` leaves to it: the daemon's own log is on stderr).
Each line is the message with the WebSocket frame's field names plus
``loggedAt`` and ``online`` (a live session on this instance had it). Every
instance logs what it routed: with several instances, give each its own
file.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import IO

import orjson

from ..exceptions import ConfigError
from . import SinkContext, SinkMessage
from .policy import type_allowed

__all__ = ["LogSink", "create"]


def create(context: SinkContext) -> LogSink:
    """
    The ``log`` entry point.
    """
    settings = context.settings
    return LogSink(context, settings.log_sink_path, settings.log_sink_types)


class LogSink:
    """
    Appends a JSON line per message of the configured types.
    """

    counts_itself = True

    def __init__(self, context: SinkContext, path: str, types: list[str]) -> None:
        self._stats = context.stats
        self._types = list(types)
        self._owned = path != "-"
        if self._owned:
            try:
                self._file: IO[bytes] = open(path, "ab")
            except OSError as exc:
                raise ConfigError(
                    f"NOTIFYD_LOG_SINK_PATH {path!r} cannot be opened for appending: {exc.strerror}"
                ) from None
        else:
            self._file = sys.stdout.buffer

    async def __call__(self, message: SinkMessage, online: bool) -> None:
        """
        Write the message's line (or count it skipped by the type filter).
        """
        if not type_allowed(message.type, self._types):
            self._stats.skipped += 1
            return
        line = {
            "loggedAt": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "online": online,
            **message.to_json(),
        }
        # One write per line: lines of concurrent writers never interleave
        # in an O_APPEND file.
        self._file.write(orjson.dumps(line) + b"\n")
        self._file.flush()
        self._stats.sent += 1

    async def aclose(self) -> None:
        """
        Close the file (stdout is left open).
        """
        if self._owned:
            self._file.close()
