"""
The bench's trigger-cost phase measures the insert trigger schema.sql ships,
on a copy of the message table.
"""

from __future__ import annotations

import asyncio

import asyncpg

from bench.phases.trigger import COPY_TABLE, insert_trigger_on
from notifyd.ahead import parse_payload

from .conftest import TIMEOUT


async def test_the_trigger_cost_copy_wakes_with_the_rows_it_inserted_as_the_shipped_trigger_does(
    db: asyncpg.Connection, dsn: str
) -> None:
    await db.execute(
        f"CREATE TABLE {COPY_TABLE} (LIKE t_message_real_time INCLUDING ALL); "
        + insert_trigger_on(COPY_TABLE)
    )
    on_copy = await db.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass "
        "AND tgname = 'notifyd_wake_on_insert'",
        COPY_TABLE,
    )
    assert on_copy == 1
    listener = await asyncpg.connect(dsn)
    payloads: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener("notifyd", lambda *args: payloads.put_nowait(args[3]))
        row_id = await db.fetchval(
            f"INSERT INTO {COPY_TABLE} (title, send_user, to_user, type, content) "
            "VALUES ('t', 'app', 'alice', 'system', 'c') RETURNING id"
        )
        payload = await asyncio.wait_for(payloads.get(), TIMEOUT)
    finally:
        await listener.close()
    carried = parse_payload(payload)
    assert carried is not None and carried.rows is not None
    assert [row["id"] for row in carried.rows] == [row_id]
