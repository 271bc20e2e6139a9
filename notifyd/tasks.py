"""
The background tasks of an instance (delivery, the listener, the sinks),
watched: a task that ends by itself is a failure that stops the instance,
never a silent loss.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any

from .exceptions import DatabaseError, NotifydError

__all__ = ["Supervisor"]

logger = logging.getLogger(__name__)


class Supervisor:
    """
    Background tasks that must run for as long as their instance: the
    first one to end, other than by cancellation, is the instance's failure.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.failed = asyncio.Event()
        # Why a task stopped when the cause is the setup, not a bug.
        self.failure: NotifydError | None = None

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
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
        self.failed.set()

    async def until(self, ready: Awaitable[Any]) -> None:
        """
        Wait for ``ready``; raise the failure if a task dies first.
        """
        waiter = asyncio.ensure_future(ready)
        failed = asyncio.ensure_future(self.failed.wait())
        await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        if not waiter.done():
            waiter.cancel()
            raise self.failure or DatabaseError("delivery could not start")

    async def shutdown(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
