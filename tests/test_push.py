"""
The core promise: a committed row reaches every session of its addressee,
only after commit, never a rolled-back row, never another user.

Absence is proven with a later *sentinel* message: delivery is in commit
order per user, so when the sentinel arrives, anything that would have been
wrongly delivered before it has had its chance.
"""

from __future__ import annotations

import asyncpg
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, insert


async def test_message_is_not_delivered_before_commit_and_is_after(db, daemon, open_client, dsn):
    """An open transaction's row stays invisible; after COMMIT it is pushed."""
    client = await open_client(daemon.url("alice"))
    writer = await asyncpg.connect(dsn)
    try:
        transaction = writer.transaction()
        await transaction.start()
        await insert(writer, "alice", "pending")
        await insert(db, "alice", "sentinel")
        before_commit = await client.messages_until("sentinel")
        assert [m["title"] for m in before_commit] == ["sentinel"]
        await transaction.commit()
        after_commit = await client.messages_until("pending")
        assert [m["title"] for m in after_commit] == ["pending"]
    finally:
        await writer.close()


async def test_rolled_back_insert_is_never_delivered(db, daemon, open_client):
    """A rolled-back transaction's rows are never pushed."""
    client = await open_client(daemon.url("alice"))
    async with db.transaction():
        await insert(db, "alice", "kept-1")
    transaction = db.transaction()
    await transaction.start()
    await insert(db, "alice", "rolled-back")
    await transaction.rollback()
    await insert(db, "alice", "sentinel")
    titles = [m["title"] for m in await client.messages_until("sentinel")]
    assert titles == ["kept-1", "sentinel"]


async def test_savepoint_rollback_row_is_never_delivered(db, daemon, open_client):
    """Rows of a rolled-back savepoint are dropped; the rest of the transaction arrives."""
    client = await open_client(daemon.url("alice"))
    async with db.transaction():
        await insert(db, "alice", "outer")
        savepoint = db.transaction()
        await savepoint.start()
        await insert(db, "alice", "in-savepoint")
        await savepoint.rollback()
        await insert(db, "alice", "after-savepoint")
    await insert(db, "alice", "sentinel")
    titles = [m["title"] for m in await client.messages_until("sentinel")]
    assert titles == ["outer", "after-savepoint", "sentinel"]


async def test_every_session_of_the_addressee_receives_and_other_users_receive_nothing(
    db, daemon, open_client
):
    """Two tabs of alice both get her message; bob's session never sees it."""
    tab1 = await open_client(daemon.url("alice"))
    tab2 = await open_client(daemon.url("alice"))
    bob = await open_client(daemon.url("bob"))
    message_id = await insert(db, "alice", "for-alice")
    await insert(db, "bob", "for-bob")
    for tab in (tab1, tab2):
        received = await tab.messages_until("for-alice")
        assert [m["id"] for m in received] == [message_id]
    assert [m["title"] for m in await bob.messages_until("for-bob")] == ["for-bob"]
    await insert(db, "alice", "alice-2")
    await insert(db, "bob", "bob-sentinel")
    assert [m["title"] for m in await bob.messages_until("bob-sentinel")] == ["bob-sentinel"]


async def test_pushed_frame_is_the_row_in_camel_case_with_event_and_cursor(db, daemon, open_client):
    """The frame carries every seed column in camelCase, so the seed's frontend works."""
    client = await open_client(daemon.url("alice"))
    message_id = await insert(
        db, "alice", "Title", "Body", type="system", send_user="admin", skip_url="/inbox/1"
    )
    frame = (await client.messages_until("Title"))[-1]
    assert frame["event"] == "message"
    assert isinstance(frame["cursor"], str) and frame["cursor"]
    assert frame["id"] == message_id
    assert (frame["title"], frame["content"], frame["type"]) == ("Title", "Body", "system")
    assert (frame["sendUser"], frame["toUser"], frame["skipUrl"]) == ("admin", "alice", "/inbox/1")
    assert frame["isRead"] == "0"
    assert frame["sendTime"].endswith("+00:00") and "T" in frame["sendTime"]


async def test_multi_row_insert_delivers_every_row_in_order(db, daemon, open_client):
    """One INSERT of several rows for two users delivers each user's rows in order."""
    alice = await open_client(daemon.url("alice"))
    bob = await open_client(daemon.url("bob"))
    await db.execute(
        "INSERT INTO t_message_real_time (to_user, title) VALUES "
        "('alice', 'a1'), ('bob', 'b1'), ('alice', 'a2'), ('alice', 'a3'), ('bob', 'b2')"
    )
    assert [m["title"] for m in await alice.messages_until("a3")] == ["a1", "a2", "a3"]
    assert [m["title"] for m in await bob.messages_until("b2")] == ["b1", "b2"]


