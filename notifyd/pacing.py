"""
When delivery reads: on a NOTIFY, or on its own clock under a polling lease.

A transaction that queued a NOTIFY holds a cluster-wide lock from before its
commit record until the record is flushed, so notifying commits run one at a
time. Once the application's commits queue for that lock, the NOTIFYs cost
more than they buy: the instance keeps a short lease in the database (the
sequence ``notifyd_poll_lease``), the triggers skip their NOTIFY while it is
in force, and every instance that sees the lease reads on its own clock
instead (:attr:`Mode.POLLING`).

Whether commits queue is sampled, not guessed from the rate: while it waits
for NOTIFYs and reads more than :data:`SAMPLE_ABOVE` writing transactions a
second, delivery looks at the lock every :data:`SAMPLE_EVERY_S`, and
:data:`SAMPLE_SOON_S` after a look that saw a queue (:meth:`Pacer.sampled`).
The lease starts once writers were seen waiting for it in at least
:data:`CONTENDED_HITS` looks that stand for at least :data:`CONTENDED_SHARE`
of the last second. Under the lease nothing takes
the lock, so nothing can be looked at: the lease is kept while the rate
stays above :data:`RELEASE_SHARE` of the rate at which the queue was seen
(the writing transactions read over the samples' time), and looked at
again once it has run out. A fixed ``poll_above`` rate (an explicit
setting) starts a lease too, and keeps it above half of that.

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
from collections import deque
from dataclasses import dataclass

from .cursor import Snapshot

__all__ = [
    "CONTENDED_HITS",
    "CONTENDED_SHARE",
    "DRAIN_MAX_INTERVAL",
    "LEASE_S",
    "RATE_TAU_S",
    "RELEASE_SHARE",
    "RENEW_WITHIN_S",
    "SAMPLE_ABOVE",
    "SAMPLE_EVERY_S",
    "SAMPLE_SOON_S",
    "Lease",
    "Mode",
    "Pacer",
    "ReadBudget",
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
# Reads a NOTIFY may start at once, back to back, before the budget's pace
# applies (see ReadBudget).
READ_BURST = 4
# After a failed renewal, the next attempt waits this long.
RENEW_RETRY_S = 1.0
# Below this many writing transactions a second the NOTIFY lock is not
# sampled: commits that rare hardly ever meet at the lock.
SAMPLE_ABOVE = 20.0
# How often the lock is sampled while the rate is above that, and how soon
# after a look that saw a queue: a steady queue is confirmed within a few
# hundredths of a second, while a calm lock costs one query per 50 ms.
SAMPLE_EVERY_S = 0.05
SAMPLE_SOON_S = 0.01
# The samples that decide, and how many of them must have seen a writer
# waiting: a fifth of a second of steady queueing starts the lease, while
# the odd collision of a moderate rate (a few per cent of the samples) never
# does.
SAMPLE_WINDOW_S = 1.0
CONTENDED_SHARE = 0.3
CONTENDED_HITS = 3
# Under the lease: keep it while the rate stays above this share of the rate
# at which writers were seen queueing. Measured on a 2-core machine, a
# queue seen at 2,000 commits/s was all but gone at 500/s (writers waiting
# in 4-6 % of the looks).
RELEASE_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    waiting: bool
    # The time it stands for (since the look before it): looks come sooner
    # after a queue was seen, which must not make a queue look more common.
    span: float


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

    Feed it every window's first read (:meth:`observed`), every renewal
    (:meth:`renewed`) and every look at the NOTIFY lock (:meth:`sampled`);
    ask it how long to wait before the next read (:meth:`next_read_in`),
    when to look at the lock (:meth:`next_sample_in`) and whether to renew
    (:meth:`renewal`). ``contention``: a queue at the NOTIFY lock starts a
    lease; ``poll_above``: so does a rate above it. With neither the pacer
    never starts or extends a lease (but still obeys other instances'
    leases). ``interval`` is the wait between reads while polling, and the
    first wait while draining.
    """

    def __init__(
        self, poll_above: float | None, interval: float, *, contention: bool = False
    ) -> None:
        if interval <= 0:
            raise ValueError("the polling interval must be positive")
        self._poll_above = poll_above
        self._contention = contention
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
        # The last second's looks at the NOTIFY lock, and the reads of the
        # same time (when, how many transactions) for the rate they saw.
        self._samples: deque[_Sample] = deque()
        self._reads: deque[tuple[float, int]] = deque()
        self._last_sample_at = -math.inf
        # The rate above which a lease started by contention is kept; None
        # when this instance started none.
        self._keep_above: float | None = None

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
        if self._contention:
            self._reads.append((now, transactions))
            self._forget_before(now - SAMPLE_WINDOW_S)
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
        Whether to start or extend the lease now, once less than
        :data:`RENEW_WITHIN_S` is left: start when writers queue at the
        NOTIFY lock (:meth:`contended`) or above ``poll_above`` transactions
        a second; extend while the rate stays above :data:`RELEASE_SHARE` of
        the rate the queue was seen at, or above half of ``poll_above``, so
        that a rate hovering at a threshold does not flip the mode back and
        forth.
        """
        if (self._poll_above is None and not self._contention) or now < self._renew_not_before:
            return None
        remaining = self.remaining(now)
        if remaining >= RENEW_WITHIN_S:
            return None
        rate = self.rate(now)
        if remaining > 0:
            keep = [t for t in (self._keep_above, self._half_poll_above()) if t is not None]
            return Renewal.EXTEND if keep and rate > min(keep) else None
        if self._poll_above is not None and rate > self._poll_above:
            return Renewal.START
        if self.contended(now):
            keep_above = self._release_rate()
            if keep_above is None:
                # Queued, but too few reads yet to say at what rate.
                return None
            self._keep_above = keep_above
            self._samples.clear()
            return Renewal.START
        return None

    def _half_poll_above(self) -> float | None:
        return None if self._poll_above is None else self._poll_above / 2

    @property
    def keep_above(self) -> float | None:
        """
        The rate above which this instance keeps a lease it started because
        writers queued; None before it started one.
        """
        return self._keep_above

    def next_sample_in(self, now: float) -> float | None:
        """
        Seconds until the next look at the NOTIFY lock (0: now); None while
        there is nothing to look for: not waiting for NOTIFYs, or not busy
        enough for commits to meet there.
        """
        if not (
            self._contention
            and self.mode is Mode.NOTIFY
            and self.remaining(now) == 0
            and self.rate(now) >= SAMPLE_ABOVE
        ):
            return None
        return max(0.0, self._last_sample_at + self.sample_interval - now)

    @property
    def sample_interval(self) -> float:
        """
        The time between two looks at the NOTIFY lock: shorter once the last
        one saw a queue.
        """
        queued = bool(self._samples) and self._samples[-1].waiting
        return SAMPLE_SOON_S if queued else SAMPLE_EVERY_S

    def sampled(self, now: float, waiting: int) -> None:
        """
        A look at the NOTIFY lock: ``waiting`` transactions queued for it.
        """
        span = min(SAMPLE_EVERY_S, now - self._last_sample_at)
        self._last_sample_at = now
        self._samples.append(_Sample(now, waiting > 0, span))
        self._forget_before(now - SAMPLE_WINDOW_S)

    def contended(self, now: float) -> bool:
        """
        Whether the last second's samples saw writers queue at the NOTIFY
        lock often enough to start a lease: in at least
        :data:`CONTENDED_HITS` looks, standing for at least
        :data:`CONTENDED_SHARE` of the time the looks cover.
        """
        recent = [s for s in self._samples if s.at >= now - SAMPLE_WINDOW_S]
        hits = sum(s.waiting for s in recent)
        queued = sum(s.span for s in recent if s.waiting)
        return hits >= CONTENDED_HITS and queued >= CONTENDED_SHARE * sum(s.span for s in recent)

    def _release_rate(self) -> float | None:
        """
        :data:`RELEASE_SHARE` of the rate at which the samples saw the queue:
        the writing transactions of the reads of the last second over the
        time from the first of those reads to the last (each read counts
        the commits since the one before it, so the first one's are left
        out); None while they span less than :data:`SAMPLE_SOON_S`. Reads
        can be 50 ms apart (rows pushed ahead are confirmed that often), so
        the looks that saw the queue may all fall between two of them.
        """
        reads = self._reads
        span = reads[-1][0] - reads[0][0] if reads else 0.0
        if span < SAMPLE_SOON_S:
            return None
        rate = (sum(n for _, n in reads) - reads[0][1]) / span
        return max(SAMPLE_ABOVE, RELEASE_SHARE * rate)

    def _forget_before(self, horizon: float) -> None:
        while self._samples and self._samples[0].at < horizon:
            self._samples.popleft()
        while self._reads and self._reads[0][0] < horizon:
            self._reads.popleft()

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


class ReadBudget:
    """
    How soon a read may start while delivery waits for NOTIFYs: at once
    while the budget lasts, which refills at one read per ``interval`` up to
    :data:`READ_BURST`. So an isolated commit, or the next of a few close
    together, is read without waiting, and a steady stream of NOTIFYs costs
    at most one query per ``interval`` (each serving every commit since the
    one before). ``interval`` 0: no limit.
    """

    def __init__(self, interval: float, burst: int = READ_BURST) -> None:
        if interval < 0 or burst < 1:
            raise ValueError("the interval must not be negative and the burst at least 1")
        self._interval = interval
        self._burst = burst
        self._tokens = float(burst)
        self._at: float | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None and self._interval > 0:
            gained = max(0.0, now - self._at) / self._interval
            self._tokens = min(float(self._burst), self._tokens + gained)
        self._at = now

    def available(self, now: float) -> float:
        """
        Reads that may start at once as of ``now`` (fractions refilling).
        """
        self._refill(now)
        return self._tokens if self._interval > 0 else math.inf

    def wait(self, now: float) -> float:
        """
        Seconds to wait, from ``now``, before the next read may start.
        """
        if self._interval == 0:
            return 0.0
        self._refill(now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) * self._interval

    def spend(self, now: float) -> None:
        """
        A read starts now.
        """
        self._refill(now)
        self._tokens = max(0.0, self._tokens - 1) if self._interval > 0 else self._tokens
