"""
The LISTEN connection: one dedicated asyncpg connection, kept alive.

It is never a pooled connection (pools reset connections with ``UNLISTEN *``)
and must reach Postgres directly or through a session-mode pooler:
transaction-mode PgBouncer silently breaks LISTEN.

A dead server or a half-open TCP connection is not noticed until the next
query, so besides asyncpg's termination callback a probe sends a NOTIFY from
the query pool every ``probe_interval`` seconds and waits for it to come back
here: that proves the whole path, not just the socket. A probe that does not
return in time drops the connection, which is then re-opened with jittered,
capped backoff. Every (re)connection and every probe wakes delivery, which
repairs whatever was committed while notifications could not arrive.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from .db import CHANNEL, Database
from .exceptions import ListenPathError
from .stats import Stats

__all__ = ["Listener", "ListenerHealth", "backoff_delay"]

logger = logging.getLogger(__name__)

_PROBE_PREFIX = "probe:"
# Probes in a row that were sent but never came back, before the path was
# ever proven, after which the configuration is declared broken: a working
# path answers the first probe, a transaction-mode pooler never does.
STARTUP_PROBE_ATTEMPTS = 3


def backoff_delay(attempt: int, *, initial: float = 0.1, maximum: float = 10.0) -> float:
    """
    Full-jitter exponential backoff for the ``attempt``-th retry (1-based).
    """
    return random.uniform(0, min(maximum, initial * 2 ** (attempt - 1)))


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
        probe_interval: float,
        probe_timeout: float,
        reconnect_max: float,
        stats: Stats | None = None,
    ) -> None:
        self._dsn = dsn
        self._db = database
        self._on_wake = on_wake
        self._on_state = on_state
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._reconnect_max = reconnect_max
        self._probe_token: str | None = None
        self._probe_returned = asyncio.Event()
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
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                attempt += 1
                delay = backoff_delay(attempt, maximum=self._reconnect_max)
                logger.warning(
                    "LISTEN connection failed (%s); retrying in %.1fs", _describe(exc), delay
                )
                await asyncio.sleep(delay)
                continue
            attempt = 0
            try:
                await self._probe_until_lost()
            finally:
                await self._disconnect()

    async def _connect(self) -> None:
        connection = await asyncpg.connect(self._dsn, timeout=10)
        try:
            if await connection.fetchval("SELECT pg_is_in_recovery()"):
                raise asyncpg.InterfaceError(
                    "the database is a hot standby (in recovery), where LISTEN cannot work"
                )
            self._lost.clear()
            connection.add_termination_listener(self._on_terminated)
            await connection.add_listener(CHANNEL, self._on_notification)
        except BaseException:
            connection.terminate()
            raise
        self._connection = connection
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
            connection.remove_termination_listener(self._on_terminated)
            connection.terminate()

    def _on_terminated(self, connection: asyncpg.Connection) -> None:
        logger.warning("LISTEN connection lost")
        self._lost.set()

    def _on_notification(
        self, connection: asyncpg.Connection, pid: int, channel: str, payload: str
    ) -> None:
        # Called via call_soon for every notification: keep it to a wake-up.
        self.health.notifications += 1
        if payload.startswith(_PROBE_PREFIX):
            if payload[len(_PROBE_PREFIX) :] == self._probe_token:
                self._probe_returned.set()
            return
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
        self._probe_token = secrets.token_hex(8)
        self._probe_returned.clear()
        started = time.monotonic()
        sent = False
        try:
            async with asyncio.timeout(self._probe_timeout):
                usage = await self._db.notify(_PROBE_PREFIX + self._probe_token)
                sent = True
                await self._probe_returned.wait()
        except TimeoutError:
            if sent and not self.proven.is_set():
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
            logger.warning("LISTEN probe failed (%s); reconnecting", _describe(exc))
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


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
