"""
Reads on a hot standby (``NOTIFYD_READ_DSN``): which server serves a read.

Pure: the I/O (asking the standby how far it has replayed, the reads
themselves) is :mod:`notifyd.db`'s; this module only decides, from what it
is told, with the clock passed in.

A read may go to the standby once the standby has replayed the primary's WAL
up to a *target* position: the primary's insert position taken after the
snapshot the read is bounded by (so every commit visible in that snapshot is
replayed there), or after a user's own last write (read-your-writes). A
standby that has not reached a target within ``max_lag_s`` is *bypassed*:
reads go to the primary, and the standby is asked again at most every
``recheck_s``, and used again once it has caught up with a target. A standby
that cannot be reached, or is no longer a standby, is bypassed the same way.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

__all__ = ["LsnError", "ReplicaPolicy", "Route", "Switch", "format_lsn", "parse_lsn", "replayable"]

_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")

# The headers at the start of each WAL page and of each WAL segment's first
# page (SizeOfXLogShortPHD, SizeOfXLogLongPHD).
_SHORT_PAGE_HEADER = 24
_LONG_PAGE_HEADER = 40


class LsnError(ValueError):
    """
    Not a ``pg_lsn`` in its text form.
    """


def parse_lsn(text: str) -> int:
    """
    A ``pg_lsn`` (``16/B374D848``) as an integer.
    """
    match = _LSN.fullmatch(text)
    if match is None:
        raise LsnError(f"not a pg_lsn: {text[:40]!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """
    An integer position in ``pg_lsn``'s text form.
    """
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def replayable(insert_lsn: int, *, block_size: int, segment_size: int) -> int:
    """
    The position a standby must have replayed to hold every record that
    ended at or before the primary's insert position ``insert_lsn``.

    ``pg_current_wal_insert_lsn()`` names the next record's start, which lies
    past a page header when the last record ended on a page boundary; a
    standby's replay position is the last record's end, the boundary itself,
    and would never reach the header's far side until another record came.
    No record ends inside a header, so the boundary is the same target.
    """
    if insert_lsn % segment_size == _LONG_PAGE_HEADER:
        return insert_lsn - _LONG_PAGE_HEADER
    if insert_lsn % block_size == _SHORT_PAGE_HEADER:
        return insert_lsn - _SHORT_PAGE_HEADER
    return insert_lsn


class Route(enum.Enum):
    """
    Where a read goes, as far as the policy knows before asking the standby.
    """

    # The standby is known to have replayed the target: read there.
    STANDBY = "standby"
    # The standby is in use but its replay is not known to reach the
    # target: ask it (and wait, up to the lag bound).
    WAIT = "wait"
    # The standby is bypassed and its next check is due: ask it once, no wait.
    CHECK = "check"
    # The standby is bypassed: read on the primary.
    PRIMARY = "primary"


class Switch(enum.Enum):
    """
    A change of where reads go, to log once.
    """

    BYPASSED = "bypassed"
    RESUMED = "resumed"


@dataclass
class ReplicaPolicy:
    """
    The standby's state as delivery and the client actions have seen it.

    ``in_use`` starts false: the standby serves reads from its first answer
    that reaches a target.
    """

    max_lag_s: float
    recheck_s: float = 1.0
    in_use: bool = False
    # The highest replay position the standby reported.
    replayed: int = 0
    fallbacks: int = 0
    # The longest a read waited for replay, of the reads since the last
    # check (seconds): the lag as the reads felt it.
    last_wait_s: float = 0.0
    _next_check: float = 0.0
    # user -> the primary's position after that user's last write; None:
    # unknown (the position could not be taken), read on the primary until
    # the time stored beside it.
    _writes: dict[str, tuple[int | None, float]] = field(default_factory=dict)

    def route(self, target: int, now: float) -> Route:
        """
        Where a read that needs replay up to ``target`` goes first.
        """
        if self.in_use:
            return Route.STANDBY if self.replayed >= target else Route.WAIT
        if now >= self._next_check:
            return Route.CHECK
        return Route.PRIMARY

    def wait_limit(self, route: Route) -> float:
        """
        How long a read routed so may wait for replay (seconds).
        """
        return self.max_lag_s if route is Route.WAIT else 0.0

    def observed(self, replayed: int) -> None:
        """
        The standby reported this replay position; users whose last write
        it covers read there again.
        """
        if replayed <= self.replayed:
            return
        self.replayed = replayed
        if self._writes:
            self._writes = {
                user: (lsn, until)
                for user, (lsn, until) in self._writes.items()
                if lsn is None or lsn > replayed
            }

    def reached(self, waited_s: float) -> Switch | None:
        """
        The standby reached a read's target after ``waited_s``; returns
        RESUMED when it had been bypassed.
        """
        self.last_wait_s = waited_s
        if self.in_use:
            return None
        self.in_use = True
        return Switch.RESUMED

    def missed(self, waited_s: float, now: float) -> Switch | None:
        """
        The standby did not reach a read's target in time, or could not be
        asked: the read goes to the primary. Returns BYPASSED when the
        standby had been in use.
        """
        self.last_wait_s = waited_s
        self._next_check = now + self.recheck_s
        self.fallbacks += 1
        if not self.in_use:
            return None
        self.in_use = False
        return Switch.BYPASSED

    def wrote(self, user: str, lsn: int | None, now: float) -> None:
        """
        ``user`` changed something; the primary's position after the commit
        is ``lsn`` (None: unknown).
        """
        if lsn is not None and lsn <= self.replayed:
            self._writes.pop(user, None)
            return
        self._writes[user] = (lsn, now + self.max_lag_s)

    def target_for(self, user: str, floor: int, now: float) -> int | None:
        """
        The replay position a read of ``user``'s own messages needs: at
        least ``floor``, and past the user's last write. None: only the
        primary is sure to show that write (its position is unknown).
        """
        entry = self._writes.get(user)
        if entry is None:
            return floor
        lsn, until = entry
        if lsn is None:
            if now < until:
                return None
            del self._writes[user]
            return floor
        return max(floor, lsn)
