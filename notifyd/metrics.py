"""
Prometheus metrics, read from the instance's counters at scrape time.

A custom collector over :class:`~notifyd.stats.Stats` and the instance's
:class:`~notifyd.vitals.Vitals`: nothing is updated on the delivery path
beyond the plain counters, and each instance has its own registry (tests run
several).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .limits import LIMIT_NAMES
from .pacing import Mode
from .stats import Stats
from .vitals import Vitals

__all__ = ["registry_for", "render_metrics"]


class _InstanceCollector:
    def __init__(self, vitals: Callable[[], Vitals], stats: Stats) -> None:
        self._vitals = vitals
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        vitals = self._vitals()
        stats = self._stats
        yield GaugeMetricFamily(
            "notifyd_sessions", "Open WebSocket sessions", value=vitals.sessions
        )
        yield GaugeMetricFamily(
            "notifyd_users_online", "Users with at least one session", value=vitals.users
        )
        yield CounterMetricFamily(
            "notifyd_messages_delivered", "Message frames handed to sessions", value=stats.delivered
        )
        histogram = stats.latency
        yield HistogramMetricFamily(
            "notifyd_delivery_latency_seconds",
            "From the row's send_time (its transaction's start, by default) to the send",
            buckets=[(bound, float(count)) for bound, count in histogram.cumulative()],
            sum_value=histogram.total,
        )
        yield CounterMetricFamily(
            "notifyd_rows_read",
            "Rows read by delivery's windows, whether or not a session here wanted them",
            value=stats.rows_read,
        )
        yield CounterMetricFamily(
            "notifyd_window_reads",
            "Windows delivery read: its queries for newly committed rows",
            value=stats.window_reads,
        )
        yield CounterMetricFamily(
            "notifyd_delivery_read_failures",
            "Delivery reads that failed and were retried (the database unreachable or refusing)",
            value=stats.read_failures,
        )
        yield CounterMetricFamily(
            "notifyd_history_repairs",
            "Changes of the database's history (a standby promoted) repaired before reading on",
            value=stats.history_repairs,
        )
        yield CounterMetricFamily(
            "notifyd_restamped_rows",
            "Rows and events committed under a transaction id a failover had lost and reused, "
            "moved to a fresh one so that they are pushed and resumed",
            value=stats.restamped,
        )
        yield CounterMetricFamily(
            "notifyd_polling_leases",
            "Polling leases this instance started (the triggers' NOTIFYs went off)",
            value=stats.polling_leases,
        )
        yield CounterMetricFamily(
            "notifyd_full_collections",
            "Full garbage collections: each walked every object and paused the event loop",
            value=vitals.full_collections,
        )
        lock = CounterMetricFamily(
            "notifyd_notify_lock_samples",
            "Looks at the NOTIFY lock while waiting for NOTIFYs under load, by what they saw "
            "(waiting: a writer queued for it)",
            labels=["seen"],
        )
        lock.add_metric(["waiting"], stats.notify_lock_waiting_samples)
        lock.add_metric(["free"], stats.notify_lock_samples - stats.notify_lock_waiting_samples)
        yield lock
        if vitals.wake is not None:
            mode = GaugeMetricFamily(
                "notifyd_wake_mode",
                "1 for how delivery learns of commits now: notify, polling or draining",
                labels=["mode"],
            )
            for name in Mode:
                mode.add_metric([name.value], 1.0 if vitals.wake.mode == name.value else 0.0)
            yield mode
        replica = stats.read_replica
        if replica is not None:
            yield GaugeMetricFamily(
                "notifyd_read_replica_in_use",
                "1 while reads go to the standby (NOTIFYD_READ_DSN), 0 while to the primary",
                value=1.0 if replica.in_use else 0.0,
            )
            yield CounterMetricFamily(
                "notifyd_read_replica_fallbacks",
                "Reads that went to the primary because the standby lagged, failed or was gone",
                value=replica.fallbacks,
            )
            yield GaugeMetricFamily(
                "notifyd_read_replica_wait_seconds",
                "How long the last read waited for the standby to replay the primary's position",
                value=replica.last_wait_s,
            )
        yield CounterMetricFamily(
            "notifyd_gap_repair_rows",
            "Rows delivered by the first read after LISTEN came back",
            value=stats.repair_rows,
        )
        yield CounterMetricFamily(
            "notifyd_resyncs",
            "resync events sent (queue overflow, replay limit, unusable cursor)",
            value=stats.resyncs,
        )
        yield CounterMetricFamily(
            "notifyd_inline_counts",
            "Message frames that carried the unread counts instead of an unread event",
            value=stats.inline_counts,
        )
        yield CounterMetricFamily(
            "notifyd_inline_count_mismatches",
            "Inline counts an unread event had to correct (never expected)",
            value=stats.inline_count_mismatches,
        )
        yield CounterMetricFamily(
            "notifyd_pushed_ahead",
            "Rows pushed from their NOTIFY's payload, before a window read them",
            value=stats.pushed_ahead,
        )
        yield CounterMetricFamily(
            "notifyd_slow_client_closes",
            "Sessions closed with 4429",
            value=stats.slow_client_closes,
        )
        yield CounterMetricFamily(
            "notifyd_unsafe_skip_urls",
            "skip_url values replaced by null",
            value=stats.unsafe_skip_urls,
        )
        failures = CounterMetricFamily(
            "notifyd_auth_failures", "Rejected authentications by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.auth_failures.items()):
            failures.add_metric([reason], count)
        yield failures
        trips = CounterMetricFamily(
            "notifyd_limit_trips",
            "Hostile-client limits that refused or closed something",
            labels=["limit"],
        )
        # Every limit appears from the start, so a rate() over it works at once.
        counts = dict.fromkeys(LIMIT_NAMES, 0) | dict(stats.limit_trips)
        for limit, count in sorted(counts.items()):
            trips.add_metric([limit], count)
        yield trips
        yield CounterMetricFamily(
            "notifyd_sessions_expired",
            "Sessions closed with 4401 when their token expired",
            value=stats.expired_sessions,
        )
        yield GaugeMetricFamily(
            "notifyd_asyncio_tasks", "asyncio tasks alive in the process", value=vitals.tasks
        )
        yield GaugeMetricFamily(
            "notifyd_event_loop_lag_seconds",
            "Largest delay of a due timer over the last 10 s",
            value=vitals.loop_lag_s,
        )
        listener = vitals.listener
        # The same judgement as /readyz and the systemd watchdog, so an
        # alert on it fires exactly when those say no.
        yield GaugeMetricFamily(
            "notifyd_ready",
            "1 when the instance is ready (/readyz 200: LISTEN up and its probe recent)",
            value=1.0 if vitals.ready else 0.0,
        )
        yield GaugeMetricFamily(
            "notifyd_listen_connected",
            "1 when the LISTEN connection is up",
            value=1.0 if listener.connected else 0.0,
        )
        yield CounterMetricFamily(
            "notifyd_listener_reconnects", "LISTEN connections lost", value=listener.reconnects
        )
        if listener.probe_rtt_s is not None:
            yield GaugeMetricFamily(
                "notifyd_probe_rtt_seconds",
                "Last self-NOTIFY round trip",
                value=listener.probe_rtt_s,
            )
        if listener.probe_age_s is not None:
            yield GaugeMetricFamily(
                "notifyd_probe_age_seconds",
                "Since the LISTEN path last proved itself",
                value=listener.probe_age_s,
            )
        if stats.sinks:
            yield from _sink_metrics(stats)
        if stats.notification_queue_usage is not None:
            yield GaugeMetricFamily(
                "notifyd_pg_notification_queue_usage",
                "pg_notification_queue_usage() at the last probe (0..1)",
                value=stats.notification_queue_usage,
            )


def _sink_metrics(stats: Stats) -> Iterator[Metric]:
    """
    Per-sink counters (:mod:`notifyd.sinks`), labelled by sink name.
    """
    counters = {
        "sent": "Messages a sink delivered",
        "failed": "Failed sink calls or webhook attempts",
        "retries": "Repeated webhook attempts",
        "dropped": "Messages dropped because the sink's queue was full",
        "skipped": "Messages not sent on purpose (type filter, seen in time, deleted)",
        "expired": "Webhook messages given up at the max age",
    }
    for key, text in counters.items():
        family = CounterMetricFamily(f"notifyd_sink_{key}", text, labels=["sink"])
        for name, sink in sorted(stats.sinks.items()):
            family.add_metric([name], getattr(sink, key))
        yield family
    depth = GaugeMetricFamily(
        "notifyd_sink_queue_depth", "Messages waiting in a sink's queue", labels=["sink"]
    )
    for name, sink in sorted(stats.sinks.items()):
        depth.add_metric([name], sink.queue_depth)
    yield depth


def registry_for(vitals: Callable[[], Vitals], stats: Stats) -> CollectorRegistry:
    """
    A registry holding one instance's metrics only.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_InstanceCollector(vitals, stats))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """
    The Prometheus text exposition of ``registry``.
    """
    return generate_latest(registry)
