"""
Token expiry for every open session, on one timer.

A timer per session (an event-loop timer handle, its callback and its
arguments) costs an idle session about 700 bytes. Here the sessions whose
tokens run out in the same second share one set, and a single timer waits
for the earliest such second.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["ExpiryClock"]

# Token expiry is wall-clock time, but timers run on the loop's monotonic
# clock: the timer never waits longer than this before looking at the wall
# clock again, so a clock step delays an expiry by at most this much.
_LONGEST_WAIT_S = 60.0


class Expiring(Protocol):
    """
    What the clock needs of a session: a place to note its second.
    """

    expiry_second: int | None


S = TypeVar("S", bound=Expiring)


class ExpiryClock(Generic[S]):
    """
    Calls ``on_expire(session)`` once the token of an armed session has
    expired (``expires_at`` plus ``leeway_s``, rounded up to the second).
    """

    def __init__(
        self,
        on_expire: Callable[[S], None],
        *,
        leeway_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._on_expire = on_expire
        self._leeway_s = leeway_s
        self._clock = clock
        self._buckets: dict[int, set[S]] = {}
        # The seconds that have (or had) a bucket, earliest first; entries
        # whose bucket emptied are dropped when they come up.
        self._seconds: list[int] = []
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """
        How many sessions are armed.
        """
        return sum(map(len, self._buckets.values()))

    def arm(self, session: S, expires_at: float) -> None:
        """
        Expire ``session`` at ``expires_at`` (Unix time), replacing what it
        was armed with; an infinite ``expires_at`` (no token) never expires.
        """
        self.disarm(session)
        if not math.isfinite(expires_at):
            return
        second = math.ceil(expires_at + self._leeway_s)
        session.expiry_second = second
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
            if len(self._seconds) > 2 * len(self._buckets) + 64:
                # Seconds whose sessions all closed or refreshed stay in
                # the heap until they come up; with long-lived tokens and
                # reconnecting clients that could be days: drop them now.
                self._seconds = list(self._buckets)
                heapq.heapify(self._seconds)
            else:
                heapq.heappush(self._seconds, second)
            if self._seconds[0] == second:
                self._schedule()
        bucket.add(session)

    def disarm(self, session: S) -> None:
        """
        Forget ``session`` (closed, or about to be armed again).
        """
        second = session.expiry_second
        if second is None:
            return
        session.expiry_second = None
        bucket = self._buckets.get(second)
        if bucket is not None:
            bucket.discard(session)
            if not bucket:
                del self._buckets[second]

    def close(self) -> None:
        """
        Stop the timer and forget every session.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for bucket in self._buckets.values():
            for session in bucket:
                session.expiry_second = None
        self._buckets.clear()
        self._seconds.clear()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        seconds = self._seconds
        while seconds and seconds[0] not in self._buckets:
            heapq.heappop(seconds)
        if seconds:
            delay = min(_LONGEST_WAIT_S, max(0.0, seconds[0] - self._clock()))
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock()
        seconds = self._seconds
        try:
            while seconds and seconds[0] <= now:
                for session in self._buckets.pop(heapq.heappop(seconds), ()):
                    session.expiry_second = None
                    self._on_expire(session)
        finally:
            self._schedule()
