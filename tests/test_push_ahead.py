"""
Rows pushed from their NOTIFY's payload, ahead of the window read that
confirms them: a real daemon, real sessions, the application's own
transactions. Window reads are held by a lock on the event table (every
window statement reads it) where a test must show that a row came without
one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import asyncpg

from notifyd.cursor import MAX_CLAIMS, Cursor

from .conftest import Client, insert
from .receiver import until, until_async
from .test_inline_counts import blocked_window_reads, frames_until_title, inline_url


@asynccontextmanager
async def windows_held(dsn: str, db: asyncpg.Connection) -> AsyncIterator[None]:
    """
    No window read completes inside: the event table is locked.
    """
    locker = await asyncpg.connect(dsn)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE t_message_event IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await locker.close()


async def titles_until(client: Client, title: str) -> list[str]:
    return [
        f"{frame['event']}:{frame.get('title', '')}"
        for frame in await frames_until_title(client, title)
        if frame["event"] != "pong"
    ]


async def test_a_small_insert_reaches_its_session_while_every_window_read_is_held(
    daemon, open_client, db, dsn
):
    """
    The row comes from the NOTIFY's payload, with its counts, while the
    window read it woke waits for a lock; once that read goes through it
    sends nothing again.
    """
    client = await open_client(inline_url(daemon, "alice"))
    async with windows_held(dsn, db):
        await insert(db, "alice", "ahead", type="comment")
        message = await client.recv()
        assert (message["title"], message["unread"], message["unreadByType"]) == (
            "ahead",
            1,
            {"comment": 1},
        )
        # The window read its NOTIFY woke is still waiting for the lock.
        await until_async(lambda: blocked_window_reads(db), what="a held window read")
        assert "_a" in message["cursor"]
    await insert(db, "alice", "sentinel", type="comment")
    assert await titles_until(client, "sentinel") == ["message:sentinel"]
    assert daemon.daemon.stats.pushed_ahead == 2


async def test_with_push_ahead_off_a_row_waits_for_its_window(start_daemon, open_client, db, dsn):
    daemon = await start_daemon(push_ahead=False)
    client = await open_client(inline_url(daemon, "alice"))
    async with windows_held(dsn, db):
        await insert(db, "alice", "held")
        await until_async(lambda: blocked_window_reads(db), what="a held window read")
        # The probe of the held read; nothing else may come meanwhile.
        await client.send({"action": "ping"})
        assert (await client.recv())["event"] == "pong"
    assert await titles_until(client, "held") == ["message:held"]
    assert daemon.daemon.stats.pushed_ahead == 0


async def test_a_row_its_own_transaction_deletes_is_never_pushed(daemon, open_client, db):
    """
    The payload says what the row was when its statement ended; the same
    transaction's later delete is known before anything is pushed.
    """
    client = await open_client(inline_url(daemon, "alice"))
    async with db.transaction():
        gone = await insert(db, "alice", "phantom")
        await db.execute("DELETE FROM t_message_real_time WHERE id = $1", gone)
    await insert(db, "alice", "sentinel")
    events = await titles_until(client, "sentinel")
    assert "message:phantom" not in events
    assert "message:sentinel" in events


async def test_a_row_its_own_transaction_marks_read_arrives_read(daemon, open_client, db):
    client = await open_client(inline_url(daemon, "alice"))
    async with db.transaction():
        seen = await insert(db, "alice", "seen-at-once", type="comment")
        await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", seen)
    frames = await frames_until_title(client, "seen-at-once")
    message = next(frame for frame in frames if frame["event"] == "message")
    # Sent by its window, read, with no count to add.
    assert message["isRead"] == "1"
    assert [frame for frame in frames if frame["event"] == "unread"] == []


async def test_a_later_commit_never_overtakes_an_earlier_one_that_waits_for_its_window(
    daemon, open_client, db, dsn
):
    """
    Twelve rows in one statement are too many to carry: they wait for their
    window, and a single row committed after them waits behind them.
    """
    client = await open_client(daemon.url("alice"))
    async with windows_held(dsn, db):
        await db.execute(
            "INSERT INTO t_message_real_time (to_user, title) "
            "SELECT 'alice', 'bulk-' || lpad(i::text, 2, '0') FROM generate_series(1, 12) AS i"
        )
        await insert(db, "alice", "after")
        await until_async(lambda: blocked_window_reads(db), what="a held window read")
    messages = [event for event in await titles_until(client, "after") if event.startswith("m")]
    assert messages == [f"message:bulk-{i:02d}" for i in range(1, 13)] + ["message:after"]


async def test_rows_of_a_transactions_later_statements_come_with_its_window_in_order(
    daemon, open_client, db, dsn
):
    """
    A transaction's first statement carries its row; its second does not
    (the first's would be claimed without having been pushed), so the
    whole transaction, and every commit after it, comes with the window,
    in order.
    """
    client = await open_client(daemon.url("alice"))
    async with windows_held(dsn, db):
        async with db.transaction():
            await insert(db, "alice", "first-statement")
            await insert(db, "alice", "second-statement")
        await insert(db, "alice", "next-commit")
        await until_async(lambda: blocked_window_reads(db), what="a held window read")
        await client.send({"action": "ping"})
        assert (await client.recv())["event"] == "pong"
    events = [e for e in await titles_until(client, "next-commit") if e.startswith("message")]
    assert events == ["message:first-statement", "message:second-statement", "message:next-commit"]
    assert daemon.daemon.stats.pushed_ahead == 0


async def test_a_client_resuming_from_a_pushed_ahead_cursor_misses_nothing_and_gets_nothing_twice(
    daemon, open_client, db, dsn
):
    """
    Two rows pushed ahead (two claims in the cursor), the session dropped
    before any window read them, a third committed meanwhile: the resumed
    session is replayed the third only.
    """
    first = await open_client(daemon.url("alice"))
    async with windows_held(dsn, db):
        await insert(db, "alice", "one")
        await insert(db, "alice", "two")
        got = [await first.recv() for _ in range(4)]  # message, unread, message, unread
        assert [frame.get("title") for frame in got if frame["event"] == "message"] == [
            "one",
            "two",
        ]
        cursor = got[2]["cursor"]
        assert len(Cursor.decode(cursor).ahead) == 2
        await first.drop()
        await insert(db, "alice", "three")
    resumed = await open_client(daemon.url("alice", since=quote(cursor)), hello=False)
    hello = await resumed.recv_event("hello")
    assert hello["recovered"] is True
    await insert(db, "alice", "sentinel")
    replayed = [
        frame["title"]
        for frame in await frames_until_title(resumed, "sentinel")
        if frame["event"] == "message"
    ]
    assert replayed == ["three", "sentinel"]


async def test_a_multi_row_insert_to_several_users_is_pushed_to_each_once(daemon, open_client, db):
    clients: dict[str, Client] = {
        user: await open_client(inline_url(daemon, user)) for user in ("alice", "bob", "carol")
    }
    await db.execute(
        "INSERT INTO t_message_real_time (to_user, title) "
        "VALUES ('alice', 'a1'), ('bob', 'b1'), ('alice', 'a2'), ('carol', 'c1')"
    )
    await insert(db, "alice", "sentinel")
    await insert(db, "bob", "sentinel")
    await insert(db, "carol", "sentinel")
    got: dict[str, list[Any]] = {}
    for user, client in clients.items():
        got[user] = [e for e in await titles_until(client, "sentinel") if e.startswith("message")]
    assert got == {
        "alice": ["message:a1", "message:a2", "message:sentinel"],
        "bob": ["message:b1", "message:sentinel"],
        "carol": ["message:c1", "message:sentinel"],
    }


async def test_a_session_holds_at_most_the_claims_a_cursor_may_carry(daemon, open_client, db, dsn):
    """
    Seventy commits to one user while windows are held: the first
    MAX_CLAIMS are pushed ahead (the last one's cursor, claiming them all,
    still decodes), the rest wait for their window; all arrive once, in
    order.
    """
    client = await open_client(inline_url(daemon, "alice"))
    async with windows_held(dsn, db):
        for n in range(70):
            await insert(db, "alice", f"n{n:02d}")
        ahead = [await client.recv() for _ in range(MAX_CLAIMS)]
        assert [frame["title"] for frame in ahead] == [f"n{n:02d}" for n in range(MAX_CLAIMS)]
        assert len(Cursor.decode(ahead[-1]["cursor"]).ahead) == MAX_CLAIMS
        await client.send({"action": "ping"})
        assert (await client.recv())["event"] == "pong"
    rest = [e for e in await titles_until(client, "n69") if e.startswith("message")]
    assert rest == [f"message:n{n:02d}" for n in range(MAX_CLAIMS, 70)]


async def test_the_counts_a_pushed_row_showed_are_let_go_once_its_window_has_settled(
    daemon, open_client, db, dsn
):
    """
    The router keeps what a row pushed ahead showed its user only until the
    window that routes that row: kept longer, every later window would look
    again at every user ever pushed to.
    """
    clients = {user: await open_client(inline_url(daemon, user)) for user in ("alice", "bob")}
    router = daemon.daemon.delivery.router
    async with windows_held(dsn, db):
        for user, client in clients.items():
            await insert(db, user, f"to {user}", type="comment")
            assert (await client.recv())["unread"] == 1
        assert router.carried_users == 2
    await until(lambda: router.carried_users == 0, what="the pushed rows' window settled")
    assert daemon.daemon.stats.pushed_ahead == 2
