"""
The soak's arithmetic and its page: slopes and their noise, the schedule of
restarts and listener kills, and a verdict that says what it saw.
"""

from __future__ import annotations

import mmap
import random
from pathlib import Path

import pytest

from bench.measure import anonymous_memory_kib
from bench.soak.report import render
from bench.soak.run import schedule
from bench.soak.trend import fit


def test_a_straight_line_has_its_slope_per_hour_and_no_noise() -> None:
    trend = fit([(t, 100.0 + 2.0 * t / 3600) for t in range(0, 1800, 10)])
    assert trend.slope_per_h == pytest.approx(2.0)
    assert trend.noise_per_h == pytest.approx(0.0, abs=1e-9)
    assert trend.beyond_noise


def test_scatter_around_a_flat_level_is_no_slope_beyond_noise() -> None:
    pick = random.Random(7)
    trend = fit([(float(t), 50.0 + pick.gauss(0, 1)) for t in range(0, 1800, 10)])
    assert not trend.beyond_noise
    assert trend.noise_per_h > 0


def test_a_small_leak_under_scatter_is_found() -> None:
    pick = random.Random(7)
    # 10 MB per hour under 1 MB of scatter, 30 minutes of 10 s samples
    trend = fit([(float(t), 50.0 + 10.0 * t / 3600 + pick.gauss(0, 1)) for t in range(0, 1800, 10)])
    assert trend.beyond_noise
    assert trend.slope_per_h == pytest.approx(10.0, rel=0.2)


def _wander(seed: int, drift_per_h: float = 0.0) -> list[tuple[float, float]]:
    """
    Thirty minutes of 10 s samples of a slowly wandering figure (each sample
    the last one's value plus a little: AR(1) with r = 0.95), plus a drift.
    """
    pick = random.Random(seed)
    value, points = 0.0, []
    for t in range(0, 1800, 10):
        value = 0.95 * value + pick.gauss(0, 0.1)
        points.append((float(t), 100.0 + value + drift_per_h * t / 3600))
    return points


def test_a_wandering_figure_without_drift_is_rarely_called_a_slope() -> None:
    """
    Correlated samples are counted as the fewer independent ones they are:
    a driftless wander is beyond noise about as rarely as the 95 % promises
    (independent-sample noise called most of these 200 walks a slope).
    """
    trends = [fit(_wander(seed)) for seed in range(200)]
    assert sum(t.beyond_noise for t in trends) <= 0.12 * len(trends)
    assert all(t.lag1 > 0.5 for t in trends)


def test_a_real_drift_under_a_wandering_figure_is_still_found() -> None:
    """4 per hour under the same wander: found in nearly every run."""
    trends = [fit(_wander(seed, drift_per_h=4.0)) for seed in range(200)]
    assert sum(t.beyond_noise for t in trends) >= 0.9 * len(trends)


def test_fit_refuses_too_few_samples_or_no_time() -> None:
    with pytest.raises(ValueError):
        fit([(0.0, 1.0), (1.0, 2.0)])
    with pytest.raises(ValueError):
        fit([(5.0, 1.0), (5.0, 2.0), (5.0, 3.0)])


def test_schedule_stays_inside_the_run_and_leaves_restart_minutes_to_restarts() -> None:
    assert schedule(30, 10) == [600.0, 1200.0]
    assert schedule(30, 5, 10) == [300.0, 900.0, 1500.0]
    assert schedule(30, 0) == []


def _results(lost: int, rss_slope: float) -> dict:
    trend = {
        "samples": 170,
        "first": 60.0,
        "last": 61.0,
        "low": 59.5,
        "high": 61.5,
        "mean": 60.5,
        "slope_per_h": rss_slope,
        "noise_per_h": 1.0,
    }
    return {
        "config": {
            "minutes": 30.0,
            "sessions": 5000,
            "rate": 500.0,
            "reconnect_share": 0.05,
            "pg_restart_every": 10.0,
            "listener_kill_every": 5.0,
            "sample_every": 10.0,
            "client_procs": 2,
        },
        "machine": {"nproc": 2, "cpu_model": "test cpu", "memory_gib": 8, "python": "3.11"},
        "sessions_live_at_start": 5000,
        "writer": {"attempted": 900_000, "failed": 12},
        "events": [{"at_s": 600.0, "what": "postgres restart", "took_s": 0.5}],
        "samples": [
            {
                "t_s": float(t),
                "rss_mb": 60.0,
                "fds": 5020,
                "cpu_s": t / 10,
                "received": t * 500,
                "tasks": 10_010,
                "loop_lag_ms": 3.0,
                "sessions": 5000,
            }
            for t in range(0, 1800, 10)
        ],
        "accounting": {
            "committed": 899_988,
            "received_unique": 899_988 - lost,
            "lost": lost,
            "not_in_table": 0,
            "duplicates": 0,
            "resyncs": 0,
            "unrecovered_resumes": 0,
            "connects": 12_500,
            "reconnects_asked": 7500,
        },
        "trends": {"warmup_s": 120.0, "rss_mb": trend},
    }


