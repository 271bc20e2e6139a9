"""
How delivery's window reads are planned against a real PostgreSQL: one
reused plan per statement once the message table has statistics that make
its generic plan an index read, a plan per read before that.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from notifyd.db import Database, index_bounded
from notifyd.queries import EVENTS, TABLE, WINDOW_LEAN

from .conftest import TIMEOUT

_ROWS = 20_000


async def test_window_reads_reuse_an_index_plan_once_the_table_is_analyzed(dsn, db):
    """
    After ANALYZE of a grown table, the window read's plan is decided to be
    reused, Postgres runs it as a generic plan (counted in
    pg_prepared_statements), that plan reaches the table through an index
    range, and the reads still return exactly the new rows.
    """
    await _grow(db, _ROWS)
    await db.execute(f"ANALYZE {TABLE}")
    await db.execute(f"ANALYZE {EVENTS}")
    database = await Database.connect(dsn, size=2)
    try:
        assert await database.window_plans.check() is True
        base = await database.snapshot()
        for _ in range(8):
            assert (await database.window(base, limit=100)).rows == []
        await _grow(db, 150)
        window = await database.window(base, limit=100)
        assert [row["to_user"] for row in window.rows] == [f"u{g}" for g in range(1, 101)]
        counts, plan = await _lean_plan_counts_and_explain(database, base)
    finally:
        await database.close()
    # The first read of each connection may be custom planned; all the
    # others reused the generic plan.
    assert counts["generic_plans"] >= 7
    assert counts["custom_plans"] <= 2
    assert index_bounded(plan, (TABLE,))
    assert "t_message_real_time_xact" in _index_names(plan)


async def test_window_reads_plan_every_read_of_a_table_never_analyzed(dsn, db):
    """
    On a table that was never analyzed (a new deployment before autovacuum),
    the window reads keep planning every execution with its parameters,
    however many reads there are, and return the right rows as the table
    grows.
    """
    await db.execute(f"ALTER TABLE {TABLE} SET (autovacuum_enabled = false)")
    database = await Database.connect(dsn, size=2)
    try:
        assert await database.window_plans.check() is False
        base = await database.snapshot()
        for _ in range(10):
            assert (await database.window(base, limit=100)).rows == []
        await _grow(db, 2_000)
        assert await database.window_plans.check() is False
        window = await database.window(base, limit=100)
        assert [row["to_user"] for row in window.rows] == [f"u{g}" for g in range(1, 101)]
        counts, _ = await _lean_plan_counts_and_explain(database, base)
    finally:
        await database.close()
    assert counts["generic_plans"] == 0
    assert counts["custom_plans"] == 11


async def test_window_reads_go_back_to_planning_every_read_when_the_table_is_emptied(dsn, db):
    """
    A verdict is not kept for good: once the table is analyzed the reads
    reuse their plan, and after TRUNCATE (statistics gone with the rows)
    the next check goes back to planning every read, on new connections.
    """
    await _grow(db, _ROWS)
    await db.execute(f"ANALYZE {TABLE}")
    database = await Database.connect(dsn, size=2)
    try:
        assert await database.window_plans.check() is True
        base = await database.snapshot()
        assert (await database.window(base, limit=10)).rows == []
        async with database.window_pool.acquire() as connection:
            assert await connection.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
        await db.execute(f"TRUNCATE {TABLE}")
        assert await database.window_plans.check() is False
        async with database.window_pool.acquire() as connection:
            assert await connection.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    finally:
        await database.close()


def test_a_plan_that_walks_a_whole_index_is_not_index_bounded():
    """
    An index walked end to end with the window's condition as a filter (the
    seq order tempting a generic plan) counts as a full read, as does a
    sequential scan; index ranges and bitmaps do not.
    """
    ranged = {"Node Type": "Index Scan", "Relation Name": TABLE, "Index Cond": "(xact_id >= $1)"}
    walked = {"Node Type": "Index Scan", "Relation Name": TABLE, "Filter": "(xact_id >= $1)"}
    seq = {"Node Type": "Seq Scan", "Relation Name": TABLE}
    bitmap = {"Node Type": "Bitmap Heap Scan", "Relation Name": TABLE, "Plans": []}
    other = {"Node Type": "Seq Scan", "Relation Name": "t_message_poll_lease"}

    def limit(*children: dict[str, Any]) -> dict[str, Any]:
        return {"Node Type": "Limit", "Plans": list(children)}

    assert index_bounded(limit(ranged, bitmap, other), (TABLE,))
    assert not index_bounded(limit(ranged, walked), (TABLE,))
    assert not index_bounded(limit(seq), (TABLE,))


async def _lean_plan_counts_and_explain(
    database: Database, base: Any
) -> tuple[dict[str, int], dict[str, Any]]:
    """
    The lean window statement's plan counts summed over the window
    connections, and the plan one of them runs it with now.
    """
    counts = {"generic_plans": 0, "custom_plans": 0}
    plan: dict[str, Any] = {}
    seen: set[int] = set()
    async with database.window_pool.acquire() as first:
        async with database.window_pool.acquire() as second:
            for connection in (first, second):
                if connection.get_server_pid() in seen:
                    continue
                seen.add(connection.get_server_pid())
                for record in await connection.fetch(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                    "WHERE statement LIKE '%has_events%' AND statement NOT LIKE '%PREPARE%'"
                    "AND statement NOT LIKE '%pg_prepared_statements%'"
                ):
                    counts["generic_plans"] += record["generic_plans"]
                    counts["custom_plans"] += record["custom_plans"]
            async with first.transaction():
                await first.execute(f"PREPARE lean_now AS {WINDOW_LEAN}")
                explained = await first.fetchval(
                    f"EXPLAIN (FORMAT JSON) EXECUTE lean_now('{base.to_pg()}', '{{}}', 100, NULL)"
                )
                await first.execute("DEALLOCATE lean_now")
            plan = json.loads(explained)[0]["Plan"]
    return counts, plan


def _index_names(node: dict[str, Any]) -> set[str]:
    names = {node["Index Name"]} if "Index Name" in node else set()
    for child in node.get("Plans", ()):
        names |= _index_names(child)
    return names


async def _grow(db: asyncpg.Connection, rows: int) -> None:
    for start in range(0, rows, 10_000):
        await db.execute(
            f"INSERT INTO {TABLE} (to_user, title, content, type, send_user) "
            "SELECT 'u' || g, 't', 'c', 'x', 'w' FROM generate_series($1::int, $2::int) AS g",
            start + 1,
            min(rows, start + 10_000),
        )


async def test_window_reads_plan_every_read_of_a_table_analyzed_while_empty(dsn, db):
    """
    A table analyzed while empty, whose generic plan is a sequential scan
    (it would be kept, and walk the whole table, while the table grows with
    autovacuum off), keeps the window reads planning every execution, and
    they find exactly the rows inserted since.
    """
    await db.execute(f"ALTER TABLE {TABLE} SET (autovacuum_enabled = false)")
    await db.execute(f"ANALYZE {TABLE}")
    database = await Database.connect(dsn, size=2)
    try:
        assert await database.window_plans.check() is False
        base = await database.snapshot()
        for _ in range(10):
            assert (await database.window(base, limit=100)).rows == []
        await _grow(db, 500)
        window = await database.window(base, limit=100)
        assert [row["to_user"] for row in window.rows] == [f"u{g}" for g in range(1, 101)]
        counts, _ = await _lean_plan_counts_and_explain(database, base)
    finally:
        await database.close()
    assert counts["generic_plans"] == 0


async def test_a_window_read_does_not_wait_for_the_plan_check(dsn, db):
    """
    The check runs beside the reads, on the query pool: with that pool's
    only connection held, so that the check cannot start, a window read
    still returns its rows.
    """
    database = await Database.connect(dsn, size=1)
    try:
        base = await database.snapshot()
        async with database.pool.acquire():
            await db.execute(
                f"INSERT INTO {TABLE} (to_user, title, content) VALUES ('u', 'while held', 'c')"
            )
            window = await asyncio.wait_for(database.window(base, limit=10), TIMEOUT)
            assert [row["title"] for row in window.rows] == ["while held"]
        # Released: the check gets its connection and decides.
        assert await asyncio.wait_for(database.window_plans.check(), TIMEOUT) is False
    finally:
        await database.close()


async def test_after_a_one_transaction_backfill_is_analyzed_inserts_never_scan_the_table(dsn, db):
    """
    Most rows from one transaction, then ANALYZE: the insert trigger's look
    for earlier rows, once PL/pgSQL caches its plan, still goes by index,
    not through the whole table in every message-inserting statement.
    """
    await db.execute(
        f"INSERT INTO {TABLE} (to_user, title) "
        "SELECT 'earlier-' || (g % 1000), 'backfilled' FROM generate_series(1, 20000) AS g"
    )
    await db.execute(f"ANALYZE {TABLE}")

    async def seq_scans() -> int:
        return int(
            await db.fetchval(
                "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = $1::regclass", TABLE
            )
        )

    writer = await asyncpg.connect(dsn)
    try:
        before = await seq_scans()
        # Past the five custom plans after which PL/pgSQL may keep a generic one.
        for n in range(12):
            await writer.execute(f"INSERT INTO {TABLE} (to_user, title) VALUES ('alice', 'm{n}')")
        await writer.execute("SELECT pg_stat_force_next_flush()")
    finally:
        await writer.close()
    # A closing backend reports its counts: wait until it is gone.
    others = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while await db.fetchval(others) > 0:
        assert asyncio.get_running_loop().time() < deadline, "the writer's backend did not exit"
        await asyncio.sleep(0.01)
    await db.execute("SELECT pg_stat_clear_snapshot()")
    assert await seq_scans() == before
