"""
What delivery routed in the last minutes, by transaction: the memory that
lets an instance repair a failover which lost the old primary's last
transactions.

A promoted standby starts handing out transaction ids after the last one it
received. When the old primary died with commits the standby never got (a
"lost tail", possible with asynchronous replication), their ids are handed
out again, and a row committed under such an id looks, to every snapshot
taken before the switch (the watermark, clients' cursors), like one routed
long ago: nobody would ever be sent it. The server cannot say which ids were
reused (the switch point lives in the timeline history file, which an
ordinary role may not read), but this instance knows which rows it routed
under each id. A transaction id that the old snapshots call finished but
whose rows on the new primary are not the ones routed under it belongs to a
reused id; :mod:`notifyd.failover` gives those rows a fresh transaction id
so that they are new to every old snapshot.

Everything here is pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import collections
from array import array
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from .cursor import Snapshot

__all__ = ["MAX_ROWS", "SPAN_S", "Plan", "Recall", "event_fingerprint", "fingerprint"]

# How far back the memory reaches: longer than any replication lag a
# failover should lose (a standby minutes behind loses more than ids).
SPAN_S = 120.0
# Rows are kept in chunks of about this long, each starting at a window's
# base, so that forgetting is per chunk and costs nothing per row.
_CHUNK_S = 1.0
# At most this many rows and events are remembered (16 bytes each): under a
# sustained flood the memory reaches back less than its span.
MAX_ROWS = 1_000_000


def fingerprint(*parts: Hashable) -> int:
    """
    What tells one routed row (its id and seq) from another under the same
    transaction id; only ever compared within one process.
    """
    return hash(parts)


def event_fingerprint(user: str, kind: str, ids: list[str] | None, type_: str | None) -> int:
    """
    An event's fingerprint, the same whether taken from a routed window or
    read back from the event table.
    """
    return fingerprint("event", user, kind, None if ids is None else tuple(ids), type_)


@dataclass(slots=True)
class _Chunk:
    # Every transaction visible in a later window's end but not in ``base``
    # has its rows in this chunk or a later one.
    started: float
    base: Snapshot
    xacts: array[int] = field(default_factory=lambda: array("q"))
    prints: array[int] = field(default_factory=lambda: array("q"))


@dataclass(frozen=True, slots=True)
class Plan:
    """
    The verdict on the rows found under transaction ids the old snapshots
    call finished: ``reused``, the ids whose rows are not the ones routed
    under them (to be given a fresh id); ``recognised``, the ids whose rows
    are; ``past_memory``, whether the lost tail may reach back further than
    the memory does (none of the oldest remembered transactions survived).
    """

    reused: frozenset[int]
    recognised: int
    past_memory: bool


class Recall:
    """
    The fingerprints of the rows and events routed since the horizon, by
    transaction id, and the highest snapshot end delivery has read.
    """

    def __init__(self, span_s: float = SPAN_S, max_rows: int = MAX_ROWS) -> None:
        self._span_s = span_s
        self._max_rows = max_rows
        self._rows = 0
        self._chunks: collections.deque[_Chunk] = collections.deque()
        self._last_base: Snapshot | None = None
        self._highest_xmax = 0

    @property
    def span_s(self) -> float:
        """
        How far back the memory reaches, in seconds.
        """
        return self._span_s

    @property
    def horizon(self) -> Snapshot | None:
        """
        The snapshot the memory starts from: every transaction visible in
        the last noted end and not in this one has its rows remembered.
        None until a window was noted.
        """
        return self._chunks[0].base if self._chunks else None

    @property
    def highest_xmax(self) -> int:
        """
        The highest ``xmax`` of any window end noted: no transaction id at
        or above it was ever taken for finished (0 before any).
        """
        return self._highest_xmax

    @property
    def span_xids(self) -> int:
        """
        How many transaction ids the memory spans.
        """
        horizon = self.horizon
        return 0 if horizon is None else max(0, self._highest_xmax - horizon.xmax)

    def note(
        self, now: float, base: Snapshot, end: Snapshot, prints: Iterable[tuple[int, int]]
    ) -> None:
        """
        A page of the window from ``base`` to ``end`` was routed:
        ``prints`` are its rows' and events' ``(xact_id, fingerprint)``.
        """
        chunks = self._chunks
        if not chunks or (base != self._last_base and now - chunks[-1].started >= _CHUNK_S):
            # Only at a window's start: a chunk's base then bounds all of its rows.
            chunks.append(_Chunk(now, base))
            while len(chunks) > 1 and (
                chunks[1].started <= now - self._span_s or self._rows > self._max_rows
            ):
                self._rows -= len(chunks.popleft().xacts)
        self._last_base = base
        self._highest_xmax = max(self._highest_xmax, end.xmax)
        chunk = chunks[-1]
        before = len(chunk.xacts)
        for xact_id, print_ in prints:
            chunk.xacts.append(xact_id)
            chunk.prints.append(print_)
        self._rows += len(chunk.xacts) - before

    def note_ahead(
        self, now: float, base: Snapshot, xact_id: int, prints: Iterable[tuple[int, int]]
    ) -> None:
        """
        Rows of transaction ``xact_id`` were pushed ahead of their window
        (``base`` the watermark then): cursors claim it from now on, as if
        a window had read it.
        """
        self.note(now, base, base, prints)
        self._highest_xmax = max(self._highest_xmax, xact_id + 1)

    def still_open(self, now: Snapshot, watermark: Snapshot) -> frozenset[int]:
        """
        Transactions in progress in ``now`` whose ids ``watermark`` calls
        finished (and the horizon does not): they took a reused id and have
        not committed yet.
        """
        horizon = self.horizon
        if horizon is None:
            return frozenset()
        return frozenset(
            xid for xid in now.xip if watermark.visible(xid) and not horizon.visible(xid)
        )

    def plan(self, found: Iterable[tuple[int, int]]) -> Plan:
        """
        Judge the rows and events found under ids that the watermark calls
        finished and the horizon does not: an id whose fingerprints are all among those routed
        under it is the same transaction (the standby had it); any other
        (unknown, or with rows never routed under it) was reused.
        """
        found_by_xact: dict[int, set[int]] = collections.defaultdict(set)
        for xact_id, print_ in found:
            found_by_xact[xact_id].add(print_)
        routed: dict[int, set[int]] = collections.defaultdict(set)
        for chunk in self._chunks:
            for xact_id, print_ in zip(chunk.xacts, chunk.prints, strict=True):
                if xact_id in found_by_xact:
                    routed[xact_id].add(print_)
        reused = frozenset(
            xact_id for xact_id, prints in found_by_xact.items() if not prints <= routed[xact_id]
        )
        oldest = next((chunk for chunk in self._chunks if chunk.xacts), None)
        past_memory = oldest is not None and not any(
            xact_id in found_by_xact and xact_id not in reused for xact_id in oldest.xacts
        )
        return Plan(reused, len(found_by_xact) - len(reused), past_memory)