def test_the_page_states_loss_and_each_trend_against_its_noise() -> None:
    page = render(_results(lost=0, rss_slope=0.4))
    assert "**0 lost, 0 duplicated**" in page
    assert "RSS (MB): 0.4 per hour, noise ±1.00 per hour: no slope beyond noise" in page
    assert "open descriptors: not sampled." in page
    assert "| 10.0 min | postgres restart | took_s 0.5 |" in page


def test_a_slope_that_flattens_in_the_second_half_is_called_settling() -> None:
    results = _results(lost=0, rss_slope=4.0)
    results["trends"]["rss_mb"]["second_half"] = {"slope_per_h": 0.2, "noise_per_h": 0.5}
    page = render(results)
    assert "**a slope beyond noise**" in page
    assert "over the second half alone 0.2 per hour, noise ±0.5 (within noise)" in page


def test_the_page_flags_a_slope_beyond_noise_and_a_loss() -> None:
    page = render(_results(lost=3, rss_slope=4.0))
    assert "**3 lost, 0 duplicated**" in page
    assert "**a slope beyond noise**" in page


def test_a_restart_of_notifyd_is_reported_with_the_time_to_the_last_session() -> None:
    results = _results(lost=0, rss_slope=0.4)
    results["config"]["notifyd_restart_every"] = 1.0
    results["events"].append(
        {
            "at_s": 60.0,
            "what": "notifyd restart",
            "exit": 0,
            "stop_s": 2.5,
            "last_live_after_sigterm_s": 21.25,
            "last_live_after_start_s": 18.75,
            "all_live": True,
        }
    )
    page = render(results)
    assert "notifyd itself restarted every 1 minutes" in page
    assert "the last of 5,000 sessions live again 21.2 s after the SIGTERM" in page
    results["events"][-1]["all_live"] = False
    assert "**not every session was live again within 10 minutes**" in render(results)
    assert "Growth is not fitted" in page
    assert "RSS (MB):" not in page


def test_a_task_that_appears_mid_run_shows_as_a_step_between_the_halves() -> None:
    results = _results(lost=0, rss_slope=0.4)
    for sample in results["samples"]:
        sample["task_kinds"] = {
            "Server.conn_handler": 5000 + (3 if sample["t_s"] == 900 else 0),
            "delivery": 1,
            **({"watch": 1} if sample["t_s"] >= 1000 else {}),
        }
    page = render(results)
    assert "| `Server.conn_handler` | 5,000 | 5,000 | 5000 |" in page
    assert "| `delivery` | 1 | 1 | 1 |" in page
    # The warm-up's samples are left out; "watch" runs in most of the second half.
    assert "| `watch` | 0 | 1 | 1 |" in page
    assert "Kinds more numerous in the second half: `watch`." in page


def test_tasks_by_kind_that_hold_steady_are_said_to() -> None:
    results = _results(lost=0, rss_slope=0.4)
    for sample in results["samples"]:
        in_flight = {"Database.window": 1} if sample["t_s"] % 30 == 0 else {}
        sample["task_kinds"] = {"delivery": 1, "Server.conn_handler": 5000, **in_flight}
    assert "No kind is more numerous in the second half" in render(results)


def test_a_second_half_that_falls_beyond_noise_is_not_called_growth() -> None:
    results = _results(lost=0, rss_slope=4.0)
    results["trends"]["rss_mb"]["second_half"] = {"slope_per_h": -0.44, "noise_per_h": 0.06}
    assert "(falling beyond noise: no growth)" in render(results)


def test_a_run_without_a_task_census_has_no_tasks_by_kind_section() -> None:
    assert "## Tasks by kind" not in render(_results(lost=0, rss_slope=0.4))


def test_the_rss_line_says_when_it_was_highest_and_for_how_long_it_was_not_passed() -> None:
    results = _results(lost=0, rss_slope=0.4)
    for sample in results["samples"]:
        sample["rss_mb"] = 60.0 + min(sample["t_s"], 600.0) / 600
    page = render(results)
    assert "highest at 10 min (61.0 MB), not passed in the 20 minutes after." in page
    results["samples"][-1]["rss_mb"] = 62.0
    assert "highest at 30 min (62.0 MB), at the end." in render(results)


def test_the_page_says_which_sslmode_notifyd_connected_with_when_the_run_recorded_it() -> None:
    results = _results(lost=0, rss_slope=0.4)
    assert "sslmode" not in render(results)
    results["notifyd_sslmode"] = "disable"
    assert "- notifyd's DSN says `sslmode=disable`: the embedded cluster has no TLS" in render(
        results
    )


