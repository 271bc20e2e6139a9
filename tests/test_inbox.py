"""
The inbox: unread counts, read state synced across sessions, history,
announcements, recall and safe links.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, insert


async def _next(client, event: str) -> dict:
    """
    The next frame of the given event type, skipping others.
    """
    deadline = time.monotonic() + TIMEOUT
    while True:
        frame = await client.recv(max(0.0, deadline - time.monotonic()))
        if frame["event"] == event:
            return frame


async def _unread_becomes(client, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        frame = await _next(client, "unread")
        if frame["count"] == count:
            return
        assert time.monotonic() < deadline


async def test_hello_carries_the_unread_count_including_announcements(daemon, open_client, db):
    """hello.unread counts the user's unread messages and unread announcements."""
    await insert(db, "alice", "u1")
    await insert(db, "alice", "u2")
    await insert(db, "alice", "read", is_read="1")
    await insert(db, "bob", "not-hers")
    await insert(db, "*", "announcement")
    client = await open_client(daemon.url("alice"), hello=False)
    assert (await client.recv_event("hello"))["unread"] == 3


async def test_new_message_pushes_the_new_unread_count_to_every_session(daemon, open_client, db):
    """A new message is followed by unread:N on each of the user's sessions."""
    tab1 = await open_client(daemon.url("alice"))
    tab2 = await open_client(daemon.url("alice"))
    await insert(db, "alice", "one")
    for tab in (tab1, tab2):
        assert (await _next(tab, "message"))["title"] == "one"
        assert (await _next(tab, "unread"))["count"] == 1


async def test_read_in_one_tab_is_shown_in_the_other_and_not_to_another_user(
    daemon, open_client, db
):
    """read from tab 1 → both tabs get read ids then unread; bob sees nothing."""
    tab1 = await open_client(daemon.url("alice"))
    tab2 = await open_client(daemon.url("alice"))
    bob = await open_client(daemon.url("bob"))
    first = await insert(db, "alice", "first")
    await insert(db, "alice", "second")
    for tab in (tab1, tab2):
        await _unread_becomes(tab, 2)
    await tab1.send({"action": "read", "ids": [first]})
    for tab in (tab1, tab2):
        assert (await _next(tab, "read"))["ids"] == [first]
        assert (await _next(tab, "unread"))["count"] == 1
    assert await db.fetchval("SELECT is_read FROM t_message_real_time WHERE id = $1", first) == "1"
    await insert(db, "bob", "bob-sentinel")
    frames = await bob.messages_until("bob-sentinel")
    assert [f["title"] for f in frames] == ["bob-sentinel"]
    assert not [f for f in bob.frames if f["event"] == "read"]


async def test_read_all_marks_everything_and_says_all(daemon, open_client, db):
    """read_all → is_read='1' everywhere, {"event":"read","all":true}, unread 0."""
    client = await open_client(daemon.url("alice"))
    for i in range(5):
        await insert(db, "alice", f"m{i}")
    await _unread_becomes(client, 5)
    await client.send({"action": "read_all"})
    frame = await _next(client, "read")
    assert frame == {"event": "read", "all": True, "type": None}
    assert (await _next(client, "unread"))["count"] == 0
    assert (
        await db.fetchval(
            "SELECT count(*) FROM t_message_real_time WHERE to_user = 'alice' AND is_read = '0'"
        )
        == 0
    )


async def test_read_all_of_one_type_leaves_other_types_unread(daemon, open_client, db):
    """read_all with a type marks only that type."""
    client = await open_client(daemon.url("alice"))
    await insert(db, "alice", "s1", type="system")
    await insert(db, "alice", "s2", type="system")
    await insert(db, "alice", "c1", type="comment")
    await _unread_becomes(client, 3)
    await client.send({"action": "read_all", "type": "system"})
    assert await _next(client, "read") == {"event": "read", "all": True, "type": "system"}
    assert (await _next(client, "unread"))["count"] == 1


