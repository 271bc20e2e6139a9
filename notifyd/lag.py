"""
How late the event loop runs what is due: a timer asks to wake every
``interval`` and notes by how much it overslept.

A loop that falls behind (a long synchronous step, a collector pause, too
many ready callbacks) delays every frame and every ping at once; the lag is
the one figure that shows it from outside, and its growth over days is what
a soak test looks for.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

__all__ = ["LoopLag"]


class LoopLag:
    """
    The worst oversleep of the last ``window_s`` seconds, sampled every
    ``interval_s`` (a stall that starts mid-interval shows as its length
    less what was left of the interval).
    """

    def __init__(self, interval_s: float = 0.1, window_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._samples: deque[tuple[float, float]] = deque()
        self._window_s = window_s

    def record(self, at: float, lag_s: float) -> None:
        self._samples.append((at, lag_s))
        while self._samples and self._samples[0][0] < at - self._window_s:
            self._samples.popleft()

    def worst(self) -> float:
        """
        Seconds: the largest lag seen in the window (0 before the first sample).
        """
        return max((lag for _, lag in self._samples), default=0.0)

    async def run(self) -> None:
        # perf_counter, not loop.time(): uvloop's clock counts whole milliseconds.
        while True:
            due = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = time.perf_counter()
            self.record(time.monotonic(), max(0.0, now - due))
