"""
The query pool against a real PostgreSQL: how its statements are planned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg

from notifyd.cursor import Snapshot
from notifyd.db import _WINDOW_LEAN, Database
from notifyd.dispatch import _FILL, _START


async def test_window_reads_stay_custom_planned_after_many_reads_of_an_empty_table(dsn, db):
    """
    Delivery's window read is planned with its parameters on every execution,
    even after many reads of an empty table, where Postgres would otherwise
    cache a generic sequential-scan plan and keep walking the whole table as
    it grows.
    """
    database = await Database.connect(dsn, size=1)
    try:
        base = await database.snapshot()
        for _ in range(10):
            window = await database.window(base, limit=100)
            assert window.rows == []
        await db.execute(
            "INSERT INTO t_message_real_time (to_user, title, content, type, send_user) "
            "SELECT 'u' || g, 't', 'c', 'x', 'w' FROM generate_series(1, 2000) AS g"
        )
        window = await database.window(base, limit=100)
        assert [row["to_user"] for row in window.rows] == [f"u{g}" for g in range(1, 101)]
        async with database.pool.acquire() as connection:
            plans = await connection.fetch(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE '%has_events%' "
                "AND statement NOT LIKE '%pg_prepared_statements%'"
            )
    finally:
        await database.close()
    assert len(plans) == 1
    assert plans[0]["generic_plans"] == 0
    assert plans[0]["custom_plans"] == 11


async def test_window_read_uses_the_xact_index_on_a_large_table_never_analyzed(dsn, db):
    """
    On a table that has grown since it was created and was never analyzed
    (a new deployment before autovacuum comes by), the window read still
    finds new rows through the xact_id index instead of reading the whole
    table on every window.
    """
    await _grow_unanalyzed(db)
    # Writers in the middle of their transactions, as under load.
    writers = [await asyncpg.connect(dsn) for _ in range(8)]
    try:
        for writer in writers:
            await writer.execute("BEGIN")
            await writer.execute("SELECT pg_current_xact_id()")
        # A later commit moves xmax past them: they are the snapshot's xip.
        await db.execute("SELECT pg_current_xact_id()")
        base = Snapshot.from_pg(await db.fetchval("SELECT pg_current_snapshot()::text"))
    finally:
        for writer in writers:
            await writer.close()
    assert len(base.xip) == 8
    assert (
        await db.fetchval("SELECT count(*) FROM pg_stats WHERE tablename = 't_message_real_time'")
        == 0
    )
    plan = await db.fetchval(
        "EXPLAIN (FORMAT JSON) " + _WINDOW_LEAN, base.to_pg(), [str(x) for x in base.xip], 1000
    )
    _assert_reads_few_rows_by_index(plan)


async def test_webhook_dispatch_fill_uses_the_xact_index_on_a_large_table(db):
    """
    The webhook queue's fill finds the messages committed since the stored
    snapshot through the xact_id index, however large the table.
    """
    await db.execute(_START, "hook")
    await _grow_unanalyzed(db)
    await db.execute("UPDATE t_message_dispatch_state SET snap = pg_current_snapshot()")
    stored = await db.fetchval("SELECT snap::text FROM t_message_dispatch_state")
    async with db.transaction():
        plan = await db.fetchval("EXPLAIN (FORMAT JSON) " + _FILL, "hook", 0.0, None, False, stored)
    _assert_reads_few_rows_by_index(plan)


_GROWN_ROWS = 40_000


async def _grow_unanalyzed(db: asyncpg.Connection) -> None:
    """
    Fill the message table as a new deployment does before autovacuum
    first analyzes it.
    """
    await db.execute("ALTER TABLE t_message_real_time SET (autovacuum_enabled = false)")
    for _ in range(_GROWN_ROWS // 1000):
        await db.execute(
            "INSERT INTO t_message_real_time (to_user, title, content, type, send_user) "
            "SELECT 'u' || g, 't', 'c', 'x', 'w' FROM generate_series(1, 1000) AS g"
        )


def _assert_reads_few_rows_by_index(plan: str) -> None:
    [scan] = [
        node
        for node in _plan_nodes(json.loads(plan)[0]["Plan"])
        if node.get("Relation Name") == "t_message_real_time"
    ]
    assert scan["Node Type"] in ("Bitmap Heap Scan", "Index Scan")
    # Whether the index wins also depends on row width and cost settings;
    # the guess of how much of the table is new is what decides it as the
    # table grows: a third of it tips into a sequential scan.
    assert scan["Plan Rows"] < 0.02 * _GROWN_ROWS


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)
