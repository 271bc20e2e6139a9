"""
The event loop's lag and task count: measured in the instance, reported by
/healthz and /metrics (what a soak run samples for growth).
"""

from __future__ import annotations

import asyncio
import json
import time

from notifyd.lag import LoopLag
from notifyd.vitals import task_census

from .conftest import TIMEOUT, http_get


def test_worst_lag_forgets_samples_older_than_the_window() -> None:
    lag = LoopLag(window_s=10.0)
    lag.record(100.0, 0.5)
    lag.record(105.0, 0.1)
    assert lag.worst() == 0.5
    lag.record(111.0, 0.2)
    assert lag.worst() == 0.2


def test_no_sample_means_no_lag() -> None:
    assert LoopLag().worst() == 0.0


async def test_a_blocked_loop_shows_as_lag_in_health_and_metrics(daemon) -> None:
    # The stimulus: one callback that holds the loop for 0.6 s, as a long
    # synchronous step in a handler would; the timer due during it runs up
    # to one sampling interval (0.1 s) less late than that.
    asyncio.get_running_loop().call_soon(time.sleep, 0.6)
    deadline = time.monotonic() + TIMEOUT
    while True:
        health = json.loads(await http_get(f"http://127.0.0.1:{daemon.port}/healthz"))
        if health["loop_lag_ms"] >= 450 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert health["loop_lag_ms"] >= 450, health
    assert health["tasks"] > 0
    metrics = (await http_get(f"http://127.0.0.1:{daemon.port}/metrics")).decode()
    lines = dict(
        line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#")
    )
    assert float(lines["notifyd_event_loop_lag_seconds"]) >= 0.45
    # delivery, the listener, the lag timer and this scrape's handler at least
    assert float(lines["notifyd_asyncio_tasks"]) >= 4


async def _parked(forever: asyncio.Event) -> None:
    await forever.wait()


async def test_the_task_census_counts_tasks_by_name_or_else_by_coroutine() -> None:
    forever = asyncio.Event()
    unnamed = [asyncio.create_task(_parked(forever)) for _ in range(3)]
    named = asyncio.create_task(_parked(forever), name="lease renewal")
    try:
        census = task_census([*unnamed, named])
    finally:
        forever.set()
        await asyncio.gather(*unnamed, named)
    assert census == {"_parked": 3, "lease renewal": 1}
    assert list(census) == ["_parked", "lease renewal"]


async def test_healthz_lists_the_instances_tasks_by_kind_only_when_asked(daemon) -> None:
    url = f"http://127.0.0.1:{daemon.port}/healthz"
    plain = json.loads(await http_get(url))
    assert "task_kinds" not in plain
    kinds = json.loads(await http_get(url + "?tasks"))["task_kinds"]
    # Every task counted once, and the instance's named background tasks
    # by their names.
    assert sum(kinds.values()) >= 4
    assert "delivery" in kinds, kinds


async def test_healthz_heap_counts_the_interpreters_live_blocks_only_when_asked(daemon) -> None:
    """`/healthz?heap` rises by the objects the process holds and falls when they go."""
    url = f"http://127.0.0.1:{daemon.port}/healthz"
    assert "python_heap" not in json.loads(await http_get(url))

    async def blocks() -> int:
        heap = json.loads(await http_get(url + "?heap"))["python_heap"]
        assert heap["frozen_objects"] >= 0
        return int(heap["allocated_blocks"])

    before = await blocks()
    held = [[n] for n in range(100_000)]
    holding = await blocks()
    del held
    after = await blocks()
    # Each held list is at least one block; the scrapes themselves come and go.
    assert holding - before >= 100_000, (before, holding)
    assert holding - after >= 100_000, (holding, after)