async def test_ten_thousand_row_insert_select_arrives_whole(db, daemon, open_client):
    """A 10,000-row INSERT ... SELECT is delivered completely, each row once, in order."""
    client = await open_client(daemon.url("alice"))
    await db.execute(
        "INSERT INTO t_message_real_time (to_user, title) "
        "SELECT 'alice', 'bulk-' || g FROM generate_series(1, 10000) AS g"
    )
    received = await client.messages_until("bulk-10000", timeout=6 * TIMEOUT)
    assert [m["title"] for m in received] == [f"bulk-{i}" for i in range(1, 10001)]


async def test_one_megabyte_content_arrives_intact(db, daemon, open_client):
    """A row far over NOTIFY's 8000-byte limit inserts fine and arrives byte for byte."""
    client = await open_client(daemon.url("alice"), max_size=4 * 2**20)
    content = "0123456789abcdef" * (2**20 // 16)
    await insert(db, "alice", "big", content)
    frame = (await client.messages_until("big"))[-1]
    assert frame["content"] == content


async def test_chinese_text_and_emoji_arrive_intact(db, daemon, open_client):
    """Non-ASCII text in every field survives the trip unchanged."""
    client = await open_client(daemon.url("用户甲"))
    await insert(db, "用户甲", "系统通知 🔔", "您有一条新消息 😀👍🏽", send_user="管理员")
    frame = (await client.messages_until("系统通知 🔔"))[-1]
    assert frame["content"] == "您有一条新消息 😀👍🏽"
    assert frame["sendUser"] == "管理员"
    assert frame["toUser"] == "用户甲"


async def test_sessions_over_the_per_user_limit_close_the_oldest_with_4409(
    start_daemon, open_client, db
):
    """With max_sessions_per_user=1 a second tab replaces the first (close 4409)."""
    daemon = await start_daemon(max_sessions_per_user=1)
    first = await open_client(daemon.url("alice"))
    second = await open_client(daemon.url("alice"))
    with pytest.raises(ConnectionClosed):
        await first.recv()
    assert first.ws.close_code == 4409
    await insert(db, "alice", "to-newest")
    assert [m["title"] for m in await second.messages_until("to-newest")] == ["to-newest"]


async def test_ping_is_answered_and_bad_frames_get_an_error_without_closing(daemon, open_client):
    """ping → pong; malformed or unknown frames → error event; the session stays open."""
    client = await open_client(daemon.url("alice"))
    await client.send({"action": "ping"})
    assert (await client.recv())["event"] == "pong"
    await client.ws.send("{not json")
    assert (await client.recv_event("error"))["code"] == "malformed"
    await client.send({"action": "dance"})
    assert (await client.recv_event("error"))["code"] == "unknown_action"
    await client.send({"no": "action"})
    assert (await client.recv_event("error"))["code"] == "malformed"
    await client.send({"action": "ping"})
    assert (await client.recv())["event"] == "pong"


async def test_client_frame_over_the_size_limit_closes_with_1009(start_daemon, open_client):
    """A client frame larger than max_frame_bytes closes the session with 1009."""
    daemon = await start_daemon(max_frame_bytes=1024)
    client = await open_client(daemon.url("alice"))
    await client.ws.send('{"action":"ping","pad":"' + "x" * 2048 + '"}')
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.ws.close_code == 1009


async def test_compression_is_off_unless_set_and_then_frames_arrive_compressed(
    db, start_daemon, open_client
):
    """NOTIFYD_COMPRESSION: off by default even when the client offers it; on, every frame still arrives."""
    plain = await start_daemon()
    offered = await open_client(plain.url("alice"), compression="deflate")
    assert offered.ws.protocol.extensions == []
    compressing = await start_daemon(compression=True)
    client = await open_client(compressing.url("alice"), compression="deflate")
    assert [type(e).__name__ for e in client.ws.protocol.extensions] == ["PerMessageDeflate"]
    # Count what arrives on the wire: compressed, 5,000 x's take a few bytes.
    received: list[int] = []
    receive_data = client.ws.protocol.receive_data

    def counting(data: bytes) -> None:
        received.append(len(data))
        receive_data(data)

    client.ws.protocol.receive_data = counting  # type: ignore[method-assign]
    await insert(db, "alice", "Squeezed", "x" * 5000)
    frame = (await client.messages_until("Squeezed"))[-1]
    assert frame["content"] == "x" * 5000
    assert (await client.recv_event("unread"))["count"] >= 1
    assert 0 < sum(received) < 1000
