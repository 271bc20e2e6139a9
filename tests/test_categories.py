"""
Unread counts per category (a message's ``type``), pushed exactly: in hello
(``unreadByType``) and in every ``unread`` event (``byType``), for each path
that moves them, checked against a count taken from the table itself.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg

from .conftest import TIMEOUT, insert

# A user's unread counts by category, straight from the tables.
_TRUTH = """
SELECT coalesce(t, '') AS t, sum(n)::bigint AS n FROM (
    SELECT type::text AS t, count(*) AS n FROM t_message_real_time
    WHERE to_user = $1 AND is_read = '0' GROUP BY type
    UNION ALL
    SELECT a.type::text, count(*) FROM t_message_real_time AS a
    WHERE a.to_user = '*' AND NOT EXISTS (
        SELECT 1 FROM t_message_receipt AS r WHERE r.user_id = $1 AND r.message_id = a.id::text)
    GROUP BY a.type
) AS unread GROUP BY 1
"""


async def truth(db: asyncpg.Connection, user: str) -> dict[str, int]:
    return {row["t"]: row["n"] for row in await db.fetch(_TRUTH, user) if row["n"] > 0}


async def counts_reach_the_tables(client: Any, db: asyncpg.Connection, user: str) -> None:
    """
    Wait for the unread event whose counts are the tables' counts at the time
    it is read (an action sent by a session commits after the send returns,
    so the tables are asked again at each event); fail with what was seen.
    """
    deadline = time.monotonic() + TIMEOUT
    seen = []
    while time.monotonic() < deadline:
        try:
            frame = await client.recv(max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        if frame["event"] != "unread":
            continue
        seen.append(frame)
        want = await truth(db, user)
        if frame["byType"] == want:
            assert frame["count"] == sum(want.values()), frame
            return
    raise AssertionError(f"unread counts never became {await truth(db, user)}; seen {seen}")


async def test_hello_counts_every_category_including_announcements_and_null_types(
    daemon, open_client, db
):
    """hello.unreadByType: per type, a NULL type under "", announcements counted, read ones not."""
    await insert(db, "alice", "c1", type="comment")
    await insert(db, "alice", "c2", type="comment")
    await insert(db, "alice", "plain")
    await insert(db, "alice", "read", type="like", is_read="1")
    await insert(db, "bob", "not-hers", type="comment")
    await insert(db, "*", "notice", type="system")
    client = await open_client(daemon.url("alice"), hello=False)
    hello = await client.recv_event("hello")
    assert hello["unreadByType"] == {"comment": 2, "": 1, "system": 1}
    assert hello["unread"] == 4
    assert hello["unreadByType"] == await truth(db, "alice")


async def test_every_path_moves_the_categories_exactly_on_every_session(daemon, open_client, db):
    """
    New messages, read, read-all of one type, unread again, the app's delete,
    an announcement, its read and its recall each move the counts by category
    on both of the user's sessions to what the tables say.
    """
    tab1 = await open_client(daemon.url("alice"))
    tab2 = await open_client(daemon.url("alice"))
    tabs = (tab1, tab2)

    async def expect() -> None:
        for tab in tabs:
            await counts_reach_the_tables(tab, db, "alice")

    comment = await insert(db, "alice", "c", type="comment")
    await expect()
    like1 = await insert(db, "alice", "l1", type="like")
    await insert(db, "alice", "l2", type="like")
    await insert(db, "alice", "n")
    await expect()
    # read by id, from one session
    await tab1.send({"action": "read", "ids": [comment]})
    await expect()
    # read all of one type
    await tab2.send({"action": "read_all", "type": "like"})
    await expect()
    # unread again, by the app
    await db.execute("UPDATE t_message_real_time SET is_read = '0' WHERE id = $1", like1)
    await expect()
    # the app deletes an unread message
    await db.execute("DELETE FROM t_message_real_time WHERE id = $1", like1)
    await expect()
    # an announcement, then its read by this user, then its recall
    notice = await insert(db, "*", "notice", type="system")
    await expect()
    await tab1.send({"action": "read", "ids": [notice]})
    await expect()
    other = await insert(db, "*", "second", type="system")
    await expect()
    await db.execute("DELETE FROM t_message_real_time WHERE id = $1", other)
    await expect()
    assert await truth(db, "alice") == {"": 1}


async def test_counts_stay_exact_under_concurrent_writes_reads_and_deletes(
    daemon, open_client, db, dsn
):
    """
    Messages of five types from several app connections, reads from two
    sessions, the app's own updates and deletes, all at once: when it is
    over, each session's last counts are the table's.
    """
    tabs = [await open_client(daemon.url("alice")) for _ in range(2)]
    types = ["comment", "like", "follow", "private", None]
    rng = random.Random(7)
    ids: list[str] = []

    async def writer(seed: int) -> None:
        connection = await asyncpg.connect(dsn)
        try:
            for n in range(40):
                kind = types[(seed + n) % len(types)]
                ids.append(await insert(connection, "alice", f"w{seed}-{n}", type=kind))
                if n % 10 == 0:
                    await insert(connection, "*", f"a{seed}-{n}", type="system")
        finally:
            await connection.close()

    async def reader(tab: Any) -> None:
        for _ in range(20):
            if ids:
                await tab.send({"action": "read", "ids": rng.sample(ids, min(3, len(ids)))})
            await asyncio.sleep(0)
        # A session's frames are answered in order: the pong says every
        # read before it is committed.
        await tab.send({"action": "ping"})
        while (await tab.recv())["event"] != "pong":
            pass

    async def app() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            for _ in range(15):
                if len(ids) > 5:
                    victim = rng.choice(ids)
                    await connection.execute(
                        "UPDATE t_message_real_time SET is_read = '0' WHERE id = $1", victim
                    )
                    await connection.execute(
                        "DELETE FROM t_message_real_time WHERE id = $1", rng.choice(ids)
                    )
                await asyncio.sleep(0)
        finally:
            await connection.close()

    await asyncio.gather(writer(0), writer(1), writer(2), reader(tabs[0]), reader(tabs[1]), app())
    # Everything above is committed; one more message is routed after all
    # of it, and the unread event that follows it is each session's final
    # state.
    await insert(db, "alice", "last", type="comment")
    want = await truth(db, "alice")
    assert sum(want.values()) > 0
    for tab in tabs:
        while not ((frame := await tab.recv())["event"] == "message" and frame["title"] == "last"):
            pass
        while (final := await tab.recv())["event"] != "unread":
            pass
        assert (final["byType"], final["count"]) == (want, sum(want.values()))
