"""
The benchmark report's push-pipeline section and plots, from fixed results:
each target's verdict at and beyond its bound, every figure with its ratio
in the Markdown, the accounting of the commit ceiling, real PNG files, and
the pgbench script and summary the writers use.
No timing is measured here (speed is the benchmark's business).
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from bench.accounting import Row, account
from bench.pgbench import Writes, insert_script, parse_summary
from bench.receipts import frame_row
from bench.report import render
from bench.report.common import TIMES
from bench.report.plots import PLOT_FILES, matplotlib_missing, render_plots
from bench.report.push import Target, push_section, push_targets
from bench.report.resilience import resilience_section
from bench.report.scale import instance_costs
from bench.scale.instances import summarise_instances
from bench.scale.sessions import descriptor_cap, loopback_sources

from .conftest import missing_tool

ROOT = Path(__file__).resolve().parent.parent


def _summary(kind: str, sessions: int, rate: int, **figures: float) -> dict[str, Any]:
    base = {
        "sessions": sessions,
        "rate": rate,
        "kind": kind,
        "runs": 3,
        "p50_ms": 1.0,
        "p99_ms": 4.0,
        "insert_p50_ms": 2.0,
        "insert_p99_ms": 9.0,
        "server_cpu_us": 100.0,
        "pg_cpu_us": 300.0,
        "committed_per_s": float(rate),
        "rows": rate * 30,
        "lost": 0,
        "duplicates": 0,
    }
    return base | figures


def _run(kind: str, sessions: int, rate: int, rep: int) -> dict[str, Any]:
    return {
        "kind": kind,
        "sessions": sessions,
        "rate": rate,
        "rep": rep,
        "tag": f"pl{rep}",
        "committed_per_s": float(rate),
        "rows": rate * 10,
        "received": rate * 10,
        "lost": 0,
        "duplicates": 0,
        "latency_ms": {"n": rate * 10, "p50": 1.0, "p99": 4.0, "p999": 6.0, "max": 9.0},
        "server_cpu_us_per_delivery": 100.0,
        "pg_cpu_us_per_delivery": 300.0,
        "other_load_before_cores": 0.1,
    }


def push_results() -> dict[str, Any]:
    """
    A push-pipeline result where every target is met, each at its bound or
    just inside it.
    """
    summary = []
    for sessions in (1000, 10_000):
        for rate in (500, 2000):
            summary.append(_summary("naive", sessions, rate))
            summary.append(
                _summary(
                    "notifyd",
                    sessions,
                    rate,
                    p50_ms=1.2,
                    p99_ms=4.7,
                    server_cpu_us=100.0,
                    pg_cpu_us=360.0,
                )
            )
    offline = {
        "case": "offline",
        "rep": 0,
        "rows": 8500,
        "commits_per_s": 850.0,
        "catchup": {
            "users": 1000, "rows": 8500, "replayed": 8500, "missing": 0, "twice": 0,
            "not_in_table": 0, "hello_unread": 8500, "not_recovered": 0, "resynced": 0,
        },
        "webhook_queued": None,
    }  # fmt: skip
    online = {
        "case": "online",
        "rep": 0,
        "rows": 4000,
        "commits_per_s": 400.0,
        "delivery": {"rows": 4000, "received": 4000, "lost": 0, "duplicates": 0, "unknown": 0},
    }
    none = {"case": "no_trigger", "rep": 0, "rows": 10_000, "commits_per_s": 1000.0}
    return {
        "commit_clock": "commit_timestamp",
        "rates": [500, 2000],
        "session_counts": [1000, 10_000],
        "reps": 3,
        "seconds": 10.0,
        "pgbench_clients": 16,
        "runs": [_run(k, s, r, 0) for s in (1000, 10_000) for r in (500, 2000) for k in ("notifyd", "naive")],
        "summary": summary,
        "ceiling": {
            "clients": 16,
            "sessions": 1000,
            "seconds": 8.0,
            "reps": 1,
            "commits_per_s": {"offline": 850.0, "no_trigger": 1000.0, "online": 400.0},
            "runs": [offline, none, online],
        },
        "isolated": {
            "messages": 50,
            "gap_s": 0.2,
            "notifyd": {
                "rows": 50, "received": 50, "lost": 0, "duplicates": 0,
                "latency_ms": {"n": 50, "p50": 1.1, "p99": 4.9, "p999": 4.9, "max": 4.9},
            },
            "naive": {
                "rows": 50, "received": 50, "lost": 0, "duplicates": 0,
                "latency_ms": {"n": 50, "p50": 0.9, "p99": 3.0, "p999": 3.0, "max": 3.0},
            },
        },
    }  # fmt: skip


def by_name(targets: list[Target], start: str) -> list[Target]:
    found = [t for t in targets if t.name.startswith(start)]
    assert found, f"no target starting {start!r}"
    return found


def notifyd_summary(push: dict[str, Any], sessions: int, rate: int) -> dict[str, Any]:
    return next(
        s
        for s in push["summary"]
        if (s["kind"], s["sessions"], s["rate"]) == ("notifyd", sessions, rate)
    )


def test_every_target_at_its_bound_is_met() -> None:
    targets = push_targets(push_results())
    measured = [t for t in targets if t.met is not None]
    # 4 loads x (latency, server CPU, Postgres CPU) + 3 ceiling + isolated.
    assert len(measured) == 16
    assert all(t.met for t in measured), [t.name for t in measured if not t.met]


@pytest.mark.parametrize(
    ("figure", "value", "target"),
    [
        ("p50_ms", 1.21, "Commit → receipt"),  # naive 1.0: 1.21x > 1.2x
        ("p99_ms", 4.81, "Commit → receipt"),  # naive 4.0: 1.2025x
        ("server_cpu_us", 100.5, "Server CPU"),  # anything above naive's
        ("pg_cpu_us", 361.0, "Postgres"),  # naive 300: above 1.2x
    ],
)
def test_a_figure_past_its_bound_misses_only_its_own_target(
    figure: str, value: float, target: str
) -> None:
    push = push_results()
    notifyd_summary(push, 10_000, 2000)[figure] = value
    missed = [t for t in push_targets(push) if t.met is False]
    assert len(missed) == 1
    assert missed[0].name.startswith(target)
    assert "2,000 commits/s, 10,000 sessions" in missed[0].name


def test_commit_ceiling_below_its_share_of_the_no_trigger_throughput_is_missed() -> None:
    push = push_results()
    push["ceiling"]["commits_per_s"]["offline"] = 849.0
    (ceiling,) = by_name(push_targets(push), "Commit ceiling")
    assert ceiling.met is False
    assert ceiling.ratio == pytest.approx(0.849)
    assert "849 vs 1,000 commits/s" in ceiling.measured


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("missing", 1),
        ("twice", 1),
        ("not_in_table", 1),
        ("not_recovered", 1),
        ("resynced", 1),
        ("hello_unread", 8499),
        ("replayed", 8499),
    ],
)
def test_a_row_of_the_offline_case_not_accounted_for_misses_the_target(
    field: str, value: int
) -> None:
    push = push_results()
    push["ceiling"]["runs"][0]["catchup"][field] = value
    (accounted,) = by_name(push_targets(push), "Every row of the offline case")
    assert accounted.met is False


def test_the_webhook_queue_when_on_must_hold_every_offline_row() -> None:
    push = push_results()
    push["ceiling"]["runs"][0]["webhook_queued"] = 8499
    (accounted,) = by_name(push_targets(push), "Every row of the offline case")
    assert accounted.met is False
    assert "webhook queue: 8,499 rows" in accounted.measured
    push["ceiling"]["runs"][0]["webhook_queued"] = 8500
    (accounted,) = by_name(push_targets(push), "Every row of the offline case")
    assert accounted.met is True


@pytest.mark.parametrize("field", ["lost", "duplicates", "unknown"])
def test_connected_users_missing_or_doubled_rows_miss_exactly_once(field: str) -> None:
    push = push_results()
    push["ceiling"]["runs"][2]["delivery"][field] = 1
    (once,) = by_name(push_targets(push), "Connected users")
    assert once.met is False


def test_isolated_p99_of_five_ms_misses() -> None:
    push = push_results()
    push["isolated"]["notifyd"]["latency_ms"]["p99"] = 5.0
    (isolated,) = by_name(push_targets(push), "Isolated message")
    assert isolated.met is False
    assert isolated.ratio == pytest.approx(5.0 / 3.0)


def test_figures_not_measured_are_not_judged() -> None:
    push = push_results()
    del push["ceiling"], push["isolated"]
    notifyd_summary(push, 1000, 500)["p99_ms"] = None
    targets = push_targets(push)
    (latency,) = [
        t
        for t in targets
        if t.name.startswith("Commit → receipt p50 and p99 at 500 commits/s, 1,000")
    ]
    assert latency.met is None
    assert all(t.met is None for t in by_name(targets, "Commit ceiling"))
    assert by_name(targets, "Isolated message")[0].met is None


def test_a_rate_the_writers_did_not_reach_is_stated_beside_the_verdict() -> None:
    push = push_results()
    notifyd_summary(push, 1000, 2000)["committed_per_s"] = 980.0
    (latency,) = [
        t
        for t in push_targets(push)
        if t.name.startswith("Commit → receipt p50 and p99 at 2,000 commits/s, 1,000")
    ]
    assert "(commits/s reached: 980 and 2,000)" in latency.measured


def test_section_lists_every_figure_with_its_ratio_and_verdicts() -> None:
    push = push_results()
    notifyd_summary(push, 10_000, 500)["p50_ms"] = 2.5
    text = "\n".join(push_section({"push": push}, ["performance-latency.png"]))
    assert (
        f"| 10,000 | 500 | commit → receipt p50 / p99, ms | 2.50 / 4.70 | 1.00 / 4.00 | 2.50{TIMES} / 1.18{TIMES} |"
        in text
    )
    assert f"| 1,000 | 2,000 | server CPU per delivery, µs | 100 | 100 | 1.00{TIMES} |" in text
    assert f"| 1,000 | 2,000 | Postgres CPU per delivery, µs | 360 | 300 | 1.20{TIMES} |" in text
    assert f"| to users not connected, triggers on | 850 | 0.85{TIMES} | 850 |" in text
    assert f"| commit → receipt p99, ms | 4.90 | 3.00 | 1.63{TIMES} |" in text
    assert text.count("**missed**") == 1
    assert "![performance-latency.png](performance-latency.png)" in text
    assert "pg_xact_commit_timestamp" in text


def test_report_without_push_figures_has_no_push_section() -> None:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    results.pop("push", None)
    assert "## Push pipeline" not in render(results)
    results["push"] = push_results()
    text = render(results)
    assert "## Push pipeline: commit to socket, beside the naive relay" in text
    assert text.index("## Push pipeline") < text.index("## Where the time goes")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path.name} is truncated"
    return width, height


def test_plots_are_real_pngs_from_fixed_results(tmp_path: Path) -> None:
    if matplotlib_missing():
        missing_tool("matplotlib is not installed (pip install -e '.[bench]')")
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    results["push"] = push_results()
    written = render_plots(results, tmp_path, "performance")
    assert written == [f"performance-{name}.png" for name in PLOT_FILES]
    for name in written:
        width, height = _png_size(tmp_path / name)
        assert width >= 600 and height >= 300
    # Without push figures, the ramps still give the latency and CPU plots.
    bare = copy.deepcopy(results)
    del bare["push"]
    assert render_plots(bare, tmp_path, "old") == [
        "old-latency.png",
        "old-cpu.png",
    ]


def test_rows_are_matched_with_receipts_by_id() -> None:
    rows = [Row("a", 1_000_000, 500_000), Row("b", 2_000_000, 1_000_000), Row("c", 3_000_000, 0)]
    receipts = [("a", 3_000_000), ("b", 4_000_000), ("b", 4_500_000), ("x", 1)]
    counts = account(rows, receipts)
    assert counts["rows"] == 3
    assert counts["received"] == 4
    assert counts["delivered_once"] == 1
    assert (counts["lost"], counts["duplicates"], counts["unknown"]) == (1, 1, 1)
    # From each row's commit to its first receipt: 2 ms and 2 ms.
    assert counts["latency_ms"]["p50"] == 2.0
    assert counts["insert_latency_ms"]["max"] == 3.0


def test_frame_row_reads_the_tag_and_id_of_both_servers_frames() -> None:
    notifyd = b'{"event":"message","cursor":"1-2~3","id":"r-1","title":"t","content":"pl3:17"}'
    naive = b'{"id": "r-2", "title": "t", "content": "iso:5", "to_user": "u"}'
    assert frame_row(notifyd) == ("pl3", "r-1")
    assert frame_row(naive) == ("iso", "r-2")
    assert frame_row(b'{"event":"unread","count":3}') is None


def test_push_figures_from_another_run_say_which_run_they_come_from() -> None:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    results["push"] = push_results()
    results["push"]["measured"] = {
        "command": "python -m bench --push-only",
        "mode": "full",
        "date": "2099-01-01 00:00 UTC",
        "load_average_at_start": [3.0, 2.0, 1.0],
    }
    text = render(results)
    assert "These figures come from a separate run, `python -m bench --push-only`" in text
    assert f"the rest of this report is from the run of {results['machine']['date']}" in text
    results["push"]["measured"]["date"] = results["machine"]["date"]
    assert "separate run" not in render(results)


def test_loads_a_quick_run_skipped_are_listed_as_not_measured() -> None:
    push = push_results()
    push["session_counts"] = [1000]
    push["summary"] = [s for s in push["summary"] if s["sessions"] == 1000]
    targets = push_targets(push)
    skipped = [t for t in targets if "10,000 sessions" in t.name]
    assert len(skipped) == 6
    assert all(t.met is None and t.measured == "not measured in this run" for t in skipped)


PGBENCH_OUTPUT = """\
transaction type: /tmp/bench-x.sql
scaling factor: 1
query mode: prepared
number of clients: 16
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 4123
number of failed transactions: 0 (0.000%)
latency average = 31.204 ms
latency stddev = 20.101 ms
rate limit schedule lag: avg 25.932 (max 140.118) ms
initial connection time = 12.345 ms
tps = 412.301234 (without initial connection time)
"""


def test_pgbench_summary_is_read_into_figures() -> None:
    summary = parse_summary(PGBENCH_OUTPUT)
    assert summary == {
        "processed": 4123.0,
        "failed": 0.0,
        "tps": 412.301234,
        "latency_avg_ms": 31.204,
        "lag_avg_ms": 25.932,
        "skipped": None,
    }


def test_pgbench_script_is_one_single_row_insert_to_a_random_user() -> None:
    script = insert_script(Writes("t_message_real_time", "pl3", "user-", 1000))
    assert script.startswith("\\set u random(0, 999)\n")
    assert script.count("INSERT INTO t_message_real_time ") == 1
    assert "'user-' || :u" in script and "'pl3:' ||" in script
    for bad in (
        Writes("t; DROP TABLE x", "pl3", "user-", 10),
        Writes("t_message_real_time", "pl'3", "user-", 10),
        Writes("t_message_real_time", "pl3", "user-", 0),
    ):
        with pytest.raises(ValueError):
            insert_script(bad)


def _measured() -> dict[str, Any]:
    return {
        "machine": {"date": "2025-01-01 00:00 UTC", "nproc": 2, "cpu_model": "test CPU"},
        "command": "python -m bench scale",
        "notifyd_source": {"sha256": "abc123"},
    }


def _pipeline_run(p99: float, lost: int = 0) -> dict[str, Any]:
    return {
        "rows": 10_000,
        "lost": lost,
        "duplicates": 0,
        "latency_ms": {"n": 10_000, "p50": 2.0, "p99": p99, "p999": p99, "max": p99},
        "server_cpu_us_per_delivery": 150.0,
    }


def scale_sessions(opened: int = 100_000, target: int = 100_000) -> dict[str, Any]:
    return {
        "target": target,
        "opened": opened,
        "failed": 0,
        "opened_on_retry": 12,
        "stopped_by": None,
        "capped_by": None if opened == target else "RLIMIT_NOFILE of 20,000 descriptors",
        "open_s": 250.0,
        "opens_per_s": opened / 250.0,
        "stages": [
            {
                "sessions": opened // 2,
                "failed": 0,
                "seconds": 120.0,
                "rss_kib": 60_000 + opened * 6,
                "announcement_last_ms": 500.0,
                "p50_ms": 2.0,
                "p99_ms": 8.0,
                "lost": 0,
                "duplicates": 0,
                "committed_per_s": 1000.0,
                "server_cpu_us_per_delivery": 140.0,
            },
            {
                "sessions": opened,
                "failed": 0,
                "seconds": 130.0,
                "rss_kib": 60_000 + opened * 12,
                "announcement_last_ms": 1250.0,
                "p50_ms": 2.5,
                "p99_ms": 12.0,
                "lost": 0,
                "duplicates": 0,
                "committed_per_s": 1000.0,
                "server_cpu_us_per_delivery": 150.0,
            },
        ],
        "rss_before_kib": 60_000,
        "rss_after_kib": 60_000 + opened * 12,
        "kib_per_session": 12.0,
        "sources": ["127.0.0.2", "127.0.0.3"],
        "client_procs": 4,
        "idle": {"seconds": 60.0, "server_cpu_share": 0.031, "postgres_cpu_share": 0.004},
        "announcement": {"reps": [{}, {}, {}], "median_last_ms": 1234.0},
        "pipeline": {"rate": 1000, "runs": [_pipeline_run(8.0), _pipeline_run(12.0, lost=1)]},
        "load_average": [3.0, 2.0, 1.0, 4.0, 3.0, 2.0],
        "measured": _measured(),
    }


def _instances_row(variant: str, n: int, pg: float, standby: float | None = None) -> dict[str, Any]:
    return {
        "variant": variant,
        "instances": n,
        "runs": 3,
        "pg_cpu_us": pg,
        "standby_cpu_us": standby,
        "server_cpu_us": None if n == 0 else 100.0,
        "backends_cpu_us": None if n == 0 else 20.0 * n,
        "standby_backends_cpu_us": None if standby is None or n == 0 else 30.0 * n,
        "p99_ms": None if n == 0 else 9.0,
        "committed_per_s": 1000.0,
        "rows": 30_000,
        "lost": 0,
        "duplicates": 0,
    }


def scale_instances() -> dict[str, Any]:
    summary = [
        _instances_row("writes alone", 0, 200.0, 40.0),
        _instances_row("instances", 1, 260.0),
        _instances_row("instances", 2, 320.0),
        _instances_row("instances", 4, 440.0),
        _instances_row("instances, reads on a standby", 2, 230.0, 100.0),
    ]
    return {
        "counts": [0, 1, 2, 4],
        "rate": 1000,
        "users": 1000,
        "reps": 3,
        "seconds": 10.0,
        "runs": [],
        "summary": summary,
        "not_measured": ["workers: this notifyd has no NOTIFYD_WORKERS"],
        "load_average": [3.0, 2.0, 1.0, 4.0, 3.0, 2.0],
        "measured": _measured(),
    }


def test_scale_section_states_each_sessions_figure_and_where_it_was_measured() -> None:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    results["scale"] = {"sessions": scale_sessions()}
    text = render(results)
    section = text[text.index("## Scale") :]
    assert "| sessions held | 100,000 (12 on a retry, 0 failed to open) |" in section
    assert "| RSS per session | 12.0 KiB |" in section
    assert "250.0 s (400 sessions/s, 4 client processes, 2 source addresses)" in section
    assert "3.1 % of a core over 60 s" in section
    assert "| 1,234 ms over 3 announcements |" in section
    # The median of the runs' p99s, and every loss counted.
    assert "p50 2.0 ms, p99 10.0 ms; 1 lost, 0 twice of 20,000" in section
    assert "load average 3.0 before, 4.0 after" in section
    # Each stage against the first, measured in the same run.
    stage = "| 100,000 | 130.0 s | 1,230 MiB | 1,250 ms | 2.50 | 12.0 ms | 1.50 | 150 | 0 / 0 |"
    assert stage in section
    assert "| 50,000 | 120.0 s | 645 MiB | 500 ms | 1.00 | 8.0 ms | 1.00 | 140 | 0 / 0 |" in section
    assert "of the 100,000 sessions asked for" not in section
    assert "worker processes" not in section


def test_sessions_held_by_workers_say_that_memory_and_cpu_are_their_sum() -> None:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    results["scale"] = {"sessions": scale_sessions() | {"workers": 6}}
    section = render(results).split("### Sessions on one instance of 6 worker processes", 1)[1]
    assert "ran 6 worker processes (`NOTIFYD_WORKERS=6`)" in section


def test_sessions_of_one_process_and_of_workers_are_reported_side_by_side() -> None:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    workers = scale_sessions() | {"workers": 6}
    results["scale"] = {"sessions": scale_sessions(opened=19_500), "sessions_workers": workers}
    text = render(results)
    assert text.index("### Sessions on one process") < text.index(
        "### Sessions on one instance of 6 worker processes"
    )


def test_sessions_short_of_the_target_say_how_many_were_held_and_why() -> None:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    results["scale"] = {"sessions": scale_sessions(opened=19_500)}
    text = render(results)
    assert (
        "**19,500 of the 100,000 sessions asked for were held** (not 100,000): RLIMIT_NOFILE"
        in text
    )


def test_each_instance_costs_what_it_adds_above_the_writes_alone() -> None:
    costs = instance_costs(scale_instances()["summary"])
    assert costs["instances"][1]["pg_added_us"] == pytest.approx(60.0)
    assert costs["instances"][4]["pg_added_us"] == pytest.approx(240.0)
    assert costs["instances"][4]["pg_added_per_instance_us"] == pytest.approx(60.0)
    standby = costs["instances, reads on a standby"][2]
    assert standby["pg_added_per_instance_us"] == pytest.approx(15.0)
    assert standby["standby_added_us"] == pytest.approx(60.0)
    assert 0 not in costs["instances"]


def test_instances_table_lists_every_deployment_with_its_cost_and_what_was_not_measured() -> None:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    results["scale"] = {"instances": scale_instances()}
    text = render(results)
    section = text[text.index("### More instances on one database") :]
    primary, other = section.split("The standby, notifyd itself", 1)
    assert "| writes alone | 0 | 1,000 | 200 | n/a | n/a | n/a | n/a | n/a |" in primary
    assert "| instances | 4 | 1,000 | 440 | 240 | 60 | 80 | 20 | 2.0 |" in primary
    standby = "| instances, reads on a standby | 2 | 1,000 | 230 | 30 | 15 | 40 | 20 | 2.0 |"
    assert standby in primary
    assert primary.index("| writes alone |") < primary.index("| instances | 1 |")
    assert "| writes alone | 0 | 40 | n/a | n/a | n/a | n/a | 0 / 0 of 30,000 |" in other
    standby = "| instances, reads on a standby | 2 | 100 | 60 | 30 | 100 | 9.0 | 0 / 0 of 30,000 |"
    assert standby in other
    assert "Not measured in this run: workers: this notifyd has no NOTIFYD_WORKERS." in section
    assert (
        "instances: 20 µs of primary CPU per message per instance by its backends, 60 µs by "
        "the whole cluster (medians over 1, 2, 4 instances)"
    ) in section


def test_report_without_scale_figures_has_no_scale_section() -> None:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    results.pop("scale", None)
    assert "## Scale" not in render(results)


def test_instance_runs_are_summarised_as_medians_with_every_loss_counted() -> None:
    runs = [
        {
            "variant": "instances", "instances": 2, "pg_cpu_us_per_message": pg,
            "standby_cpu_us_per_message": None, "server_cpu_us_per_message": 50.0,
            "latency_ms": {"p99": p99}, "committed_per_s": 990.0, "rows": 10_000,
            "lost": lost, "duplicates": 0,
        }
        for pg, p99, lost in ((300.0, 5.0, 0), (100.0, 50.0, 2), (310.0, 6.0, 0))
    ]  # fmt: skip
    (row,) = summarise_instances(runs)
    assert row["pg_cpu_us"] == 300.0
    assert row["p99_ms"] == 6.0
    assert row["lost"] == 2
    assert row["rows"] == 30_000


def test_one_process_holds_only_as_many_sessions_as_its_descriptor_limit_leaves_room_for() -> None:
    assert descriptor_cap(100_000, 1_048_576) == (100_000, None)
    held, why = descriptor_cap(100_000, 20_000)
    assert held < 20_000
    assert why is not None and "20,000" in why
    # Worker processes each have their own descriptor table.
    assert descriptor_cap(100_000, 20_000, processes=6) == (100_000, None)


def test_sessions_are_spread_over_enough_loopback_sources() -> None:
    assert loopback_sources(5000) == ["127.0.0.2", "127.0.0.3"]
    sources = loopback_sources(100_000)
    assert len(sources) == 5
    assert sources[-1] == "127.0.0.6"


def test_a_run_of_some_deployments_is_reported_beside_the_run_of_all() -> None:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    workers = scale_instances()
    del workers["not_measured"]
    workers["variants"] = [{"name": "workers", "workers": True, "replica": False}]
    results["scale"] = {"instances": scale_instances(), "instances_workers": workers}
    text = render(results)
    assert text.index("### More instances on one database\n") < text.index(
        "### More instances on one database: workers\n"
    )


def test_postgres_cpu_is_split_by_part_when_the_runs_measured_it() -> None:
    """The split table appears with each part of both servers and their ratio, and only then."""
    push = push_results()
    assert "Where Postgres's CPU goes" not in "\n".join(push_section({"push": push}))
    for summary in push["summary"]:
        notifyd = summary["kind"] == "notifyd"
        summary["pg_cpu_us_by_part"] = {
            "writers": 250.0,
            "server": 90.0 if notifyd else 30.0,
            "background": 15.0,
            "other": 5.0,
        }
    text = "\n".join(push_section({"push": push}))
    assert "### Where Postgres's CPU goes" in text
    assert f"| 1,000 | 500 | the server's own connections | 90 | 30 | 3.00{TIMES} |" in text
    assert f"| 10,000 | 2,000 | writers' backends (pgbench) | 250 | 250 | 1.00{TIMES} |" in text


def test_the_resilience_section_sums_up_the_soak_and_the_storm_from_their_results() -> None:
    soak = json.loads((Path(__file__).parent.parent / "bench" / "soak.json").read_text())
    storm = json.loads((Path(__file__).parent.parent / "bench" / "restart-storm.json").read_text())
    soak["accounting"] = {**soak["accounting"], "committed": 1234567, "lost": 0, "duplicates": 2}
    soak["trends"]["rss_mb"] = {"slope_per_h": 0.5, "noise_per_h": 0.25}
    soak["trends"]["python_blocks"] = {"slope_per_h": 5000.0, "noise_per_h": 20000.0}
    storm["events"] = [
        {"what": "notifyd restart", "all_live": True, "last_live_after_sigterm_s": 12.34},
        {"what": "notifyd restart", "all_live": False},
    ]
    lines = resilience_section(soak, storm)
    text = "\n".join(lines)
    assert lines[0] == "## Resilience"
    assert "0 lost and 2 duplicated of 1,234,567 committed messages" in text
    assert "RSS +0.5 MB/h (noise ±0.25), beyond noise" in text
    assert "Python's live memory blocks +5,000/h (noise ±20,000), within noise" in text
    assert "live again 12.3 s, not all back after the SIGTERM" in text
    assert resilience_section(None, None) == []


def test_every_notifyd_run_says_how_it_learned_of_the_commits_when_that_was_recorded() -> None:
    """The runs table's last column: share pushed ahead, window reads, leases; blank otherwise."""
    push = push_results()
    recorded = push["runs"][0]
    assert recorded["kind"] == "notifyd"
    recorded["rows"] = 5000
    recorded["notifyd"] = {"pushed_ahead": 4850.0, "window_reads": 212.0, "polling_leases": 1.0}
    lines = [line for line in push_section({"push": push}) if line.startswith("| 1,000 | 500 |")]
    runs = [line for line in lines if line.count("|") == 13]
    assert runs[0].endswith("| 97% / 212 / 1 |")
    assert runs[1].endswith("|  |")
