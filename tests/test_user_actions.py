"""
The user-side actions of a message center: ``unread`` (mark messages unread
again) and ``delete`` (remove them from this user's inbox), answered like
``read``: by events to every session of the user, this one included.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from .conftest import TIMEOUT, insert


async def next_event(client: Any, event: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        frame = await client.recv(max(0.01, deadline - time.monotonic()))
        if frame["event"] == event:
            return frame


async def frames_until(client: Any, event: str) -> list[str]:
    """
    The events of the frames up to and including the next one of ``event``.
    """
    events = []
    while (frame := await client.recv())["event"] != event:
        events.append(frame["event"])
    return [*events, event]


async def drain_until_pong(client: Any) -> list[dict[str, Any]]:
    """
    Every frame up to the answer to a ping (frames are answered in order:
    everything an earlier frame caused that is already routed comes first).
    """
    await client.send({"action": "ping"})
    frames = []
    while (frame := await client.recv())["event"] != "pong":
        frames.append(frame)
    return frames


async def test_unread_marks_own_messages_unread_again_on_every_session(daemon, open_client, db):
    """unread: a read event with isRead "0" and the new counts, on both tabs; the row is unread."""
    message = await insert(db, "alice", "m", type="comment", is_read="1")
    tab1 = await open_client(daemon.url("alice"))
    tab2 = await open_client(daemon.url("alice"))
    await tab1.send({"action": "unread", "ids": [message]})
    for tab in (tab1, tab2):
        read = await next_event(tab, "read")
        assert (read["ids"], read["isRead"]) == ([message], "0")
        unread = await next_event(tab, "unread")
        assert (unread["count"], unread["byType"]) == (1, {"comment": 1})
    assert (
        await db.fetchval("SELECT is_read FROM t_message_real_time WHERE id = $1", message) == "0"
    )


async def test_unread_takes_back_an_announcements_receipt_for_this_user_only(
    daemon, open_client, db
):
    """unread on a read announcement: unread again for this user; another reader keeps it read."""
    notice = await insert(db, "*", "notice", type="system")
    alice = await open_client(daemon.url("alice"))
    bob = await open_client(daemon.url("bob"))
    for client in (alice, bob):
        await client.send({"action": "read", "ids": [notice]})
        assert (await next_event(client, "unread"))["count"] == 0
    await alice.send({"action": "unread", "ids": [notice]})
    read = await next_event(alice, "read")
    assert (read["ids"], read["isRead"]) == ([notice], "0")
    assert (await next_event(alice, "unread"))["byType"] == {"system": 1}
    assert await drain_until_pong(bob) == []
    readers = await db.fetch("SELECT user_id FROM t_message_receipt WHERE message_id = $1", notice)
    assert [row["user_id"] for row in readers] == ["bob"]


async def test_delete_hides_own_messages_from_inbox_history_replay_and_counts(
    daemon, open_client, db
):
    """
    delete: a deleted event and the new counts on every session; the message
    is gone from history, from a resume's replay and from the counts, and
    the row itself stays the application's.
    """
    keep = await insert(db, "alice", "keep", type="comment")
    tab1 = await open_client(daemon.url("alice"))
    tab2 = await open_client(daemon.url("alice"), hello=False)
    # A position from before the message that is then deleted.
    since = (await tab2.recv_event("hello"))["cursor"]
    gone = await insert(db, "alice", "gone", type="comment")
    for tab in (tab1, tab2):
        assert (await next_event(tab, "message"))["title"] == "gone"
        assert (await next_event(tab, "unread"))["byType"] == {"comment": 2}
    await tab1.send({"action": "delete", "ids": [gone]})
    for tab in (tab1, tab2):
        # A deleted event and the counts; no read event, though it is now read.
        assert await frames_until(tab, "unread") == ["deleted", "unread"]
        assert tab.frames[-2]["ids"] == [gone]
        assert tab.frames[-1]["byType"] == {"comment": 1}
    await tab1.send({"action": "history", "limit": 10, "id": "h"})
    history = await next_event(tab1, "history")
    assert [m["id"] for m in history["messages"]] == [keep]
    # A session resuming from before the message does not replay it.
    fresh = await open_client(daemon.url("alice", since=since), hello=False)
    hello = await fresh.recv_event("hello")
    assert hello["unreadByType"] == {"comment": 1}
    assert [f for f in await drain_until_pong(fresh) if f["event"] == "message"] == []
    assert await db.fetchval("SELECT count(*) FROM t_message_real_time WHERE id = $1", gone) == 1


async def test_delete_hides_an_announcement_for_this_user_only(daemon, open_client, db):
    """delete on an announcement: gone for this user (events, history, counts), still there for others."""
    notice = await insert(db, "*", "notice", type="system")
    alice = await open_client(daemon.url("alice"))
    bob = await open_client(daemon.url("bob"))
    await alice.send({"action": "delete", "ids": [notice]})
    assert await frames_until(alice, "unread") == ["deleted", "unread"]
    assert alice.frames[-2]["ids"] == [notice]
    assert alice.frames[-1]["byType"] == {}
    assert await drain_until_pong(bob) == []
    await bob.send({"action": "history", "limit": 10, "id": "h"})
    assert [m["id"] for m in (await next_event(bob, "history"))["messages"]] == [notice]
    await alice.send({"action": "history", "limit": 10, "id": "h"})
    assert (await next_event(alice, "history"))["messages"] == []
    again = await open_client(daemon.url("alice"), hello=False)
    assert (await again.recv_event("hello"))["unread"] == 0


async def test_other_users_ids_unknown_ids_and_hostile_strings_change_nothing(
    daemon, open_client, db
):
    """unread and delete with another user's id, an unknown id or odd strings: nothing changes, nothing is answered."""
    bobs = await insert(db, "bob", "bobs", is_read="1")
    alice = await open_client(daemon.url("alice"))
    bob = await open_client(daemon.url("bob"))
    for action in ("unread", "delete"):
        await alice.send({"action": action, "ids": [bobs, "no-such-id", "'; DROP TABLE x; --"]})
    assert await drain_until_pong(alice) == []
    # Whatever those actions committed is routed before a later message: up
    # to bob's next message, neither session gets anything else.
    await insert(db, "bob", "sentinel")
    await insert(db, "alice", "sentinel")
    for client in (alice, bob):
        assert await frames_until(client, "message") == ["message"]
        assert client.frames[-1]["title"] == "sentinel"
    row = await db.fetchrow("SELECT is_read FROM t_message_real_time WHERE id = $1", bobs)
    assert row is not None and row["is_read"] == "1"
    assert await db.fetchval("SELECT count(*) FROM t_message_hidden") == 0


