"""
The trigger-cost phase, with no server running: INSERT throughput into a
fresh copy of the message table with notifyd's statement trigger, with no
trigger, and with the naive per-row one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg

from notifyd.db import schema_sql

from ..measure import busy_seconds
from ..plan import NOTIFYD_TABLE
from ..progress import progress
from ..rig import Rig, start_writers

__all__ = ["trigger_phase"]

COPY_TABLE = "bench_trigger_cost"


def insert_trigger_on(table: str) -> str:
    """
    schema.sql's own insert trigger, put on ``table``: the copy measures the
    trigger notifyd ships, whatever its definition becomes.
    """
    schema = schema_sql()
    start = schema.index("CREATE OR REPLACE TRIGGER notifyd_wake_on_insert")
    statement = schema[start : schema.index(";", start) + 1]
    moved = statement.replace(f"ON {NOTIFYD_TABLE}\n", f"ON {table}\n")
    if moved == statement:
        raise RuntimeError(f"schema.sql's insert trigger is not on {NOTIFYD_TABLE}: {statement}")
    return moved


async def trigger_phase(rig: Rig) -> dict[str, Any]:
    """
    Rows/s of 4 connections inserting into a fresh copy of the table with
    notifyd's statement trigger, with none, and with the naive per-row one;
    synchronous_commit on.
    """
    plan = rig.plan
    conns = max(1, 4 // plan.writer_procs)
    writers = await start_writers(rig, "trigger-writers", conns, "on")
    runs: list[dict[str, Any]] = []
    try:
        for round_ in range(plan.trigger_rounds):
            for rows in (1, 100):
                for trigger in ("notifyd", "none", "naive"):
                    await rig.db.execute(
                        f"DROP TABLE IF EXISTS {COPY_TABLE}; "
                        f"CREATE TABLE {COPY_TABLE} (LIKE {NOTIFYD_TABLE} INCLUDING ALL); "
                        + insert_trigger_on(COPY_TABLE)
                    )
                    if trigger != "notifyd":
                        await rig.db.execute(
                            f"ALTER TABLE {COPY_TABLE} DISABLE TRIGGER notifyd_wake_on_insert"
                        )
                    if trigger == "naive":
                        await rig.db.execute(
                            f"CREATE TRIGGER naive_notify AFTER INSERT ON {COPY_TABLE} "
                            "FOR EACH ROW EXECUTE FUNCTION naive_notify()"
                        )
                    with contextlib.suppress(asyncpg.PostgresError):
                        await rig.db.execute("CHECKPOINT")
                    calm = await rig.wait_calm(longest=5.0)
                    busy0, own0, wall0 = busy_seconds(), rig.own_cpu(), time.monotonic()
                    replies = await asyncio.gather(
                        *(
                            w.request(
                                {
                                    "cmd": "flood",
                                    "table": COPY_TABLE,
                                    "rows": rows,
                                    "duration": plan.trigger_s,
                                },
                                timeout=plan.trigger_s + 120,
                            )
                            for w in writers
                        )
                    )
                    other = ((busy_seconds() - busy0) - (rig.own_cpu() - own0)) / (
                        time.monotonic() - wall0
                    )
                    rate = sum(r["rows"] for r in replies) / max(r["seconds"] for r in replies)
                    runs.append({
                        "round": round_, "rows_per_statement": rows, "trigger": trigger, "rows_per_s": rate,
                        "other_load_before_cores": calm, "other_load_cores": max(0.0, other),
                    })  # fmt: skip
                    progress(
                        f"  trigger cost, round {round_ + 1}: {rows}-row statements, trigger {trigger}: "
                        f"{rate:,.0f} rows/s (other load {max(0.0, other):.2f} cores)"
                    )
    finally:
        for writer in writers:
            await rig.retire(writer)
        with contextlib.suppress(Exception):
            await rig.db.execute(f"DROP TABLE IF EXISTS {COPY_TABLE}")
    cases = []
    for rows in (1, 100):
        for trigger in ("notifyd", "none", "naive"):
            rates = sorted(
                r["rows_per_s"]
                for r in runs
                if r["rows_per_statement"] == rows and r["trigger"] == trigger
            )
            cases.append(
                {
                    "rows_per_statement": rows,
                    "trigger": trigger,
                    "rows_per_s": rates[len(rates) // 2],
                    "rounds": rates,
                }
            )
    return {
        "connections": conns * plan.writer_procs,
        "seconds": plan.trigger_s,
        "rounds": plan.trigger_rounds,
        "cases": cases,
        "runs": runs,
    }
