"""
The LISTEN connection: one dedicated asyncpg connection, kept alive.

It is never a pooled connection (pools reset connections with ``UNLISTEN *``)
and must reach Postgres directly or through a session-mode pooler:
transaction-mode PgBouncer silently breaks LISTEN.

A dead server or a half-open TCP connection is not noticed until the next
query, so besides asyncpg's termination callback a probe (:class:`Probe`)
sends a NOTIFY from the query pool every ``probe_interval`` seconds and waits
for it to come back here: that proves the whole path, not just the socket. A
probe that does not return in time drops the connection, which is then
re-opened with jittered, capped backoff. Every (re)connection and every probe
wakes delivery, which repairs whatever was committed while notifications
could not arrive.

``notifyd check`` makes the same round trip once, with
:func:`open_listen_connection` and a :class:`Probe`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from .backoff import backoff_delay
from .db import CHANNEL, Database, as_database_error, named, refuse_standby
from .exceptions import DatabaseError, ListenPathError, describe
from .stats import Stats

__all__ = ["Listener", "ListenerHealth", "Probe", "open_listen_connection"]

logger = logging.getLogger(__name__)

_PROBE_PREFIX = "probe:"
# Probes in a row that were sent but never came back, before the path was
# ever proven, after which the configuration is declared broken: a working
# path answers the first probe, a transaction-mode pooler never does.
STARTUP_PROBE_ATTEMPTS = 3
# Where the LISTEN connection's DSN comes from, for messages.
_LISTEN_DSN_SETTING = "NOTIFYD_LISTEN_DSN (or NOTIFYD_DSN)"


async def open_listen_connection(
    dsn: str,
    on_payload: Callable[[str], object],
    *,
    on_lost: Callable[[object], object] | None = None,
    where: str = _LISTEN_DSN_SETTING,
) -> asyncpg.Connection:
    """
    A new connection to ``dsn`` that LISTENs on notifyd's channel and hands
    each notification's payload to ``on_payload``; ``on_lost`` is called
    with the connection when it is closed or lost.

    Raises :class:`~notifyd.exceptions.ReplicaError` naming ``where`` (the
    setting that holds the DSN) when it reaches a hot standby, and
    :class:`~notifyd.exceptions.DatabaseError` when it cannot connect or
    LISTEN.
    """

    def notified(connection: object, pid: int, channel: str, payload: object) -> None:
        on_payload(str(payload))

    def terminated(connection: object) -> None:
        if on_lost is not None:
            on_lost(connection)

    with as_database_error(f"cannot open the LISTEN connection ({where})"):
        connection = await asyncpg.connect(dsn, timeout=10, server_settings=named(dsn, "listen"))
    try:
        await refuse_standby(connection, where)
        connection.add_termination_listener(terminated)
        with as_database_error(f"LISTEN failed ({where})"):
            await connection.add_listener(CHANNEL, notified)
    except BaseException:
        connection.terminate()
        raise
    return connection


class Probe:
    """
    Self-NOTIFY round trips: a fresh token sent through the query pool must
    come back on a LISTEN connection, which proves the whole path (a pooler
    in transaction mode, or a LISTEN on another database, never returns it).

    Give every payload the LISTEN connection receives to :meth:`answer`.
    """

    def __init__(self, database: Database) -> None:
        self._db = database
        self._token: str | None = None
        self._returned = asyncio.Event()
        # Whether the current round trip's NOTIFY went out (a timeout after
        # that means the path is broken, before it the pool is slow).
        self.sent = False

    def answer(self, payload: str) -> bool:
        """
        Whether ``payload`` is a probe (this one's or another instance's);
        notes the return of the token in flight.
        """
        if not payload.startswith(_PROBE_PREFIX):
            return False
        if payload[len(_PROBE_PREFIX) :] == self._token:
            self._returned.set()
        return True

    async def round_trip(self) -> float:
        """
        Send a new token and wait until it comes back; bound it with a
        timeout. Returns ``pg_notification_queue_usage()`` as the NOTIFY saw
        it; raises :class:`~notifyd.exceptions.DatabaseError` when the
        NOTIFY cannot be sent.
        """
        self._token = secrets.token_hex(8)
        self._returned.clear()
        self.sent = False
        usage = await self._db.notify(_PROBE_PREFIX + self._token)
        self.sent = True
        await self._returned.wait()
        return usage


@dataclass
class ListenerHealth:
    """
    What the listener knows about its own liveness (for health and metrics).
    """

    connected: bool = False
    last_probe_ok: float | None = None  # time.monotonic() of the last success
    last_probe_rtt: float | None = None  # seconds
    reconnects: int = 0
    notifications: int = 0

    def probe_age(self) -> float | None:
        """
        Seconds since the LISTEN path was last proven to work.
        """
        if self.last_probe_ok is None:
            return None
        return time.monotonic() - self.last_probe_ok


class Listener:
    """
    Keeps a LISTEN on notifyd's channel and turns notifications into
    delivery wake-ups.
    """

    def __init__(
        self,
        dsn: str,
        database: Database,
        *,
        on_wake: Callable[[], None],
        on_state: Callable[[bool], None],
        on_notification: Callable[[str], None] | None = None,
        probe_interval: float,
        probe_timeout: float,
        reconnect_max: float,
        stats: Stats | None = None,
    ) -> None:
        self._dsn = dsn
        self._on_wake = on_wake
        # Every notification but probes (on_wake when not given).
        self._on_notification = on_notification
        self._on_state = on_state
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._reconnect_max = reconnect_max
        self._probes = Probe(database)
        self._lost = asyncio.Event()
        self._connection: asyncpg.Connection | None = None
        self.health = ListenerHealth()
        self._stats = stats
        self.proven = asyncio.Event()
        self._unanswered_before_proven = 0

    async def run(self) -> None:
        """
        Listen until cancelled, reconnecting after any failure.

        Raises :class:`ListenPathError` when, from start-up on, every one of
        :data:`STARTUP_PROBE_ATTEMPTS` probes was sent but none came back:
        retrying cannot fix a pooler in the way.
        """
        attempt = 0
        while True:
            try:
                await self._connect()
            except DatabaseError as exc:
                attempt += 1
                delay = backoff_delay(attempt, initial=0.1, maximum=self._reconnect_max)
                logger.warning(
                    "LISTEN connection failed (%s); retrying in %.1fs", describe(exc), delay
                )
                await asyncio.sleep(delay)
                continue
            attempt = 0
            try:
                await self._probe_until_lost()
            finally:
                await self._disconnect()

    async def _connect(self) -> None:
        self._lost.clear()
        self._connection = await open_listen_connection(
            self._dsn, self._on_payload, on_lost=self._on_terminated
        )
        if self.health.reconnects or self.health.connected:
            logger.info("LISTEN connection re-established")
        else:
            logger.info("LISTEN connection established")
        self.health.connected = True
        # Wake delivery after LISTEN is in place: its read then covers
        # everything committed while no notification could arrive.
        self._on_state(True)

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        was_connected = self.health.connected
        self.health.connected = False
        if was_connected:
            self.health.reconnects += 1
            self._on_state(False)
        if connection is not None:
            connection.terminate()

    def _on_terminated(self, connection: object) -> None:
        # Only the current connection's loss counts: a closed one was
        # closed on purpose.
        if connection is self._connection:
            logger.warning("LISTEN connection lost")
            self._lost.set()

    def _on_payload(self, payload: str) -> None:
        # Called via call_soon for every notification: nothing here awaits.
        self.health.notifications += 1
        if not self._probes.answer(payload):
            if self._on_notification is not None:
                self._on_notification(payload)
            else:
                self._on_wake()

    async def _probe_until_lost(self) -> None:
        while not self._lost.is_set():
            if not await self._probe():
                return
            try:
                async with asyncio.timeout(self._probe_interval):
                    await self._lost.wait()
            except TimeoutError:
                pass

    async def _probe(self) -> bool:
        """
        One self-NOTIFY round trip; False when the path is broken.
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._probe_timeout):
                usage = await self._probes.round_trip()
        except TimeoutError:
            if self._probes.sent and not self.proven.is_set():
                self._unanswered_before_proven += 1
                if self._unanswered_before_proven >= STARTUP_PROBE_ATTEMPTS:
                    raise ListenPathError(
                        f"{STARTUP_PROBE_ATTEMPTS} NOTIFYs sent through NOTIFYD_DSN never reached "
                        "the LISTEN connection: NOTIFYD_LISTEN_DSN (or NOTIFYD_DSN) goes through "
                        "a transaction-mode pooler or another database; point "
                        "NOTIFYD_LISTEN_DSN at PostgreSQL directly (or a session-mode pooler)"
                    ) from None
            logger.warning(
                "LISTEN probe did not return within %.1fs; reconnecting (if this repeats, "
                "the LISTEN connection may go through a transaction-mode pooler, which breaks "
                "LISTEN: point NOTIFYD_LISTEN_DSN at PostgreSQL directly)",
                self._probe_timeout,
            )
            return False
        except Exception as exc:
            logger.warning("LISTEN probe failed (%s); reconnecting", describe(exc))
            return False
        now = time.monotonic()
        self.health.last_probe_ok = now
        self.health.last_probe_rtt = now - started
        if self._stats is not None:
            self._stats.notification_queue_usage = usage
        self.proven.set()
        # The probe also serves as a periodic safety-net read.
        self._on_wake()
        return True