async def test_unread_and_delete_keep_the_read_limits(daemon, open_client):
    """The ids limits of read apply: too many ids or a bad shape is an error, the session stays."""
    client = await open_client(daemon.url("alice"))
    for action in ("unread", "delete"):
        await client.send({"action": action, "ids": [], "id": "x"})
        error = await next_event(client, "error")
        assert (error["code"], error.get("id")) == ("invalid", "x")
        await client.send({"action": action, "ids": ["a"] * 5000})
        assert (await next_event(client, "error"))["code"] == "invalid"
    await client.send({"action": "ping"})
    assert (await next_event(client, "pong"))["event"] == "pong"


async def test_the_daemon_role_may_hide_and_unread_but_still_not_delete_rows(
    db: asyncpg.Connection, login_role
):
    """The least-privilege role gains hiding and taking back receipts, never deleting messages."""
    await db.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'notifyd_daemon')"
        " THEN CREATE ROLE notifyd_daemon NOLOGIN; END IF; END $$"
    )
    from notifyd.db import role_sql

    await db.execute(role_sql())
    dsn = await login_role("IN ROLE notifyd_daemon")
    connection = await asyncpg.connect(dsn)
    try:
        assert await connection.fetchval("SELECT has_table_privilege('t_message_hidden', 'INSERT')")
        assert await connection.fetchval(
            "SELECT has_table_privilege('t_message_receipt', 'DELETE')"
        )
        assert not await connection.fetchval(
            "SELECT has_table_privilege('t_message_real_time', 'DELETE')"
        )
    finally:
        await connection.close()
