"""
ConnectionSet, the window reads' connections without asyncpg's pool: how
many it opens, when it waits, and which connections it never hands out
again. Against a real PostgreSQL.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from notifyd.db import ConnectionSet

from .conftest import TIMEOUT


class _Opener:
    """
    ``connect`` for a ConnectionSet, counting the connections it opened.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.opened: list[asyncpg.Connection] = []

    async def __call__(self) -> asyncpg.Connection:
        connection = await asyncpg.connect(self.dsn, timeout=TIMEOUT)
        self.opened.append(connection)
        return connection


async def test_an_idle_connection_is_handed_out_again_without_opening_another(dsn) -> None:
    opener = _Opener(dsn)
    connections = ConnectionSet(opener, size=2)
    try:
        for _ in range(5):
            async with connections.acquire() as connection:
                assert await connection.fetchval("SELECT 1") == 1
        assert len(opener.opened) == 1
    finally:
        await connections.close()
    assert opener.opened[0].is_closed()


async def test_at_most_size_are_open_and_a_caller_beyond_waits_for_one_given_back(dsn) -> None:
    opener = _Opener(dsn)
    connections = ConnectionSet(opener, size=2)
    try:
        first = await connections.take()
        second = await connections.take()
        third = asyncio.create_task(connections.take())
        await asyncio.sleep(0)
        assert not third.done()
        with pytest.raises(TimeoutError):
            await connections.take(timeout=0.05)
        connections.give(second)
        assert await asyncio.wait_for(third, TIMEOUT) is second
        assert len(opener.opened) == 2
        connections.give(first)
        connections.give(second)
    finally:
        await connections.close()


async def test_a_connection_given_back_after_a_failure_is_closed_not_reused(dsn) -> None:
    opener = _Opener(dsn)
    connections = ConnectionSet(opener, size=1)
    try:
        with pytest.raises(asyncpg.PostgresError):
            async with connections.acquire() as connection:
                await connection.fetchval("SELECT 1/0")
        assert connection.is_closed()
        async with connections.acquire() as again:
            assert again is not connection
            assert await again.fetchval("SELECT 2") == 2
        assert len(opener.opened) == 2
    finally:
        await connections.close()


async def test_an_idle_connection_found_closed_is_replaced_by_a_new_one(dsn) -> None:
    opener = _Opener(dsn)
    connections = ConnectionSet(opener, size=1)
    try:
        async with connections.acquire() as connection:
            pid = connection.get_server_pid()
        # As asyncpg leaves one whose server ended it while it was idle.
        connection.terminate()
        async with connections.acquire() as again:
            assert again.get_server_pid() != pid
            assert await again.fetchval("SELECT 1") == 1
        assert len(opener.opened) == 2
    finally:
        await connections.close()


async def test_renewing_replaces_idle_connections_now_and_busy_ones_when_given_back(dsn) -> None:
    opener = _Opener(dsn)
    connections = ConnectionSet(opener, size=2)
    try:
        busy = await connections.take()
        idle = await connections.take()
        connections.give(idle)
        await connections.expire_connections()
        assert idle.is_closed() and not busy.is_closed()
        connections.give(busy)
        assert busy.is_closed()
        async with connections.acquire() as fresh:
            assert fresh not in (busy, idle)
    finally:
        await connections.close()


async def test_after_close_callers_get_interface_errors_and_busy_ones_are_closed_on_return(
    dsn,
) -> None:
    connections = ConnectionSet(_Opener(dsn), size=1)
    busy = await connections.take()
    waiting = asyncio.create_task(connections.take())
    await asyncio.sleep(0)
    await connections.close()
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        await asyncio.wait_for(waiting, TIMEOUT)
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        await connections.take()
    connections.give(busy)
    assert busy.is_closed()


async def test_a_waiter_cancelled_after_its_wake_up_passes_it_on(dsn) -> None:
    opener = _Opener(dsn)
    connections = ConnectionSet(opener, size=1)
    try:
        held = await connections.take()
        first = asyncio.create_task(connections.take())
        second = asyncio.create_task(connections.take())
        await asyncio.sleep(0)
        connections.give(held)  # wakes the first waiter...
        first.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await asyncio.wait_for(second, TIMEOUT) is held
        connections.give(held)
        assert len(opener.opened) == 1
    finally:
        await connections.close()