async def test_the_apps_own_update_and_delete_reach_every_session(daemon, open_client, db):
    """A plain UPDATE from the app's REST API and a DELETE (recall) are pushed with exact counts."""
    client = await open_client(daemon.url("alice"))
    keep = await insert(db, "alice", "keep")
    recalled = await insert(db, "alice", "recalled")
    await _unread_becomes(client, 2)
    await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", keep)
    assert (await _next(client, "read"))["ids"] == [keep]
    assert (await _next(client, "unread"))["count"] == 1
    await db.execute("UPDATE t_message_real_time SET is_read = '0' WHERE id = $1", keep)
    assert await _next(client, "read") == {"event": "read", "ids": [keep], "isRead": "0"}
    assert (await _next(client, "unread"))["count"] == 2
    await db.execute("DELETE FROM t_message_real_time WHERE id = $1", recalled)
    assert (await _next(client, "deleted"))["ids"] == [recalled]
    assert (await _next(client, "unread"))["count"] == 1


async def test_reading_another_users_message_changes_and_reveals_nothing(daemon, open_client, db):
    """ids of bob's message in alice's read: bob's row unchanged, alice gets no event about it."""
    alice = await open_client(daemon.url("alice"))
    bob = await open_client(daemon.url("bob"))
    bobs = await insert(db, "bob", "bobs")
    await _unread_becomes(bob, 1)
    await alice.send(
        {"action": "read", "ids": [bobs, "x' OR '1'='1", "'; DROP TABLE t_message_real_time; --"]}
    )
    await alice.send({"action": "ping"})
    assert (await _next(alice, "pong")) == {"event": "pong"}
    await insert(db, "alice", "alice-sentinel")
    await alice.messages_until("alice-sentinel")
    assert not [f for f in alice.frames if f["event"] == "read"]
    assert await db.fetchval("SELECT is_read FROM t_message_real_time WHERE id = $1", bobs) == "0"
    await insert(db, "bob", "bob-sentinel")
    await bob.messages_until("bob-sentinel")
    assert not [f for f in bob.frames if f["event"] == "read"]


async def test_read_with_too_many_or_bad_ids_is_an_error_and_the_session_stays(
    daemon, open_client, db
):
    """2,000 ids, an empty list or non-strings: error frame with the request id; nothing changes."""
    client = await open_client(daemon.url("alice"))
    mine = await insert(db, "alice", "mine")
    for ids in ([str(i) for i in range(2_000)], [], [1, 2], "abc"):
        await client.send({"action": "read", "ids": ids, "id": "r1"})
        error = await _next(client, "error")
        assert error["code"] == "invalid" and error["id"] == "r1"
    await client.send({"action": "ping"})
    await _next(client, "pong")
    assert await db.fetchval("SELECT is_read FROM t_message_real_time WHERE id = $1", mine) == "0"


async def test_read_with_ten_thousand_ids_closes_with_1009_and_changes_nothing(
    daemon, open_client, db
):
    """A 10,000-id read is over the frame limit: 1009 for that session only, no row changed."""
    attacker = await open_client(daemon.url("alice"))
    other = await open_client(daemon.url("bob"))
    mine = await insert(db, "alice", "mine")
    await attacker.send({"action": "read", "ids": [mine] + [f"id-{i}" for i in range(9_999)]})
    with pytest.raises(ConnectionClosed):
        while True:
            await attacker.recv()
    assert attacker.ws.close_code == 1009
    assert await db.fetchval("SELECT is_read FROM t_message_real_time WHERE id = $1", mine) == "0"
    await insert(db, "bob", "still-flowing")
    assert [m["title"] for m in await other.messages_until("still-flowing")] == ["still-flowing"]


async def test_announcement_reaches_every_user_and_read_state_is_per_user(daemon, open_client, db):
    """A '*' row goes to all users; alice reading it changes only alice's state and count."""
    alice = await open_client(daemon.url("alice"))
    bob = await open_client(daemon.url("bob"))
    announcement = await insert(db, "*", "maintenance tonight")
    for client in (alice, bob):
        frame = await _next(client, "message")
        assert frame["id"] == announcement and frame["toUser"] == "*"
        assert (await _next(client, "unread"))["count"] == 1
    await alice.send({"action": "read", "ids": [announcement]})
    assert (await _next(alice, "read"))["ids"] == [announcement]
    assert (await _next(alice, "unread"))["count"] == 0
    await alice.send({"action": "history", "id": 1})
    history = await _next(alice, "history")
    assert [(m["id"], m["isRead"]) for m in history["messages"]] == [(announcement, "1")]
    await bob.send({"action": "history", "id": 2})
    history = await _next(bob, "history")
    assert [(m["id"], m["isRead"]) for m in history["messages"]] == [(announcement, "0")]
    assert not [f for f in bob.frames if f["event"] == "read"]


