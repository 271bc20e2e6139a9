"""
schema.sql: idempotent, non-destructive on an application's existing seed
table, shipped inside the package, safe for any row size and transaction
size, and checked by ``Database.schema_problems()``.

Everything runs against a real PostgreSQL; the daemon halves use real
WebSocket clients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

import notifyd
from notifyd.db import Database, schema_sql

from .conftest import insert

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLE = "t_message_real_time"
SEED_ROWS = 5000

# The seed entity's table exactly as a Java/JPA application created it.
SEED_DDL = """
CREATE TABLE t_message_real_time (
    id        varchar(64) PRIMARY KEY,
    title     varchar(255),
    send_user varchar(64),
    to_user   varchar(64),
    type      varchar(16),
    content   text,
    send_time timestamp,
    skip_url  varchar(255),
    is_read   char(1)
)
"""

SEED_COLUMNS = (
    "id", "title", "send_user", "to_user", "type", "content", "send_time", "skip_url", "is_read",
)  # fmt: skip

# 5,000 rows, every one different in every column (NULLs and non-ASCII too).
SEED_FILL = f"""
INSERT INTO t_message_real_time ({", ".join(SEED_COLUMNS)})
SELECT
    'legacy-' || lpad(g::text, 6, '0'),
    CASE WHEN g % 97 = 0 THEN NULL ELSE '标题 ' || g || ' 🔔' END,
    'sender-' || (g % 13),
    'user-' || (g % 251),
    CASE g % 3 WHEN 0 THEN 'system' WHEN 1 THEN 'chat' ELSE NULL END,
    CASE WHEN g % 89 = 0 THEN NULL ELSE repeat(md5(g::text), 1 + g % 7) END,
    timestamp '2020-01-01 08:00:00' + g * interval '1 minute 7.123456 seconds',
    CASE WHEN g % 5 = 0 THEN NULL ELSE '/inbox/' || g END,
    CASE WHEN g % 2 = 0 THEN '1' ELSE '0' END
FROM generate_series(1, {SEED_ROWS}) AS g
"""

# Every seed column of every row, in a fixed order, as text.
SEED_DUMP = f"""
SELECT count(*) AS rows,
       md5(string_agg(
           concat_ws('|', {", ".join(f"coalesce({c}::text, '<null>')" for c in SEED_COLUMNS)}),
           E'\\n' ORDER BY id)) AS digest
