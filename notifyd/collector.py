"""
Keeping CPython's garbage collector off the live sessions.

A full collection (generation 2) walks every tracked object and stops the
event loop while it does. A session is a few hundred tracked objects
(connection, protocol, streams, handler task), so with 10,000 sessions one
full pass takes hundreds of milliseconds, and steady message traffic, whose
short-lived objects are sometimes caught alive by a young collection and
promoted, sets one off every few seconds: every such pass is a latency spike
for every session.

Sessions are long-lived by nature, so after sessions are admitted
everything alive is moved to the permanent generation (``gc.freeze()``),
which collections skip; they then only walk what was allocated since.
Objects frozen that later become garbage are still freed by reference
counting, but reference cycles among them are not. A closed session's own
cycle (websockets' protocol and its parser) is broken when its connection
is lost (:class:`notifyd.handshake.PeerConnection`); what else is left in
cycles (the pool's connections after PostgreSQL restarted, anything a
library keeps) waits for a full collection. So once many sessions have
closed since the last full collection (a quarter of those then open, at
least ``min_closed``), or the number of sessions has doubled, everything is
thawed, collected once and frozen again: the pause comes with session churn
and growth, not with message traffic.

Whether churn leaves cycles depends on the libraries, so it is measured
rather than assumed: a churn collection that frees fewer of Python's memory
blocks than sessions closed since the last one did not pay for its pause,
and the churn that calls the next one doubles (up to ``max_backoff`` times
the base); one that frees more brings it back to the base. Blocks freed,
not the unreachable objects ``gc.collect()`` counts: a cycle through a
suspended generator is broken by finalizing the generator, and what it held
is then freed by reference counting without being counted. A stopping
instance closes every session at once: from :meth:`Collector.stop` on there
are no more collections (each would walk everything again while the process
ends).
"""

from __future__ import annotations

import gc
import sys

__all__ = ["Collector"]


class Collector:
    """
    When to freeze live objects and when to collect everything once.
    """

    def __init__(
        self, *, min_closed: int = 256, closed_fraction: float = 0.25, max_backoff: int = 16
    ) -> None:
        self._min_closed = min_closed
        self._closed_fraction = closed_fraction
        self._max_backoff = max_backoff
        self._sessions_at_collect = 0
        self._closed_at_collect = 0
        self._stopped = False
        self.backoff = 1
        self.full_collections = 0
        self.last_freed_blocks = 0

    def after_round(self, *, admitted: bool, sessions: int, closed_total: int) -> bool:
        """
        Call after each delivery round with whether sessions were admitted,
        how many are open and how many ever closed; returns whether it ran a
        full collection.
        """
        if self._stopped:
            return False
        closed = closed_total - self._closed_at_collect
        base = max(self._min_closed, self._closed_fraction * self._sessions_at_collect)
        churned = closed >= self.backoff * base
        grown = False
        if not churned and admitted:
            # Growth counts in sessions: gc.get_freeze_count() walks the
            # whole frozen set.
            grown = sessions >= 2 * max(self._sessions_at_collect, self._min_closed)
            if not grown:
                gc.freeze()
        if not (churned or grown):
            return False
        gc.unfreeze()
        blocks = sys.getallocatedblocks()
        gc.collect()
        self.last_freed_blocks = blocks - sys.getallocatedblocks()
        gc.freeze()
        self.full_collections += 1
        self._sessions_at_collect = sessions
        self._closed_at_collect = closed_total
        if churned:
            paid = self.last_freed_blocks >= closed
            self.backoff = 1 if paid else min(2 * self.backoff, self._max_backoff)
        return True

    def stop(self) -> None:
        """
        No more freezing or collecting: the instance is stopping.
        """
        self._stopped = True

    @staticmethod
    def release() -> None:
        """
        Hand everything back to the collector (when the daemon stops).
        """
        gc.unfreeze()
