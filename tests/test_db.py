"""
The query pool against a real PostgreSQL: how its statements are planned,
and that its failures all arrive as DatabaseError.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from notifyd.cursor import Cursor, Snapshot
from notifyd.db import DATABASE_ERRORS, Database
from notifyd.dispatch import _FILL, _START
from notifyd.exceptions import DatabaseError
from notifyd.queries import WINDOW_LEAN

from .conftest import TIMEOUT
from .pgproxy import forwarding_proxy


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
        async with database.window_pool.acquire() as connection:
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
        "EXPLAIN (FORMAT JSON) " + WINDOW_LEAN,
        base.to_pg(),
        [str(x) for x in base.xip],
        1000,
        datetime.now(UTC),
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
    scans = [
        node
        for node in _plan_nodes(json.loads(plan)[0]["Plan"])
        if node.get("Relation Name") == "t_message_real_time"
    ]
    # The window's rows by xact_id; the window read's probe for the next
    # expire_at, when there is one, reads the expire_at index only.
    [scan] = [node for node in scans if node.get("Index Name") != "t_message_real_time_expire_at"]
    assert len(scans) <= 2
    assert all(node["Node Type"] == "Index Only Scan" for node in scans if node is not scan)
    assert scan["Node Type"] in ("Bitmap Heap Scan", "Index Scan")
    # Whether the index wins also depends on row width and cost settings;
    # the guess of how much of the table is new is what decides it as the
    # table grows: a third of it tips into a sequential scan.
    assert scan["Plan Rows"] < 0.02 * _GROWN_ROWS


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)


def _every_public_call(base: Snapshot) -> dict[str, Callable[[Database], Awaitable[object]]]:
    """
    One call of each public :class:`Database` method, by name.
    """

    async def window_rest(database: Database) -> object:
        async with contextlib.aclosing(
            database.window_rest(base, base, after_seq=0, pages=itertools.repeat(10))
        ) as pages:
            return [page async for page in pages]

    return {
        "snapshot": lambda database: database.snapshot(),
        "snapshot_and_clock": lambda database: database.snapshot_and_clock(),
        "window": lambda database: database.window(base, limit=10),
        "window_rest": window_rest,
        "catch_up": lambda database: database.catch_up([("alice", Cursor(base))], base, limit=10),
        "mark_read": lambda database: database.mark_read("alice", ["1"]),
        "mark_unread": lambda database: database.mark_unread("alice", ["1"]),
        "hide": lambda database: database.hide("alice", ["1"]),
        "mark_all_read": lambda database: database.mark_all_read("alice", None),
        "history": lambda database: database.history(
            "alice", before_seq=None, limit=10, type=None, unread_only=False
        ),
        "prune_events": lambda database: database.prune_events(60.0),
        "set_lease": lambda database: database.set_lease(1000),
        "announce_lease": lambda database: database.announce_lease(),
        "next_xact_id": lambda database: database.next_xact_id(),
        "notify_lock_queue": lambda database: database.notify_lock_queue(),
        "notify": lambda database: database.notify("probe:x"),
        "insert_message": lambda database: database.insert_message(
            to_user="alice", title="t", content="c"
        ),
        "apply_schema": lambda database: database.apply_schema(),
        "schema_problems": lambda database: database.schema_problems(),
        "fetchval": lambda database: database.fetchval("SELECT 1"),
        "revocation_arity": lambda database: database.revocation_arity("SELECT $1::text = ''"),
        "session_allowed": lambda database: database.session_allowed(
            "SELECT $1::text = ''", 1, "alice", {}
        ),
    }


def test_the_call_table_covers_every_public_database_method():
    """
    A method added to Database without a row in the table would escape the
    two tests after this one. close() is left out: it never raises; so is
    read_replica_problem(), which answers what it found instead of raising,
    and own_connection(), which opens a session outside the pool (an
    OwnConnection, whose failures to connect are DatabaseError as well).
    """
    public = {
        name
        for name, member in vars(Database).items()
        if not name.startswith("_")
        and (inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member))
    }
    assert public - {"close", "read_replica_problem", "own_connection"} == set(
        _every_public_call(Snapshot(1, 1))
    )


async def test_every_public_method_of_a_closed_pool_raises_database_error(dsn):
    """Callers only ever catch DatabaseError: asyncpg's "pool is closed" arrives as one."""
    database = await Database.connect(dsn, size=1)
    base = await database.snapshot()
    await database.close()
    for name, call in _every_public_call(base).items():
        with pytest.raises(DatabaseError) as raised:
            await call(database)
        assert isinstance(raised.value.__cause__, asyncpg.InterfaceError), name


async def test_every_public_method_raises_database_error_once_postgres_is_gone(dsn):
    """
    The pool's connections cut and the server's port refusing new ones (a
    stopped PostgreSQL): each public method raises DatabaseError, whose one
    line says what failed.
    """
    async with forwarding_proxy(dsn) as url:
        database = await Database.connect(url, size=1)
        base = await database.snapshot()
    try:
        for name, call in _every_public_call(base).items():
            with pytest.raises(DatabaseError) as raised:
                await call(database)
            assert "\n" not in str(raised.value), name
            assert isinstance(raised.value.__cause__, DATABASE_ERRORS), name
    finally:
        await database.close()


async def test_connecting_to_a_stopped_postgres_raises_database_error(dsn):
    """Nothing listening where the DSN points: DatabaseError in one line, not OSError."""
    async with forwarding_proxy(dsn) as url:
        pass
    with pytest.raises(DatabaseError, match=r"^cannot connect to the database: "):
        await Database.connect(url, size=1)


async def test_the_daemons_backends_are_named_for_what_they_do_unless_the_dsn_names_them(
    dsn, db, start_daemon
):
    """
    pg_stat_activity tells notifyd's connections apart (its pool, its window
    reads, its LISTEN); an application_name in the DSN is left as given.
    """
    await start_daemon()

    async def names() -> set[str]:
        rows = await db.fetch("SELECT application_name FROM pg_stat_activity")
        return {row["application_name"] for row in rows}

    wanted = {"notifyd", "notifyd window reads", "notifyd listen"}
    deadline = time.monotonic() + TIMEOUT  # the LISTEN connection opens after the daemon starts
    while not wanted <= (seen := await names()):
        assert time.monotonic() < deadline, f"not all named: {wanted - seen}"
        await asyncio.sleep(0.01)
    own = await Database.connect(f"{dsn}{'&' if '?' in dsn else '?'}application_name=shop")
    try:
        assert "shop" in await names()
    finally:
        await own.close()
