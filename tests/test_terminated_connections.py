"""
Pool connections that the server ends while they are idle (a failover's
shutdown, ``pg_terminate_backend``, ``idle_session_timeout``): the server's
FATAL error reaches asyncpg before the end of the stream does, and a
statement started in between must not fail on the dead connection ("cannot
switch to state 12; another operation (2) is in progress", as a failover
once logged it) but run on a live one.

The end of the stream is held back by a proxy (:func:`close_holding_proxy`)
so that the moment in between, a loop iteration on a real server, lasts as
long as the test needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
from collections.abc import AsyncIterator

import asyncpg

from notifyd.db import Database

from .conftest import TIMEOUT, insert
from .pgproxy import close_holding_proxy, reply_holding_proxy
from .receiver import until_async


@contextlib.asynccontextmanager
async def through_proxy(dsn: str) -> AsyncIterator[tuple[Database, asyncio.Event, asyncio.Event]]:
    async with close_holding_proxy(dsn) as (url, closed, let_close):
        database = await Database.connect(url, size=2)
        try:
            yield database, closed, let_close
        finally:
            let_close.set()
            await database.close()


def _unread_bytes(connection: asyncpg.Connection) -> int:
    sock = connection._transport.get_extra_info("socket")
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])


async def terminate_idle(
    database: Database, admin: asyncpg.Connection, closed: asyncio.Event
) -> None:
    """
    End the pool's one connection from the server, and wait until asyncpg
    has read the server's FATAL error (nothing left unread on its socket)
    while the end of the stream is still held back.
    """
    async with database.pool.acquire() as connection:
        pid = await connection.fetchval("SELECT pg_backend_pid()")
    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    await closed.wait()
    async with database.pool.acquire() as connection:
        raw = connection._con
        assert raw is not None and not raw.is_closed()

        async def drained() -> bool:
            return _unread_bytes(raw) == 0

        await until_async(drained, what="the FATAL error read by asyncpg")
        # asyncpg now holds it in its error state, and still counts it open.
        assert not raw.is_closed()


async def test_a_statement_after_the_server_ended_an_idle_connection_runs_on_a_live_one(dsn, db):
    """The server's FATAL read, its close not yet: the next read and write run on a new connection, not fail."""
    async with through_proxy(dsn) as (database, closed, _):
        # Prepared on that connection, so the next run is a bind-execute
        # (asyncpg's state 12, as in the failover's log).
        first = await database.snapshot()
        await terminate_idle(database, db, closed)
        assert (await database.snapshot()).xmax >= first.xmax

        message = await insert(db, "alice", "hello")
        closed.clear()
        await terminate_idle(database, db, closed)
        assert await database.mark_read("alice", [message]) == 1


async def test_a_transaction_after_the_server_ended_an_idle_connection_begins_on_a_live_one(
    dsn, db
):
    """The same for a transaction: its BEGIN finds the dead connection and it runs on a new one."""
    async with through_proxy(dsn) as (database, closed, _):
        message = await insert(db, "alice", "hello")
        await database.snapshot()
        await terminate_idle(database, db, closed)
        assert await database.hide("alice", [message]) == 1


async def test_a_statement_sent_after_an_idle_session_timeout_runs_again_on_a_live_connection(
    dsn,
):
    """idle_session_timeout ended the session, its FATAL still on the way when a statement went out: it runs on a new connection."""
    async with reply_holding_proxy(dsn) as (url, replies):
        database = await Database.connect(url, size=1)
        try:
            await database.fetchval("SELECT set_config('idle_session_timeout', '100', false)")
            replies.hold()
            # The server ends the idle session; its FATAL and close are held.
            await asyncio.wait_for(replies.server_closed.wait(), TIMEOUT)
            read = asyncio.create_task(database.snapshot())
            await asyncio.wait_for(replies.client_spoke.wait(), TIMEOUT)
            replies.release()
            assert (await read).xmax > 0
        finally:
            replies.release()
            await database.close()