async def test_deleting_an_announcement_fixes_counts_only_for_users_who_had_not_read_it(
    daemon, open_client, db
):
    """Recall of an announcement: deleted to all; unread drops only where it was unread."""
    announcement = await insert(db, "*", "oops")
    alice = await open_client(daemon.url("alice"), hello=False)
    bob = await open_client(daemon.url("bob"), hello=False)
    assert (await alice.recv_event("hello"))["unread"] == 1
    assert (await bob.recv_event("hello"))["unread"] == 1
    await alice.send({"action": "read", "ids": [announcement]})
    await _unread_becomes(alice, 0)
    await db.execute("DELETE FROM t_message_real_time WHERE id = $1", announcement)
    assert (await _next(bob, "deleted"))["ids"] == [announcement]
    assert (await _next(bob, "unread"))["count"] == 0
    assert (await _next(alice, "deleted"))["ids"] == [announcement]
    await insert(db, "alice", "sentinel")
    await _unread_becomes(alice, 1)
    counts = [f["count"] for f in alice.frames if f["event"] == "unread"]
    assert counts == [0, 1], counts  # the recall did not count alice's read announcement
    assert await db.fetchval("SELECT count(*) FROM t_message_receipt") == 0


async def test_history_pages_newest_first_with_type_filter_and_cursors(daemon, open_client, db):
    """history pages by `before`, filters by type, says when there is more, echoes id."""
    client = await open_client(daemon.url("alice"))
    for i in range(25):
        await insert(db, "alice", f"m{i}", type="even" if i % 2 == 0 else "odd")
    await insert(db, "bob", "bobs")
    await client.send({"action": "history", "limit": 10, "id": "h1"})
    page1 = await _next(client, "history")
    assert page1["id"] == "h1" and page1["more"] is True
    assert [m["title"] for m in page1["messages"]] == [f"m{i}" for i in range(24, 14, -1)]
    await client.send({"action": "history", "limit": 10, "before": page1["messages"][-1]["cursor"]})
    page2 = await _next(client, "history")
    assert [m["title"] for m in page2["messages"]] == [f"m{i}" for i in range(14, 4, -1)]
    await client.send({"action": "history", "limit": 10, "before": page2["messages"][-1]["cursor"]})
    page3 = await _next(client, "history")
    assert [m["title"] for m in page3["messages"]] == [f"m{i}" for i in range(4, -1, -1)]
    assert page3["more"] is False
    await client.send({"action": "history", "type": "odd", "limit": 100})
    odd = await _next(client, "history")
    assert [m["title"] for m in odd["messages"]] == [f"m{i}" for i in range(23, 0, -2)]


async def test_history_before_accepts_a_pushed_message_cursor(daemon, open_client, db):
    """The cursor of a live message pages history from that message."""
    client = await open_client(daemon.url("alice"))
    await insert(db, "alice", "old")
    await insert(db, "alice", "new")
    pushed = (await client.messages_until("new"))[-1]
    await client.send({"action": "history", "before": pushed["cursor"]})
    assert [m["title"] for m in (await _next(client, "history"))["messages"]] == ["old"]


async def test_history_unread_only_lists_only_unread(daemon, open_client, db):
    """unread_only skips read messages and read announcements."""
    client = await open_client(daemon.url("alice"))
    await insert(db, "alice", "unread")
    await insert(db, "alice", "read", is_read="1")
    await client.send({"action": "history", "unread_only": True})
    assert [m["title"] for m in (await _next(client, "history"))["messages"]] == ["unread"]


async def test_bad_history_requests_get_an_error_with_the_request_id(daemon, open_client):
    """A malformed before or limit is an error that echoes id; the session stays open."""
    client = await open_client(daemon.url("alice"))
    for request in (
        {"action": "history", "before": "not-a-cursor", "id": 5},
        {"action": "history", "limit": 0, "id": 5},
        {"action": "history", "limit": "ten", "id": 5},
        {"action": "history", "unread_only": "yes", "id": 5},
        {"action": "history", "type": 7, "id": 5},
    ):
        await client.send(request)
        error = await _next(client, "error")
        assert (error["code"], error["id"]) == ("invalid", 5), request
    await client.send({"action": "history", "limit": 10_000})
    assert (await _next(client, "history"))["messages"] == []


