"""
Sinks: channels other than the WebSocket for the same committed messages.

A sink is an async callable that receives each committed message and whether
its addressee had a live session on this instance when it arrived::

    class Sink(Protocol):
        async def __call__(self, message: SinkMessage, online: bool) -> None: ...

Sinks are found by name in the ``notifyd.sinks`` entry point group and
enabled with ``NOTIFYD_SINKS=log,webhook,...``. The entry point names a
factory, ``create(context: SinkContext) -> Sink``, called once at start-up;
it raises :class:`~notifyd.exceptions.ConfigError` for bad options.

A sink may also have these optional methods, looked up by name:

* ``async start()``: once, after the database is reachable and before the
  daemon serves; raising a :class:`~notifyd.exceptions.NotifydError` stops
  the start (a missing table, say);
* ``async run()``: a background task for as long as the daemon runs (the
  webhook sends from the database here); if it raises, it is logged, counted
  and started again after a pause;
* ``async aclose()``: at shutdown.

Each sink has its own bounded queue and task (:mod:`notifyd.sinks.manager`),
so a slow or failing sink never delays the WebSocket push: a full queue
drops the message for that sink and counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..exceptions import ConfigError, describe
from ..protocol import MessageRow, safe_url
from ..stats import SinkStats

if TYPE_CHECKING:
    from ..db import Database
    from ..settings import Settings

__all__ = [
    "ENTRY_POINT_GROUP",
    "Sink",
    "SinkContext",
    "SinkFactory",
    "SinkMessage",
    "available_sinks",
    "load_sink",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "notifyd.sinks"


@dataclass(frozen=True, slots=True)
class SinkMessage:
    """
    One committed row of ``t_message_real_time``, as sinks see it.

    ``to_user`` is ``"*"`` for an announcement to every user.
    """

    id: str
    seq: int
    to_user: str
    title: str | None
    content: str | None
    type: str | None
    send_user: str | None
    send_time: datetime
    skip_url: str | None
    is_read: str

    @classmethod
    def from_row(cls, row: MessageRow) -> SinkMessage:
        """
        From a delivery row (the columns of :mod:`notifyd.db`).
        """
        return cls(
            id=str(row["id"]),
            seq=int(row["seq"]),
            to_user=row["to_user"],
            title=row["title"],
            content=row["content"],
            type=row["type"],
            send_user=row["send_user"],
            send_time=row["send_time"],
            skip_url=row["skip_url"],
            is_read=str(row["is_read"]),
        )

    def to_json(self) -> dict[str, Any]:
        """
        The message with the WebSocket ``message`` frame's field names;
        ``skipUrl`` is null unless it is safe to follow, as on the socket.
        """
        return {
            "id": self.id,
            "seq": self.seq,
            "title": self.title,
            "content": self.content,
            "type": self.type,
            "sendUser": self.send_user,
            "toUser": self.to_user,
            "sendTime": self.send_time.isoformat(timespec="milliseconds"),
            "skipUrl": safe_url(self.skip_url),
            "isRead": self.is_read,
        }


@runtime_checkable
class Sink(Protocol):
    """
    Receives every committed message routed on this instance.

    ``online`` is true when the addressee (for an announcement: anyone) had
    at least one live session on this instance when the message arrived.
    Returning means handled; raising means failed (counted and logged, the
    message is not retried by the manager).
    """

    async def __call__(self, message: SinkMessage, online: bool) -> None: ...


@dataclass
class SinkContext:
    """
    What a sink factory gets: its name, the daemon's settings, its options
    (``NOTIFYD_SINK_OPTIONS`` for this name), its counters, and the
    database once the daemon has connected (before ``start``).
    """

    name: str
    settings: Settings
    options: dict[str, Any]
    stats: SinkStats
    database: Database | None = field(default=None)


SinkFactory = Callable[[SinkContext], Sink]


def available_sinks() -> dict[str, EntryPoint]:
    """
    The installed sinks by name.
    """
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_sink(name: str, context: SinkContext, installed: Mapping[str, EntryPoint]) -> Sink:
    """
    Resolve ``name`` in the entry point group and build the sink.

    Raises :class:`ConfigError` in one line for an unknown name, a factory
    that cannot be imported, or options the factory rejects.
    """
    entry = installed.get(name)
    if entry is None:
        known = ", ".join(sorted(installed)) or "none"
        raise ConfigError(f"unknown sink {name!r} in NOTIFYD_SINKS (installed sinks: {known})")
    try:
        factory: SinkFactory = entry.load()
    except Exception as exc:
        raise ConfigError(
            f"sink {name!r} ({entry.value}) cannot be loaded: {describe(exc)}"
        ) from None
    try:
        sink = factory(context)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"sink {name!r} rejected its configuration: {describe(exc)}") from None
    if not callable(sink):
        raise ConfigError(
            f"sink {name!r}: its factory returned {type(sink).__name__}, not a callable"
        )
    return sink
