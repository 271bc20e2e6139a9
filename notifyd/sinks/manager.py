"""
Running sinks beside delivery: one bounded queue and one task per sink.

Delivery hands each routed page of rows to :meth:`SinkManager.offer`, which
only converts and enqueues (``put_nowait``): the WebSocket push never waits
for a sink. A sink's worker calls it once per message under
``NOTIFYD_SINK_TIMEOUT_S``; an exception or a timeout is counted and logged
and the worker goes on with the next message. A full queue drops the message
for that sink only, counted in ``dropped``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..backoff import backoff_delay
from ..db import Database, Row
from ..exceptions import describe
from ..settings import Settings
from ..stats import SinkStats, Stats
from . import Sink, SinkContext, SinkMessage, available_sinks, load_sink

__all__ = ["SinkManager"]

logger = logging.getLogger(__name__)

# Between restarts of a sink's run() that raised or returned.
_RESTART_MIN_S = 0.5
_RESTART_MAX_S = 30.0
# At most one log line per sink and kind of trouble in this many seconds.
_LOG_EVERY_S = 10.0


@dataclass(eq=False)
class _Throttled:
    """
    Logs the first occurrence, then at most once per ``_LOG_EVERY_S`` with
    how many were not logged: a sink failing on every message must not
    flood the log.
    """

    last: float = -_LOG_EVERY_S
    suppressed: int = 0

    def warn(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < _LOG_EVERY_S:
            self.suppressed += 1
            return
        if self.suppressed:
            text += " (%d more like this not logged)"
            args = (*args, self.suppressed)
        self.last = now
        self.suppressed = 0
        logger.warning(text, *args)


@dataclass(eq=False)
class _Running:
    name: str
    sink: Sink
    context: SinkContext
    queue: asyncio.Queue[tuple[SinkMessage, bool]]
    stats: SinkStats
    counts_itself: bool
    drops: _Throttled = field(default_factory=_Throttled)
    failures: _Throttled = field(default_factory=_Throttled)


class SinkManager:
    """
    The enabled sinks of one daemon.
    """

    def __init__(self, settings: Settings, stats: Stats) -> None:
        """
        Load every sink named in ``NOTIFYD_SINKS``; raises
        :class:`~notifyd.exceptions.ConfigError` for the first that cannot
        be loaded or configured.
        """
        installed = available_sinks()
        self._timeout = settings.sink_timeout_s
        self._sinks: list[_Running] = []
        for name in dict.fromkeys(settings.sinks):
            sink_stats = stats.sinks.setdefault(name, SinkStats())
            options = settings.sink_options.get(name, {})
            context = SinkContext(name, settings, dict(options), sink_stats)
            sink = load_sink(name, context, installed)
            self._sinks.append(
                _Running(
                    name,
                    sink,
                    context,
                    asyncio.Queue(settings.sink_queue_size),
                    sink_stats,
                    bool(getattr(sink, "counts_itself", False)),
                )
            )

    @property
    def names(self) -> list[str]:
        """
        The enabled sinks, in configuration order.
        """
        return [running.name for running in self._sinks]

    async def start(self, database: Database) -> None:
        """
        Give the sinks the database and run their ``start`` hooks.
        """
        for running in self._sinks:
            running.context.database = database
            start = getattr(running.sink, "start", None)
            if start is not None:
                await start()

    def offer(self, rows: Sequence[Row], online: Sequence[bool]) -> None:
        """
        Enqueue routed rows for every sink. Never blocks, never raises.
        """
        if not rows:
            return
        try:
            messages = [SinkMessage.from_row(row) for row in rows]
        except Exception:
            logger.exception("sinks: a row could not be read; skipped for every sink")
            return
        for running in self._sinks:
            queue = running.queue
            for message, seen in zip(messages, online, strict=True):
                try:
                    queue.put_nowait((message, seen))
                except asyncio.QueueFull:
                    running.stats.dropped += 1
                    running.drops.warn(
                        "sink %s: queue full (%d), message %s dropped for it",
                        running.name,
                        queue.maxsize,
                        message.id,
                    )
            running.stats.queue_depth = queue.qsize()

    async def run(self) -> None:
        """
        Run every sink's worker (and ``run`` hook) until cancelled.
        """
        tasks = []
        for running in self._sinks:
            tasks.append(asyncio.create_task(self._work(running), name=f"sink {running.name}"))
            # An optional hook, so not part of the Sink protocol.
            hook: Callable[[], Awaitable[object]] | None = getattr(running.sink, "run", None)
            if hook is not None:
                tasks.append(
                    asyncio.create_task(
                        self._keep_running(running, hook), name=f"sink {running.name} run"
                    )
                )
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """
        Run the sinks' ``aclose`` hooks; their failures are logged only.
        """
        for running in self._sinks:
            close = getattr(running.sink, "aclose", None)
            if close is None:
                continue
            try:
                await close()
            except Exception as exc:
                logger.warning("sink %s: aclose failed: %s", running.name, describe(exc))

    async def _work(self, running: _Running) -> None:
        queue, stats, sink = running.queue, running.stats, running.sink
        while True:
            message, online = await queue.get()
            stats.queue_depth = queue.qsize()
            try:
                async with asyncio.timeout(self._timeout):
                    await sink(message, online)
            except TimeoutError:
                stats.failed += 1
                running.failures.warn(
                    "sink %s: gave up on message %s after %.1fs (NOTIFYD_SINK_TIMEOUT_S)",
                    running.name,
                    message.id,
                    self._timeout,
                )
            except Exception as exc:
                stats.failed += 1
                running.failures.warn(
                    "sink %s failed on message %s: %s", running.name, message.id, describe(exc)
                )
            else:
                if not running.counts_itself:
                    stats.sent += 1

    async def _keep_running(self, running: _Running, run: Callable[[], Awaitable[object]]) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await run()
                logger.warning("sink %s: run() returned; starting it again", running.name)
            except Exception as exc:
                logger.error("sink %s: run() failed: %s", running.name, describe(exc), exc_info=exc)
            failures = 1 if time.monotonic() - started > 60 else failures + 1
            await asyncio.sleep(
                backoff_delay(failures, initial=_RESTART_MIN_S, maximum=_RESTART_MAX_S, jitter=0)
            )