@pytest.mark.parametrize(
    ("blocks_slope", "said"),
    [
        (500.0, "Python's live blocks do not grow: what RSS gains is memory the allocators keep"),
        (5000.0, "Python's live blocks grow with RSS, by 0.71% of their number an hour"),
    ],
)
def test_rss_growth_is_told_apart_as_objects_or_allocator_by_pythons_live_blocks(
    blocks_slope: float, said: str
) -> None:
    results = _results(lost=0, rss_slope=4.0)
    blocks = dict(
        results["trends"]["rss_mb"], slope_per_h=blocks_slope, noise_per_h=1000.0, mean=700_000.0
    )
    results["trends"]["python_blocks"] = blocks
    for sample in results["samples"]:
        sample["python_blocks"] = 1_234_567
    page = render(results)
    assert said in page
    assert "| 0.0 | 60.0 | 1,234.6 | 5020 |" in page
    # RSS within noise: nothing to tell apart.
    results["trends"]["rss_mb"]["slope_per_h"] = 0.4
    assert "Python's live blocks do" not in render(results)
    assert "Python's live blocks grow" not in render(results)


def test_a_run_before_the_heap_was_sampled_shows_no_blocks() -> None:
    page = render(_results(lost=0, rss_slope=4.0))
    assert "Python's live memory blocks: not sampled." in page
    assert "| 0.0 | 60.0 | — | 5020 |" in page


def test_the_page_says_when_notifyd_ran_full_collections_once_the_run_counted_them() -> None:
    results = _results(lost=0, rss_slope=0.4)
    assert "Full collections" not in render(results)
    for sample in results["samples"]:
        sample["full_collections"] = 7 + (sample["t_s"] >= 300) + (sample["t_s"] >= 1500)
    assert "Full collections on the clock: 2 (in the sample at minute 5.0, 25.0)." in render(
        results
    )


_SMAPS = """\
559ee6169000-559ee797e000 rw-p 00000000 00:00 0                          [heap]
Size:              24660 kB
Rss:               24600 kB
7f19fadfc000-7f19fc000000 rw-p 00000000 00:00 0
Size:              18448 kB
Rss:               18000 kB
7f19fc021000-7f1a00000000 ---p 00000000 00:00 0
Size:              65404 kB
Rss:                   0 kB
7f1a05f09000-7f1a066c2000 r-xp 00000000 08:01 123    /usr/lib/libcrypto.so.3
Size:               7908 kB
Rss:                3812 kB
7f1a06d42000-7f1a06d50000 rw-p 00239000 08:01 123    /usr/lib/libcrypto.so.3
Size:                 56 kB
Rss:                  56 kB
7ffd5c1e0000-7ffd5c201000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  40 kB
VmFlags: rd wr mr mw me gd ac
"""


def test_anonymous_memory_counts_the_heap_and_arenas_not_files_stacks_or_reservations() -> None:
    assert anonymous_memory_kib(_SMAPS) == (24660 + 18448, 24600 + 18000)


def test_anonymous_memory_of_a_live_process_sees_a_new_allocation_mapped_then_touched() -> None:
    """
    Read from this process's own smaps: 64 MiB mapped privately, as an
    allocator maps an arena, count at once, and as resident once written.
    """
    smaps = Path("/proc/self/smaps")
    mapped0, resident0 = anonymous_memory_kib(smaps.read_text())
    buffer = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapped1, resident1 = anonymous_memory_kib(smaps.read_text())
    assert mapped1 - mapped0 >= 64 << 10
    assert resident1 - resident0 < 16 << 10
    for offset in range(0, len(buffer), 4096):
        buffer[offset] = 1
    mapped2, resident2 = anonymous_memory_kib(smaps.read_text())
    assert resident2 - resident1 >= 60 << 10
    assert abs(mapped2 - mapped1) < 16 << 10


@pytest.mark.parametrize(
    ("mapped_slope", "said"),
    [
        (
            0.1,
            "- The anonymous memory mapped does not grow (59.50 to 61.50 MB): RSS grows inside "
            "it, as the allocators touch for the first time pages they had mapped before",
        ),
        (5.0, "- The anonymous memory mapped grows too: the allocators take new memory"),
    ],
)
def test_rss_growth_inside_memory_already_mapped_is_told_from_new_mappings(
    mapped_slope: float, said: str
) -> None:
    results = _results(lost=0, rss_slope=4.0)
    results["trends"]["anon_mapped_mb"] = dict(
        results["trends"]["rss_mb"], slope_per_h=mapped_slope, noise_per_h=1.0
    )
    assert said in render(results)
    results["trends"]["rss_mb"]["slope_per_h"] = 0.4
    assert "The anonymous memory mapped" not in render(results)
