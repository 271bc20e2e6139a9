"""
When delivery reads: on a NOTIFY, or on its own clock under a polling lease.

A transaction that queued a NOTIFY holds a cluster-wide lock from before its
commit record until the record is flushed, so notifying commits run one at a
time. While notifyd reads continuously anyway, the NOTIFYs buy nothing: an
instance that sees more than ``poll_above`` writing transactions a second
keeps a short lease in the database (the sequence ``notifyd_poll_lease``),
the triggers skip their NOTIFY while it is in force, and every instance that
sees the lease reads on its own clock instead (:attr:`Mode.POLLING`).

Turning the NOTIFYs back on is the delicate part. A transaction whose
trigger ran under the lease commits whenever it commits, with no NOTIFY to
announce it. The first read that sees the lease over was made with a
snapshot taken after the lease ended (see ``LEASE_COLUMNS`` in
:mod:`notifyd.queries`), so every such transaction had its id then: it is
either visible in that snapshot, or in progress in it. In progress means
in the snapshot's in-progress list, or at or past its ``xmax`` (Postgres
sets ``xmax`` one past the newest *finished* transaction, so a running
transaction newer than that is in no list), up to a *horizon*: a
transaction id taken right after that read (:attr:`Pacer.horizon_needed`).
Delivery keeps reading (:attr:`Mode.DRAINING`, the interval doubling up to
:data:`DRAIN_MAX_INTERVAL`) until a later read's snapshot shows every one of
them finished; only then does it wait for NOTIFYs again
(:attr:`Mode.NOTIFY`).

A lease seen to have started and ended between two reads (its end differs
from the one known) is treated like one that ended after polling, whoever
held it: the instance drains before it trusts NOTIFYs again.

Pure: every input is an argument, including the time (``time.monotonic()``
seconds) and what each read saw; :class:`notifyd.delivery.Delivery` owns the
pacer, runs the reads and renews the lease when told to.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .cursor import Snapshot

__all__ = [
    "DRAIN_MAX_INTERVAL",
    "LEASE_S",
    "RATE_TAU_S",
    "RENEW_WITHIN_S",
    "Lease",
    "Mode",
    "Pacer",
    "Renewal",
]

# How long one renewal keeps the NOTIFYs off.
LEASE_S = 1.0
# Renew once less than this is left, so a renewal a little late (a slow
# round trip, a busy loop) still lands before the lease runs out.
RENEW_WITHIN_S = 0.75
# The longest wait between two reads while draining: a transaction that
# skipped its NOTIFY is read at most this long after it commits.
DRAIN_MAX_INTERVAL = 0.1
# The time constant of the rate of writing transactions.
RATE_TAU_S = 1.0
# After a failed renewal, the next attempt waits this long.
RENEW_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Lease:
    """
    The polling lease as one statement saw it: its end and the server's
    clock, both in epoch milliseconds.
    """

    until_ms: int
    now_ms: int

    @property
    def in_force(self) -> bool:
        """
        Whether the triggers skip their NOTIFY (the same comparison as
        ``notifyd_wake()``).
        """
        return self.until_ms > self.now_ms

    @property
    def remaining_s(self) -> float:
        """
        Seconds left when it was seen; 0 when over.
        """
        return max(0.0, (self.until_ms - self.now_ms) / 1000)


class Mode(enum.Enum):
    """
    How delivery learns of new commits.
    """

    NOTIFY = "notify"  # it waits for NOTIFYs (and the listener's probe)
    POLLING = "polling"  # a lease is in force: it reads every interval
    DRAINING = "draining"  # a lease ended: it reads until its writers are done

    def __str__(self) -> str:
        return self.value


class Renewal(enum.Enum):
    """
    What the pacer asks delivery to do with the lease.
    """

    START = "start"  # none in force: start one
    EXTEND = "extend"  # one in force (any instance's): push its end out


class Pacer:
    """
    The wake-up mode of one instance, from what its reads saw.

    Feed it every window's first read (:meth:`observed`) and every renewal
    (:meth:`renewed`); ask it how long to wait before the next read
    (:meth:`next_read_in`) and whether to renew (:meth:`renewal`).
    ``poll_above`` None never starts or extends a lease (but still obeys
    other instances' leases); ``interval`` is the wait between reads while
    polling, and the first wait while draining.
    """

    def __init__(self, poll_above: float | None, interval: float) -> None:
        if interval <= 0:
            raise ValueError("the polling interval must be positive")
        self._poll_above = poll_above
        self._interval = interval
        self.mode = Mode.NOTIFY
        # The transactions a lease's end may have left behind, while
        # draining: these ids, and every id in [_range_low, _range_high)
        # (the high end None until the horizon is known).
        self._draining: frozenset[int] = frozenset()
        self._range_low = 0
        self._range_high: int | None = 0
        self._drain_interval = interval
        # The last lease seen, and when (local clock); None before the first read.
        self._lease: Lease | None = None
        self._lease_seen_at = 0.0
        # Writing transactions per second, decayed to _rate_at.
        self._rate = 0.0
        self._rate_at: float | None = None
        self._renew_not_before = -math.inf

    def waits_for(self, xact_id: int) -> bool:
        """
        Whether draining still waits for this transaction to finish.
        """
        if self.mode is not Mode.DRAINING:
            return False
        high = self._range_high
        return xact_id in self._draining or (
            self._range_low <= xact_id and (high is None or xact_id < high)
        )

    @property
    def horizon_needed(self) -> bool:
        """
        Whether draining waits for :meth:`horizon`: a transaction id taken
        after the read that saw the lease's end.
        """
        return self.mode is Mode.DRAINING and self._range_high is None

    def rate(self, now: float) -> float:
        """
        Writing transactions per second (an exponentially weighted average
        with :data:`RATE_TAU_S`), as of ``now``.
        """
        if self._rate_at is None:
            return 0.0
        return self._rate * math.exp(-max(0.0, now - self._rate_at) / RATE_TAU_S)

    def observed(self, now: float, lease: Lease, snapshot: Snapshot, transactions: int) -> None:
        """
        A window was read: ``lease`` as its first statement saw it,
        ``snapshot`` the window's end (taken by the same statement), and
        ``transactions`` how many transactions' rows (and events) it read.
        """
        self._rate = self.rate(now) + transactions / RATE_TAU_S
        self._rate_at = now
        known = self._lease
        self._lease, self._lease_seen_at = lease, now
        if lease.in_force:
            self.mode = Mode.POLLING
        elif self.mode is Mode.POLLING or known is None or known.until_ms != lease.until_ms:
            # Over, and either polled for or never seen in force: its
            # writers are all visible or in progress in this snapshot.
            self._draining = snapshot.xip
            self._range_low, self._range_high = snapshot.xmax, None
            self._drain_interval = self._interval
            self.mode = Mode.DRAINING
        elif self.mode is Mode.DRAINING:
            self._shrink(snapshot)
            self._drain_interval = min(2 * self._drain_interval, DRAIN_MAX_INTERVAL)
            self._maybe_drained()

    def horizon(self, xact_id: int) -> None:
        """
        A transaction id taken after the read that saw the lease's end
        (every transaction that may have skipped its NOTIFY has a lower
        one).
        """
        if self.horizon_needed:
            self._range_high = xact_id
            self._maybe_drained()

    def _shrink(self, snapshot: Snapshot) -> None:
        """
        Forget what ``snapshot`` shows finished: an id below its ``xmax``
        and not in its in-progress list.
        """
        xmax, xip = snapshot.xmax, snapshot.xip
        self._draining = frozenset(x for x in self._draining if x >= xmax or x in xip)
        high = self._range_high
        cut = max(self._range_low, xmax if high is None else min(high, xmax))
        self._draining |= frozenset(x for x in xip if self._range_low <= x < cut)
        self._range_low = cut

    def _maybe_drained(self) -> None:
        high = self._range_high
        if not self._draining and high is not None and self._range_low >= high:
            self.mode = Mode.NOTIFY

    def next_read_in(self) -> float | None:
        """
        Seconds from the last read to the next one; None: wait for a
        wake-up (a NOTIFY, a probe, a joining session).
        """
        if self.mode is Mode.POLLING:
            return self._interval
        if self.mode is Mode.DRAINING:
            return self._drain_interval
        return None

    def remaining(self, now: float) -> float:
        """
        Seconds left of the last lease seen, as of ``now``; 0 when over or
        none was seen.
        """
        if self._lease is None:
            return 0.0
        return max(0.0, self._lease.remaining_s - (now - self._lease_seen_at))

    def renewal(self, now: float) -> Renewal | None:
        """
        Whether to start or extend the lease now: start above
        ``poll_above`` transactions a second, keep extending while above
        half of it (so a rate hovering at the threshold does not flip the
        mode back and forth), once less than :data:`RENEW_WITHIN_S` is left.
        """
        if self._poll_above is None or now < self._renew_not_before:
            return None
        remaining = self.remaining(now)
        if remaining >= RENEW_WITHIN_S:
            return None
        in_force = remaining > 0
        threshold = self._poll_above / 2 if in_force else self._poll_above
        if self.rate(now) <= threshold:
            return None
        return Renewal.EXTEND if in_force else Renewal.START

    def renewed(self, now: float, lease: Lease) -> None:
        """
        This instance set the lease (as ``lease`` says).
        """
        self._lease, self._lease_seen_at = lease, now
        if lease.in_force:
            self.mode = Mode.POLLING

    def renewal_failed(self, now: float) -> None:
        """
        A renewal did not go through: do not ask again for a while.
        """
        self._renew_not_before = now + RENEW_RETRY_S