FROM {TABLE}
"""


async def catalog_fingerprint(connection: asyncpg.Connection) -> dict[str, Any]:
    """
    Everything schema.sql creates or alters, as comparable values.
    """
    columns = await connection.fetch(
        """
        SELECT column_name, ordinal_position, data_type, udt_name,
               character_maximum_length, column_default, is_nullable,
               is_identity, identity_generation, identity_start, identity_increment
        FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = $1
        ORDER BY ordinal_position
        """,
        TABLE,
    )
    indexes = await connection.fetch(
        "SELECT indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = current_schema() AND tablename = $1 ORDER BY indexname",
        TABLE,
    )
    triggers = await connection.fetch(
        "SELECT tgname, tgenabled, pg_get_triggerdef(oid) AS def FROM pg_trigger "
        "WHERE tgrelid = $1::regclass AND NOT tgisinternal ORDER BY tgname",
        TABLE,
    )
    functions = await connection.fetch(
        "SELECT p.proname, pg_get_functiondef(p.oid) AS def FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = current_schema() AND p.proname LIKE 'notifyd%' ORDER BY p.proname"
    )
    # Catches what the four lists above cannot: e.g. an extra (orphan)
    # identity sequence or constraint created by a re-run.
    relations = await connection.fetch(
        "SELECT c.relname, c.relkind FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() ORDER BY c.relname"
    )
    constraints = await connection.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint "
        "WHERE conrelid = $1::regclass ORDER BY conname",
        TABLE,
    )
    fingerprint = {
        "columns": [dict(r) for r in columns],
        "indexes": [dict(r) for r in indexes],
        "triggers": [dict(r) for r in triggers],
        "functions": [dict(r) for r in functions],
        "relations": [dict(r) for r in relations],
        "constraints": [dict(r) for r in constraints],
    }
    assert fingerprint["columns"] and fingerprint["triggers"] and fingerprint["functions"]
    return fingerprint


async def column_types(connection: asyncpg.Connection) -> dict[str, str]:
    """
    Column name -> format_type() of t_message_real_time.
    """
    rows = await connection.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type_name FROM pg_attribute "
        "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
        TABLE,
    )
    return {r["attname"]: r["type_name"] for r in rows}


async def apply_schema(dsn: str) -> None:
    """
    Run schema.sql on its own connection, as `psql -f schema.sql` would.
    """
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(schema_sql())
    finally:
        await connection.close()


async def test_applying_schema_twice_to_a_fresh_database_changes_nothing(empty_dsn):
    """A second run of schema.sql succeeds and leaves the catalog identical."""
    await apply_schema(empty_dsn)
    connection = await asyncpg.connect(empty_dsn)
    try:
        before = await catalog_fingerprint(connection)
        await apply_schema(empty_dsn)
        after = await catalog_fingerprint(connection)
    finally:
        await connection.close()
    assert after == before


async def test_schema_upgrades_an_existing_seed_table_without_touching_its_rows(empty_dsn):
    """On a Java-created seed table with 5,000 rows: rows and types kept, seq/xact_id added, re-run is a no-op."""
    connection = await asyncpg.connect(empty_dsn)
    try:
        await connection.execute(SEED_DDL)
        await connection.execute(SEED_FILL)
        types_before = await column_types(connection)
        dump_before = await connection.fetchrow(SEED_DUMP)
        assert dump_before["rows"] == SEED_ROWS
        distinct = await connection.fetchval(
            f"SELECT count(DISTINCT ({', '.join(SEED_COLUMNS)})) FROM {TABLE}"
        )
        assert distinct == SEED_ROWS

        await apply_schema(empty_dsn)

        assert await connection.fetchrow(SEED_DUMP) == dump_before
        types_after = await column_types(connection)
        assert {c: types_after[c] for c in SEED_COLUMNS} == types_before
        assert types_after["send_time"] == "timestamp without time zone"
        assert types_after["seq"] == "bigint"
        assert types_after["xact_id"] == "xid8"
        assert (
            await connection.fetchval(
                f"SELECT count(*) FROM {TABLE} WHERE seq IS NULL OR xact_id IS NULL"
            )
            == 0
        )
        assert await connection.fetchval(f"SELECT count(DISTINCT seq) FROM {TABLE}") == SEED_ROWS

        fingerprint = await catalog_fingerprint(connection)
        await apply_schema(empty_dsn)
        assert await catalog_fingerprint(connection) == fingerprint
        assert await connection.fetchrow(SEED_DUMP) == dump_before
    finally:
        await connection.close()


async def test_daemon_on_an_upgraded_seed_table_delivers_default_id_row_with_naive_send_time(
    empty_dsn, start_daemon, open_client
):
    """After upgrading a seed table, a row inserted without id is pushed; sendTime has no UTC offset."""
    connection = await asyncpg.connect(empty_dsn)
    try:
        await connection.execute(SEED_DDL)
        await connection.execute(SEED_FILL)
        await apply_schema(empty_dsn)
        daemon = await start_daemon(dsn=empty_dsn)
        client = await open_client(daemon.url("alice"))
        message_id = await insert(connection, "alice", "after-upgrade", "body")
    finally:
        await connection.close()
    assert message_id and not message_id.startswith("legacy-")
    frame = (await client.messages_until("after-upgrade"))[-1]
    assert frame["id"] == message_id
    assert frame["content"] == "body"
    assert frame["isRead"] == "0"
    send_time = frame["sendTime"]
    assert "T" in send_time
    assert not send_time.endswith("Z")
    assert "+" not in send_time and send_time.count("-") == 2, send_time


async def test_daemon_on_the_fresh_schema_sends_send_time_with_utc_offset(db, daemon, open_client):
    """On the fresh schema (timestamptz) the frame's sendTime ends with +00:00."""
    client = await open_client(daemon.url("alice"))
    await insert(db, "alice", "fresh")
    frame = (await client.messages_until("fresh"))[-1]
    assert frame["sendTime"].endswith("+00:00") and "T" in frame["sendTime"]


