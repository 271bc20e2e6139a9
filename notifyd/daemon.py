"""
Wiring and lifecycle: startup → serve → bounded graceful shutdown → force.

:class:`Daemon` owns every task it starts. A background task that dies
unexpectedly stops the daemon (the CLI then exits non-zero and systemd
restarts it); it is never silently gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg

from .auth import TokenVerifier
from .backoff import backoff_delay
from .collector import Collector
from .db import Database
from .delivery import Delivery
from .exceptions import ConfigError, DatabaseError, NotifydError, ReplicaError, SchemaError
from .hub import Hub
from .listener import Listener
from .metrics import registry_for
from .protocol import CloseCode
from .server import PushServer
from .settings import Settings
from .sinks.manager import SinkManager
from .stats import Stats

__all__ = ["Daemon", "connect_database"]

logger = logging.getLogger(__name__)


async def connect_database(settings: Settings, *, wait: bool) -> Database:
    """
    Open the query pool; with ``wait``, retry until Postgres is reachable.

    A hot standby is refused at once (:class:`ReplicaError`): retrying cannot
    help there.
    """
    if not settings.dsn:
        raise ConfigError("NOTIFYD_DSN is not set: give the PostgreSQL connection string")
    attempt = 0
    while True:
        try:
            return await Database.connect(settings.dsn, size=settings.pool_size)
        except ReplicaError:
            raise
        except DatabaseError as exc:
            if not wait:
                raise
            attempt += 1
            delay = backoff_delay(attempt, initial=0.5, maximum=settings.reconnect_max_s)
            logger.warning("%s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)


async def _refuse_standby(dsn: str) -> None:
    """
    Raise :class:`ReplicaError` when ``dsn`` (the LISTEN DSN) is a hot
    standby; connection trouble is left to the listener's retries.
    """
    try:
        connection = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return
    try:
        if await connection.fetchval("SELECT pg_is_in_recovery()"):
            raise ReplicaError(
                "NOTIFYD_LISTEN_DSN is a hot standby (in recovery), where LISTEN cannot "
                "work; point it at the primary"
            )
    finally:
        await connection.close()


class Daemon:
    """
    One notifyd instance: query pool, LISTEN connection, delivery, server.
    """

    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier | None,
        *,
        demo_users: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.demo_users = demo_users  # notifyd demo only; see PushServer
        self.verifier = verifier
        self.hub = Hub(settings.max_sessions_per_user)
        self.stats = Stats()
        self.collector = Collector()
        self.db: Database | None = None
        self.delivery: Delivery | None = None
        self.listener: Listener | None = None
        self.server: PushServer | None = None
        self.sinks: SinkManager | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._failed = asyncio.Event()
        # Why a background task stopped when the cause is the setup, not a bug.
        self.failure: NotifydError | None = None
        self.started_at = time.monotonic()

    @property
    def port(self) -> int:
        """
        The bound WebSocket port.
        """
        assert self.server is not None
        return self.server.port

    async def start(self, *, wait_for_database: bool = True) -> None:
        """
        Connect, check the schema, start delivery and the listener, then bind.

        Returns once the port accepts sessions and delivery has its starting
        snapshot. Raises :class:`DatabaseError` (or a subclass) when the
        database cannot be used.
        """
        settings = self.settings
        # Sink settings are checked before waiting for the database.
        sinks = self.sinks = SinkManager(settings, self.stats) if settings.sinks else None
        try:
            self.db = db = await connect_database(settings, wait=wait_for_database)
        except BaseException:
            if sinks is not None:
                await sinks.aclose()
            raise
        try:
            problems = await db.schema_problems()
            if problems:
                raise SchemaError(problems[0])
            if sinks is not None:
                await sinks.start(db)
            if settings.listen_dsn:
                await _refuse_standby(settings.listen_dsn)
            self.delivery = delivery = Delivery(
                db,
                self.hub,
                fetch_batch=settings.fetch_batch,
                replay_limit=settings.replay_limit,
                poll_interval=settings.poll_interval_s,
                event_retention=settings.event_retention_s,
                min_interval=settings.batch_interval_ms / 1000,
                stats=self.stats,
                on_routed=sinks.offer if sinks is not None else None,
                collector=self.collector,
            )
            self.listener = listener = Listener(
                settings.listen_dsn or settings.dsn or "",
                db,
                on_wake=delivery.wake,
                on_state=delivery.set_listening,
                probe_interval=settings.probe_interval_s,
                probe_timeout=settings.probe_timeout_s,
                reconnect_max=settings.reconnect_max_s,
                stats=self.stats,
            )
            self._spawn(delivery.run(), "delivery")
            self._spawn(listener.run(), "listener")
            if sinks is not None:
                self._spawn(sinks.run(), "sinks")
            await self._until_ready(delivery.ready.wait())
            self.server = PushServer(
                settings,
                self.verifier,
                self.hub,
                delivery,
                db,
                self.health,
                registry_for(self) if settings.metrics else None,
                self.stats,
                demo_users=self.demo_users,
            )
            await self.server.start()
        except BaseException:
            await self._shutdown_tasks()
            if sinks is not None:
                await sinks.aclose()
            await db.close()
            raise

    def set_verifier(self, verifier: TokenVerifier | None) -> None:
        """
        Use new JWT keys for sessions opened from now on (key rotation).
        """
        self.verifier = verifier
        if self.server is not None:
            self.server.verifier = verifier

    async def _until_ready(self, ready: Any) -> None:
        waiter = asyncio.ensure_future(ready)
        failed = asyncio.ensure_future(self._failed.wait())
        await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        if not waiter.done():
            waiter.cancel()
            raise self.failure or DatabaseError("delivery could not start")

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, NotifydError):
            # A configuration problem found at run time: one line, no traceback.
            self.failure = exc
            logger.error("%s stopped: %s", task.get_name(), exc)
        else:
            logger.error("background task %s stopped: %r", task.get_name(), exc, exc_info=exc)
        self._failed.set()

    async def wait_failed(self) -> None:
        """
        Return when a background task died.
        """
        await self._failed.wait()

    @property
    def failed(self) -> bool:
        """
        Whether a background task died.
        """
        return self._failed.is_set()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """
        Whether this instance can deliver, and the figures that say so.
        """
        listener = self.listener
        assert listener is not None
        state = listener.health
        age = state.probe_age()
        # Ready: listening, and the last round trip younger than two probe
        # intervals (plus the time one probe may take).
        healthy = (
            not self.failed
            and state.connected
            and age is not None
            and age < 2 * self.settings.probe_interval_s + self.settings.probe_timeout_s
        )
        return healthy, {
            "status": "ok" if healthy else "unavailable",
            "alive": not self.failed,
            "listener": {
                "connected": state.connected,
                "probe_age_s": None if age is None else round(age, 3),
                "probe_rtt_ms": None
                if state.last_probe_rtt is None
                else round(state.last_probe_rtt * 1000, 3),
                "reconnects": state.reconnects,
            },
            "sessions": self.hub.session_count,
            "users": self.hub.user_count,
            "delivered": self.stats.delivered,
        }

    async def stop(self, code: CloseCode = CloseCode.SERVICE_RESTART) -> None:
        """
        Stop accepting, close sessions with ``code``, stop tasks, close the
        pool. Bounded by ``shutdown_timeout_s``; idempotent.
        """
        if self.server is not None:
            self.server.stop_accepting()
            await self.server.close_sessions(code, self.settings.shutdown_timeout_s)
        await self._shutdown_tasks()
        if self.sinks is not None:
            sinks, self.sinks = self.sinks, None
            await sinks.aclose()
        self.collector.release()
        if self.db is not None:
            db, self.db = self.db, None
            await db.close()

    async def _shutdown_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
