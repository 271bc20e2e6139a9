"""
Wiring and lifecycle: startup → serve → bounded graceful shutdown → force.

``async with Daemon(settings, verifier) as instance:`` connects, checks the
schema, starts delivery, the listener and the sinks, then binds the port;
leaving the block stops everything in reverse order, bounded by
``shutdown_timeout_s``. :meth:`Daemon.run` is the service's whole life: it
also handles SIGTERM/SIGINT (stop, even while still waiting for the
database), SIGHUP (new JWT keys) and systemd's notifications.

The :class:`Instance` owns every task it starts. A background task that dies
unexpectedly stops the instance (the CLI then exits non-zero and systemd
restarts it); it is never silently gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from .access import Access
from .actions import Actions
from .auth import Keys, TokenVerifier
from .collector import Collector
from .db import Database, connect_database, refuse_standby_at
from .delivery import Delivery
from .exceptions import NotifydError, SchemaError
from .fleet import WorkerLink
from .handshake import Admission
from .hub import Hub
from .incidents import Incidents
from .lag import LoopLag
from .listener import Listener
from .metrics import registry_for, render_metrics
from .protocol import CloseCode
from .routes import Routes
from .server import PushServer
from .session import Session
from .settings import Settings
from .sinks.manager import SinkManager
from .stats import Stats
from .systemd import SystemdNotifier, supervise
from .tasks import Supervisor
from .vitals import ListenerVitals, Vitals, WakeVitals

__all__ = ["Daemon", "Instance", "Stopped"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stopped:
    """
    How :meth:`Daemon.run` ended: ``failed`` when a background task died,
    with ``failure`` when the cause is the setup (one line for the user).
    """

    failed: bool
    failure: NotifydError | None = None


class Instance:
    """
    A started notifyd: every part exists and runs until :meth:`stop`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        keys: Keys,
        stats: Stats,
        hub: Hub[Session],
        db: Database,
        delivery: Delivery,
        listener: Listener,
        sinks: SinkManager | None,
        tasks: Supervisor,
        lag: LoopLag,
        collector: Collector,
        cleanup: contextlib.AsyncExitStack,
        demo_users: dict[str, str] | None,
        fleet: WorkerLink | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.stats = stats
        self.hub = hub
        self.db = db
        self.delivery = delivery
        self.listener = listener
        self.sinks = sinks
        self._tasks = tasks
        self._lag = lag
        self._collector = collector
        self._cleanup = cleanup
        self._stopped = False
        incidents = Incidents(stats)
        access = Access(
            keys,
            db,
            revocation_sql=settings.revocation_sql or "",
            incidents=incidents,
            stats=stats,
        )
        registry = registry_for(self.vitals, stats) if settings.metrics else None
        vitals: Callable[[], Vitals] = self.vitals
        metrics = None if registry is None else lambda: render_metrics(registry)
        if fleet is not None:
            # One of several workers: its HTTP paths answer for all of them.
            vitals, metrics = fleet.views(vitals, metrics)
        self.server = PushServer(
            settings,
            routes=Routes(settings, vitals, metrics, demo_users=demo_users),
            admission=Admission(settings, access, incidents),
            access=access,
            actions=Actions(
                db,
                access,
                incidents,
                max_read_ids=settings.max_read_ids,
                max_concurrent_history=settings.max_concurrent_history,
                demo_users=demo_users,
            ),
            incidents=incidents,
            delivery=delivery,
            stats=stats,
        )

    @property
    def port(self) -> int:
        """
        The bound WebSocket port.
        """
        return self.server.port

    @property
    def failed(self) -> bool:
        """
        Whether a background task died.
        """
        return self._tasks.failed.is_set()

    @property
    def failure(self) -> NotifydError | None:
        """
        The setup problem that stopped a background task, if that is why.
        """
        return self._tasks.failure

    async def wait_failed(self) -> None:
        """
        Return when a background task died.
        """
        await self._tasks.failed.wait()

    def vitals(self) -> Vitals:
        """
        How this instance is doing, now.
        """
        settings = self.settings
        health = self.listener.health
        age = health.probe_age()
        alive = not self.failed
        # Ready: listening, and the last round trip younger than two probe
        # intervals (plus the time one probe may take).
        ready = (
            alive
            and health.connected
            and age is not None
            and age < 2 * settings.probe_interval_s + settings.probe_timeout_s
        )
        return Vitals(
            alive=alive,
            ready=ready,
            listener=ListenerVitals(
                connected=health.connected,
                probe_age_s=age,
                probe_rtt_s=health.last_probe_rtt,
                reconnects=health.reconnects,
            ),
            sessions=self.hub.session_count,
            users=self.hub.user_count,
            delivered=self.stats.delivered,
            tasks=len(asyncio.all_tasks()),
            loop_lag_s=self._lag.worst(),
            wake=WakeVitals(setting=settings.wake, mode=str(self.delivery.pacer.mode)),
            full_collections=self._collector.full_collections,
        )

    async def stop(self, code: CloseCode = CloseCode.SERVICE_RESTART) -> None:
        """
        Stop accepting, close sessions with ``code``, stop tasks, close the
        pool. Bounded by ``shutdown_timeout_s``; idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        self._collector.stop()
        self.server.stop_accepting()
        await self.server.close_sessions(code, self.settings.shutdown_timeout_s)
        await self._cleanup.aclose()


class Daemon:
    """
    One notifyd instance to be started: ``async with Daemon(...) as instance``.
    """

    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier | None,
        *,
        demo_users: dict[str, str] | None = None,
        wait_for_database: bool = True,
        fleet: WorkerLink | None = None,
    ) -> None:
        """
        ``demo_users`` (``notifyd demo`` only: user -> token) turns on the
        message center at ``/`` and the ``demo_send`` action; ``fleet``: this
        process is one of ``NOTIFYD_WORKERS`` (:mod:`notifyd.fleet`).
        """
        self.settings = settings
        self.keys = Keys(verifier)
        self._demo_users = demo_users
        self._wait_for_database = wait_for_database
        self._fleet = fleet
        self._instance: Instance | None = None

    async def __aenter__(self) -> Instance:
        """
        Connect, check the schema, start delivery and the listener, then bind.

        Returns once the port accepts sessions and delivery has its starting
        snapshot. Raises :class:`DatabaseError` (or a subclass) when the
        database cannot be used; what was started is stopped again.
        """
        settings = self.settings
        stats = Stats()
        hub: Hub[Session] = Hub(settings.max_sessions_per_user)
        collector = Collector()
        tasks = Supervisor()
        lag = LoopLag()
        async with contextlib.AsyncExitStack() as cleanup:
            # Sink settings are checked before waiting for the database.
            sinks = SinkManager(settings, stats) if settings.sinks else None
            if sinks is not None:
                cleanup.push_async_callback(sinks.aclose)
            db = await connect_database(settings, wait=self._wait_for_database)
            cleanup.push_async_callback(db.close)
            stats.read_replica = db.read_replica
            cleanup.callback(collector.release)
            problems = await db.schema_problems()
            if problems:
                raise SchemaError(problems[0])
            if sinks is not None:
                await sinks.start(db)
            if settings.listen_dsn:
                await refuse_standby_at(settings.listen_dsn, "NOTIFYD_LISTEN_DSN")
            delivery = Delivery(
                db,
                hub,
                fetch_batch=settings.fetch_batch,
                replay_limit=settings.replay_limit,
                poll_interval=settings.poll_interval_s,
                event_retention=settings.event_retention_s,
                min_interval=settings.batch_interval_ms / 1000,
                poll_above=settings.poll_above if settings.wake == "auto" else None,
                contention=settings.wake == "auto",
                stats=stats,
                on_routed=sinks.offer if sinks is not None else None,
                collector=collector,
                push_ahead=settings.push_ahead,
            )
            listener = Listener(
                settings.listen_dsn or settings.dsn or "",
                db,
                on_wake=delivery.wake,
                on_state=delivery.set_listening,
                on_notification=delivery.notified,
                probe_interval=settings.probe_interval_s,
                probe_timeout=settings.probe_timeout_s,
                reconnect_max=settings.reconnect_max_s,
                stats=stats,
            )
            cleanup.push_async_callback(tasks.shutdown)
            tasks.spawn(delivery.run(), "delivery")
            tasks.spawn(listener.run(), "listener")
            tasks.spawn(lag.run(), "loop-lag")
            if sinks is not None:
                tasks.spawn(sinks.run(), "sinks")
            await tasks.until(delivery.ready.wait())
            instance = Instance(
                settings,
                keys=self.keys,
                stats=stats,
                hub=hub,
                db=db,
                delivery=delivery,
                listener=listener,
                sinks=sinks,
                tasks=tasks,
                lag=lag,
                collector=collector,
                cleanup=cleanup.pop_all(),
                demo_users=self._demo_users,
                fleet=self._fleet,
            )
        try:
            await instance.server.start()
        except BaseException:
            await instance.stop()
            raise
        self._instance = instance
        return instance

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        instance, self._instance = self._instance, None
        if instance is not None:
            await instance.stop()

    def reload(self, verifier: TokenVerifier | None) -> None:
        """
        Use new JWT keys for sessions opened or refreshed from now on.
        """
        self.keys.verifier = verifier

    async def run(
        self,
        *,
        on_ready: Callable[[Instance], None] | None = None,
        reload: Callable[[], TokenVerifier | None] | None = None,
    ) -> Stopped:
        """
        Start, serve until SIGTERM/SIGINT or a fatal task error, then stop.

        A stop signal while still waiting for the database ends the wait.
        SIGHUP calls ``reload`` for a new token verifier (key rotation) and
        swaps it in; sessions stay open. systemd is told READY, WATCHDOG,
        STATUS, RELOADING and STOPPING when it started us with NOTIFY_SOCKET.
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        notifier = SystemdNotifier.from_environment()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self._reload, reload, notifier)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            starting = asyncio.ensure_future(self.__aenter__())
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                return Stopped(failed=False)
            instance = starting.result()
            try:
                supervisor = asyncio.create_task(
                    supervise(instance.vitals, notifier, instance.listener.proven),
                    name="systemd",
                )
                if on_ready is not None:
                    on_ready(instance)
                failed = asyncio.ensure_future(instance.wait_failed())
                await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
                failed.cancel()
                logger.info("shutting down")
                notifier.notify("STOPPING=1")
                supervisor.cancel()
            finally:
                await self.__aexit__(None, None, None)
            return Stopped(failed=instance.failed, failure=instance.failure)
        finally:
            stopped.cancel()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            notifier.close()

    def _reload(
        self, reload: Callable[[], TokenVerifier | None], notifier: SystemdNotifier
    ) -> None:
        """
        SIGHUP: re-read the JWT keys. A bad new configuration keeps the old keys.
        """
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
        try:
            self.reload(reload())
            logger.info("reloaded the JWT keys")
        except NotifydError as exc:
            logger.error("reload failed, keeping the current keys: %s", exc)
        notifier.notify("READY=1")
