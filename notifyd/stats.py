"""
Counters the daemon keeps for health and metrics, without I/O.

Plain attributes and one fixed-bucket histogram, so the hot path pays an
integer increment, not a metrics library call; :mod:`notifyd.metrics` reads
them when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from .replica import ReplicaPolicy

__all__ = ["LATENCY_BUCKETS", "LatencyHistogram", "SinkStats", "Stats"]

# Seconds; the last bucket is +Inf.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class LatencyHistogram:
    """
    Cumulative-ready histogram over :data:`LATENCY_BUCKETS`.
    """

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    observations: int = 0

    def observe(self, seconds: float) -> None:
        """
        Record one value; negative values (clock skew) count as zero.
        """
        seconds = max(0.0, seconds)
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.observations += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """
        (upper bound, cumulative count) pairs, ending with ``+Inf``.
        """
        result = []
        running = 0
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result


@dataclass
class Stats:
    """
    Everything counted since start.
    """

    delivered: int = 0
    unsafe_skip_urls: int = 0
    resyncs: int = 0
    slow_client_closes: int = 0
    repair_rows: int = 0
    # Message frames that carried their user's unread counts (?counts=inline),
    # and the times the ledger then settled to other counts (an unread event
    # corrected them; never expected).
    inline_counts: int = 0
    inline_count_mismatches: int = 0
    # Rows pushed from their NOTIFY's payload before a window read them.
    pushed_ahead: int = 0
    # Rows read by delivery's windows (each once per instance, whether or not
    # a session here wanted it), the windows read, and polling leases this
    # instance started.
    rows_read: int = 0
    window_reads: int = 0
    polling_leases: int = 0
    # Looks at the NOTIFY lock, and those that saw a writer queue for it.
    notify_lock_samples: int = 0
    notify_lock_waiting_samples: int = 0
    # Delivery's reads that failed (the database unreachable or refusing);
    # each is retried, so this counts waits, not losses.
    read_failures: int = 0
    # Changes of the database's history repaired (a standby promoted), and
    # the rows and events they moved off reused transaction ids.
    history_repairs: int = 0
    restamped: int = 0
    auth_failures: Counter[str] = field(default_factory=Counter)
    # Hostile-client limits that said no, by limit name (docs/security.md).
    limit_trips: Counter[str] = field(default_factory=Counter)
    expired_sessions: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    notification_queue_usage: float | None = None
    sinks: dict[str, SinkStats] = field(default_factory=dict)
    # Reads on a hot standby (NOTIFYD_READ_DSN): where they go now, the
    # fallbacks to the primary, the last wait for replay. None without one.
    read_replica: ReplicaPolicy | None = None


@dataclass
class SinkStats:
    """
    One sink's counters (see :mod:`notifyd.sinks`).

    ``sent`` and ``failed`` count messages; ``retries`` repeated attempts;
    ``dropped`` messages its full queue refused; ``skipped`` messages not
    sent on purpose (seen in time, expired); ``queue_depth`` is read live.
    """

    sent: int = 0
    failed: int = 0
    retries: int = 0
    dropped: int = 0
    skipped: int = 0
    expired: int = 0
    queue_depth: int = 0