def test_top_level_schema_sql_is_the_packaged_one_and_schema_sql_returns_it():
    """schema.sql at the top level and notifyd/schema.sql are identical, and schema_sql() returns that text."""
    top_level = (REPO_ROOT / "schema.sql").read_text("utf-8")
    packaged = (Path(notifyd.__file__).resolve().parent / "schema.sql").read_text("utf-8")
    assert top_level == packaged
    assert "t_message_real_time" in packaged
    assert schema_sql() == packaged


async def test_huge_content_inserts_succeed_despite_the_notify_payload_limit(db):
    """INSERTs of 9,000-byte and 1 MB content succeed: the trigger never hits NOTIFY's 8000-byte limit."""
    for size in (9000, 2**20):
        content = ("abcdefgh" * (size // 8 + 1))[:size]
        message_id = await insert(db, "alice", f"big-{size}", content)
        stored = await db.fetchval(
            f"SELECT octet_length(content) FROM {TABLE} WHERE id = $1", message_id
        )
        assert stored == size


async def test_one_transaction_of_twenty_thousand_single_row_inserts_commits(db):
    """20,000 INSERT statements in one transaction (20,000 trigger NOTIFYs) commit fine."""
    await db.execute(f"DELETE FROM {TABLE}")
    async with db.transaction():
        for i in range(20_000):
            await db.execute(
                f"INSERT INTO {TABLE} (to_user, title) VALUES ($1, $2)", "alice", f"row-{i}"
            )
    assert await db.fetchval(f"SELECT count(*) FROM {TABLE}") == 20_000
    assert await db.fetchval(f"SELECT count(DISTINCT xact_id) FROM {TABLE}") == 1


async def test_schema_problems_is_empty_on_the_fresh_schema(dsn):
    """schema_problems() reports nothing on a database with schema.sql applied."""
    database = await Database.connect(dsn)
    try:
        assert await database.schema_problems() == []
    finally:
        await database.close()


async def test_schema_problems_names_the_missing_table(empty_dsn):
    """schema_problems() on a database without the schema names t_message_real_time as missing."""
    database = await Database.connect(empty_dsn)
    try:
        problems = await database.schema_problems()
    finally:
        await database.close()
    assert len(problems) == 1
    assert TABLE in problems[0] and "does not exist" in problems[0]


async def test_schema_problems_names_the_disabled_trigger(dsn, db):
    """schema_problems() names notifyd_wake_on_insert once the trigger is disabled."""
    await db.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER notifyd_wake_on_insert")
    database = await Database.connect(dsn)
    try:
        problems = await database.schema_problems()
    finally:
        await database.close()
    assert len(problems) == 1
    assert "notifyd_wake_on_insert" in problems[0] and "disabled" in problems[0]


async def test_schema_problems_names_a_missing_lease_sequence(dsn, db):
    """Without notifyd_poll_lease (a schema from before it), the one problem says init-db."""
    await db.execute("DROP SEQUENCE notifyd_poll_lease")
    database = await Database.connect(dsn)
    try:
        problems = await database.schema_problems()
    finally:
        await database.close()
    assert problems == ["sequence notifyd_poll_lease does not exist: run `notifyd init-db`"]


async def test_applying_schema_again_keeps_a_lease_in_force(dsn, db):
    """Re-running schema.sql (an upgrade while notifyd polls) leaves the lease's end alone."""
    until = await db.fetchval("SELECT setval('notifyd_poll_lease', 4102444800000)")
    await apply_schema(dsn)
    assert await db.fetchval("SELECT last_value FROM notifyd_poll_lease") == until
