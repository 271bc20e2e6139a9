"""
Logging set up once, by the CLI: one event per line on stderr.

journald (or the container runtime) adds the timestamp, so lines carry the
level, the logger and the message, as ``key=value`` pairs or as JSON
(``NOTIFYD_LOG_FORMAT``). stderr, not stdout: commands print their results
on stdout (``$(notifyd token u1)``), and journald captures both. Library
code only ever calls ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["JsonFormatter", "KeyValueFormatter", "configure_logging"]


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "=\n\t'):
        return value
    return json.dumps(value, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """
    ``level=INFO logger=notifyd.listener msg="LISTEN connection established"``.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"level={record.levelname} logger={record.name} "
            f"msg={_quote(record.getMessage())}"
        )
        if record.exc_info:
            line += f" exc={_quote(self.formatException(record.exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    """
    ``{"level":"INFO","logger":"notifyd.listener","msg":"..."}``.
    """

    def format(self, record: logging.LogRecord) -> str:
        event = {"level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


def configure_logging(level: str, fmt: str) -> None:
    """
    Send every log event to stderr, one line each, in ``fmt`` ("kv" or "json").
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
