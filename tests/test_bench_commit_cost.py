"""
The bench's commit-cost phase takes a single-row commit apart on the real
cluster: each server's table, with and without its trigger, measured on the
backends that do the work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import asyncpg

from bench.phases.commit_cost import CASES, commit_cost_phase
from bench.plan import make_plan
from bench.report.common import TIMES
from bench.report.push import push_section


def _postmaster_of(backend: int) -> int:
    fields = Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


async def test_each_case_is_measured_on_its_table_with_only_its_trigger_and_leaves_nothing_behind(
    db: asyncpg.Connection, dsn: str
) -> None:
    plan = dataclasses.replace(make_plan(True, 10), commit_cost_commits=300, trigger_rounds=2)
    backend = await db.fetchval("SELECT pg_backend_pid()")
    rig = SimpleNamespace(plan=plan, db=db, dsn=dsn, pg_pid=_postmaster_of(backend))
    result = await commit_cost_phase(rig)  # type: ignore[arg-type]
    assert result["measured"] and result["commits"] == 300
    assert set(result["cases"]) == {key for key, *_ in CASES}
    assert len(result["runs"]) == 2 * len(CASES)
    triggered = {key: trigger is not None for key, _, trigger, _ in CASES}
    # Each copy notifies exactly as its trigger does, the bare ones never.
    assert all(
        run["notifications"] == (300 if triggered[run["case"]] else 0) for run in result["runs"]
    )
    for case in result["cases"].values():
        # CPU clock ticks are 10 ms; 300 commits take several.
        assert case["writer_us"] > 0
    left = await db.fetchval(
        "SELECT count(*) FROM pg_class WHERE relname IN ('bench_cost_notifyd', 'bench_cost_naive')"
    )
    assert left == 0


async def test_a_cluster_the_harness_does_not_run_is_not_measured(db: asyncpg.Connection) -> None:
    rig = SimpleNamespace(plan=make_plan(True, 10), db=db, dsn="", pg_pid=None)
    assert await commit_cost_phase(rig) == {"measured": False}  # type: ignore[arg-type]


def test_the_report_takes_a_commit_apart_with_each_step_as_a_difference() -> None:
    cases = {
        "naive_bare": 100.0,
        "naive": 150.0,
        "notifyd_bare": 120.0,
        "notifyd_row_trigger": 170.0,
        "notifyd": 230.0,
    }
    push = {
        "commit_cost": {
            "measured": True,
            "commits": 2000,
            "rounds": 3,
            "cases": {
                key: {
                    "what": what,
                    "writer_us": cases[key] - 20,
                    "listener_us": 20.0,
                    "total_us": cases[key],
                }
                for key, _, _, what in CASES
            },
        }
    }
    text = "\n".join(push_section({"push": push}))
    assert "### A single-row commit, piece by piece" in text
    assert f"| notifyd's table and insert trigger | 210 | 20 | 230 | 1.53{TIMES}" in text
    assert "notifyd's table over the naive relay's, no trigger: +20 µs" in text
    assert "notifyd's trigger over the naive relay's, both on notifyd's table: +60 µs" in text
    assert "the naive relay's trigger on its table: +50 µs; notifyd's on its table: +110 µs" in text
    push["commit_cost"] = {"measured": False}
    assert "piece by piece" not in "\n".join(push_section({"push": push}))