@pytest.mark.parametrize(
    "url, expected",
    [
        ("javascript:alert(document.cookie)", None),
        ("  JavaScript:alert(1)", None),
        ("data:text/html,<script>alert(1)</script>", None),
        ("vbscript:msgbox(1)", None),
        ("//evil.example/phish", None),
        ("https://example.com/orders/1", "https://example.com/orders/1"),
        ("/inbox/42", "/inbox/42"),
    ],
)
async def test_skip_url_is_passed_only_when_safe(daemon, open_client, db, url, expected):
    """Only http(s) and single-slash paths pass; the rest become null and are counted."""
    client = await open_client(daemon.url("alice"))
    before = daemon.daemon.stats.unsafe_skip_urls
    await insert(db, "alice", "link", skip_url=url)
    frame = (await client.messages_until("link"))[-1]
    assert frame["skipUrl"] == expected
    assert daemon.daemon.stats.unsafe_skip_urls - before == (0 if expected else 1)
    await client.send({"action": "history"})
    assert (await _next(client, "history"))["messages"][0]["skipUrl"] == expected


async def test_hello_is_exact_for_a_user_with_a_hundred_thousand_messages(daemon, open_client, db):
    """100,000 messages, 50,000 unread: hello says 50,000 and history pages from the newest."""
    await db.execute(
        "INSERT INTO t_message_real_time (to_user, title, is_read) "
        "SELECT 'big', 'm' || g, CASE WHEN g % 2 = 0 THEN '0' ELSE '1' END "
        "FROM generate_series(1, 100000) AS g"
    )
    client = await open_client(daemon.url("big"), hello=False)
    assert (await client.recv_event("hello"))["unread"] == 50_000
    await client.send({"action": "history", "limit": 3})
    page = await _next(client, "history")
    assert [m["title"] for m in page["messages"]] == ["m100000", "m99999", "m99998"]
    await insert(db, "big", "one more")
    assert (await _next(client, "unread"))["count"] == 50_001


async def test_resume_replays_announcements_missed_while_away(daemon, open_client, db):
    """An announcement committed while a client was away is part of its replay."""
    client = await open_client(daemon.url("alice"), hello=False)
    cursor = (await client.recv_event("hello"))["cursor"]
    await client.close()
    announcement = await insert(db, "*", "while-away")
    await insert(db, "bob", "not-for-alice")
    resumed = await open_client(daemon.url("alice", since=cursor), hello=False)
    hello = await resumed.recv_event("hello")
    assert hello["recovered"] is True and hello["unread"] == 1
    frame = await resumed.recv_event("message")
    assert (frame["id"], frame["toUser"]) == (announcement, "*")


async def test_old_read_events_are_pruned(daemon, db):
    """Events older than the retention are deleted; recent ones stay."""
    message = await insert(db, "alice", "m")
    await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", message)
    await db.execute("UPDATE t_message_event SET at = now() - interval '2 hours'")
    await db.execute("UPDATE t_message_real_time SET is_read = '0' WHERE id = $1", message)
    assert await db.fetchval("SELECT count(*) FROM t_message_event") == 2
    assert await daemon.daemon.db.prune_events(3600) == 1
    assert await db.fetchval("SELECT kind FROM t_message_event") == "unread"


async def test_delivery_prunes_old_events_on_its_own_beside_its_reads(daemon, db, open_client):
    """
    Delivery deletes events past their retention by itself, in the
    background: pushes go on meanwhile.
    """
    message = await insert(db, "alice", "m")
    await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", message)
    await db.execute("UPDATE t_message_event SET at = now() - interval '2 hours'")
    client = await open_client(daemon.url("alice"))
    daemon.daemon.delivery._prune_every = 0.0  # at every round from now on
    await insert(db, "alice", "wakes delivery")
    await client.messages_until("wakes delivery")
    deadline = time.monotonic() + TIMEOUT
    while await db.fetchval("SELECT count(*) FROM t_message_event"):
        assert time.monotonic() < deadline, "the old event was never pruned"
        await asyncio.sleep(0.05)
