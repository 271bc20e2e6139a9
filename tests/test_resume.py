"""
Resume: a client that comes back with its cursor receives every message
addressed to it, each once, whatever happened while it was away.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import asyncpg
from websockets.exceptions import ConnectionClosed

from .conftest import insert


async def test_resume_after_disconnect_during_a_burst_misses_nothing_and_repeats_nothing(
    daemon, open_client, dsn
):
    """Drop the socket mid-burst, reconnect with the last cursor: every id exactly once."""
    client = await open_client(daemon.url("alice"))
    writer = await asyncpg.connect(dsn)
    total = 400

    async def burst() -> list[str]:
        ids = []
        for i in range(total):
            async with writer.transaction():
                ids.append(await insert(writer, "alice", f"m{i}"))
        return ids

    burst_task = asyncio.create_task(burst())
    received = []
    while len(received) < 60:
        frame = await client.recv()
        if frame["event"] == "message":
            received.append(frame)
    await client.drop()
    ids = await burst_task
    await writer.close()

    resumed = await open_client(
        daemon.url("alice", since=quote(received[-1]["cursor"])), hello=False
    )
    hello = await resumed.recv_event("hello")
    assert hello["recovered"] is True
    received += await resumed.messages_until(f"m{total - 1}")
    received_ids = [m["id"] for m in received]
    assert len(received_ids) == len(set(received_ids)), "a message was delivered twice"
    assert set(received_ids) == set(ids)
    assert [m["title"] for m in received] == [f"m{i}" for i in range(total)]


async def test_transaction_committing_after_a_later_seq_is_not_skipped_by_resume(
    daemon, open_client, dsn
):
    """seq 1 commits after seq 2 was delivered and the client left: resume still brings seq 1."""
    client = await open_client(daemon.url("alice"))
    slow = await asyncpg.connect(dsn)
    fast = await asyncpg.connect(dsn)
    try:
        slow_tx = slow.transaction()
        await slow_tx.start()
        await insert(slow, "alice", "early-seq-late-commit")
        await insert(fast, "alice", "late-seq-early-commit")
        frame = (await client.messages_until("late-seq-early-commit"))[-1]
        await client.close()
        await slow_tx.commit()
        await insert(fast, "alice", "after")
    finally:
        await slow.close()
        await fast.close()
    early_seq, late_seq = await _seqs(dsn, "early-seq-late-commit", "late-seq-early-commit")
    assert early_seq < late_seq, "the test must commit seqs out of order"

    resumed = await open_client(daemon.url("alice", since=quote(frame["cursor"])), hello=False)
    assert (await resumed.recv_event("hello"))["recovered"] is True
    titles = [m["title"] for m in await resumed.messages_until("after")]
    assert titles == ["early-seq-late-commit", "after"]


async def test_live_session_receives_a_transaction_that_commits_out_of_seq_order(
    daemon, open_client, dsn
):
    """A connected client gets both rows when the lower seq commits last."""
    client = await open_client(daemon.url("alice"))
    slow = await asyncpg.connect(dsn)
    fast = await asyncpg.connect(dsn)
    try:
        slow_tx = slow.transaction()
        await slow_tx.start()
        await insert(slow, "alice", "low-seq")
        await insert(fast, "alice", "high-seq")
        assert [m["title"] for m in await client.messages_until("high-seq")] == ["high-seq"]
        await slow_tx.commit()
        assert [m["title"] for m in await client.messages_until("low-seq")] == ["low-seq"]
    finally:
        await slow.close()
        await fast.close()


async def _seqs(dsn: str, *titles: str) -> list[int]:
    connection = await asyncpg.connect(dsn)
    try:
        return [
            await connection.fetchval("SELECT seq FROM t_message_real_time WHERE title = $1", t)
            for t in titles
        ]
    finally:
        await connection.close()


async def test_hello_cursor_resumes_a_client_that_received_nothing(daemon, open_client, db):
    """The hello cursor alone is enough to catch up on what arrived while away."""
    client = await open_client(daemon.url("alice"), hello=False)
    hello = await client.recv_event("hello")
    await client.close()
    await insert(db, "alice", "while-away")
    resumed = await open_client(daemon.url("alice", since=quote(hello["cursor"])), hello=False)
    assert (await resumed.recv_event("hello"))["recovered"] is True
    assert [m["title"] for m in await resumed.messages_until("while-away")] == ["while-away"]


async def test_resume_in_first_frame_auth_works_like_the_query_parameter(daemon, open_client, db):
    """{"action":"auth","since":...} replays like ?since=."""
    first = await open_client(daemon.url("alice"))
    await insert(db, "alice", "one")
    cursor = (await first.messages_until("one"))[-1]["cursor"]
    await first.close()
    await insert(db, "alice", "two")
    client = await open_client(f"ws://127.0.0.1:{daemon.port}/ws/message", hello=False)
    await client.send({"action": "auth", "token": daemon.token("alice"), "since": cursor})
    assert (await client.recv_event("hello"))["recovered"] is True
    assert [m["title"] for m in await client.messages_until("two")] == ["two"]


async def test_replay_over_the_limit_sends_the_newest_then_resync(start_daemon, open_client, db):
    """More than replay_limit missed: recovered false, the newest ones, then resync."""
    daemon = await start_daemon(replay_limit=5)
    client = await open_client(daemon.url("alice"), hello=False)
    cursor = (await client.recv_event("hello"))["cursor"]
    await client.close()
    for i in range(12):
        await insert(db, "alice", f"m{i}")
    resumed = await open_client(daemon.url("alice", since=quote(cursor)), hello=False)
    hello = await resumed.recv_event("hello")
    assert hello["recovered"] is False
    replayed = [(await resumed.recv_event("message"))["title"] for _ in range(5)]
    assert replayed == [f"m{i}" for i in range(7, 12)]
    resync = await resumed.recv_event("resync")
    await insert(db, "alice", "live")
    assert [m["title"] for m in await resumed.messages_until("live")] == ["live"]

    # The resync cursor is a complete position: resuming from it replays nothing old.
    await resumed.close()
    await insert(db, "alice", "after-resync")
    again = await open_client(daemon.url("alice", since=quote(resync["cursor"])), hello=False)
    assert (await again.recv_event("hello"))["recovered"] is True
    assert [m["title"] for m in await again.messages_until("after-resync")] == [
        "live",
        "after-resync",
    ]


async def test_malformed_or_foreign_cursor_gets_recovered_false_and_resync(daemon, open_client, db):
    """A cursor the server cannot use is answered, never an error that strands the client."""
    for bad in ("garbage", "5-3", "1-2_3-4_x", "99999999999-99999999999", "%00%FF"):
        client = await open_client(daemon.url("alice", since=bad), hello=False)
        hello = await client.recv_event("hello")
        assert hello["recovered"] is False
        resync = await client.recv_event("resync")
        assert resync["cursor"] == hello["cursor"]
        await insert(db, "alice", f"after-{bad}")
        assert [m["title"] for m in await client.messages_until(f"after-{bad}")] == [f"after-{bad}"]
        await client.close()


async def test_cursor_cut_in_the_middle_of_a_large_batch_resumes_exactly(
    start_daemon, open_client, db
):
    """A client that leaves inside a multi-page batch resumes at the next row, not the batch end."""
    daemon = await start_daemon(fetch_batch=7)
    client = await open_client(daemon.url("alice"))
    await db.execute(
        "INSERT INTO t_message_real_time (to_user, title) "
        "SELECT 'alice', 'b' || g FROM generate_series(1, 40) AS g"
    )
    first = []
    while len(first) < 17:
        frame = await client.recv()
        if frame["event"] == "message":
            first.append(frame)
    await client.drop()
    resumed = await open_client(daemon.url("alice", since=quote(first[-1]["cursor"])), hello=False)
    assert (await resumed.recv_event("hello"))["recovered"] is True
    rest = await resumed.messages_until("b40")
    assert [m["title"] for m in first + rest] == [f"b{i}" for i in range(1, 41)]


async def test_dropped_resume_in_the_middle_of_a_replay_continues_without_gap_or_duplicate(
    daemon, open_client, db, dsn
):
    """Cut the replay itself short and resume from the last replayed cursor."""
    client = await open_client(daemon.url("alice"), hello=False)
    cursor = (await client.recv_event("hello"))["cursor"]
    await client.close()
    slow = await asyncpg.connect(dsn)
    try:
        slow_tx = slow.transaction()
        await slow_tx.start()
        await insert(slow, "alice", "straggler")
        for i in range(30):
            await insert(db, "alice", f"r{i}")
        replay = await open_client(daemon.url("alice", since=quote(cursor)), hello=False)
        await replay.recv_event("hello")
        got = [await replay.recv_event("message") for _ in range(10)]
        await replay.drop()
        await slow_tx.commit()
    finally:
        await slow.close()
    await insert(db, "alice", "end")
    again = await open_client(daemon.url("alice", since=quote(got[-1]["cursor"])), hello=False)
    assert (await again.recv_event("hello"))["recovered"] is True
    rest = await again.messages_until("end")
    titles = [m["title"] for m in got + rest]
    assert len(titles) == len(set(titles))
    assert set(titles) == {f"r{i}" for i in range(30)} | {"straggler", "end"}


async def test_session_is_closed_by_server_restart_code_and_resumes(start_daemon, open_client, db):
    """Stopping the daemon closes sessions with 1012; a new daemon resumes them."""
    first = await start_daemon()
    client = await open_client(first.url("alice"))
    await insert(db, "alice", "before")
    cursor = (await client.messages_until("before"))[-1]["cursor"]
    await first.daemon.stop()
    try:
        while True:
            await client.recv()
    except ConnectionClosed:
        pass
    assert client.ws.close_code == 1012
    hint = int(client.ws.close_reason.rpartition("retry_ms=")[2])
    assert 0 <= hint <= 5000
    await insert(db, "alice", "while-down")
    second = await start_daemon()
    resumed = await open_client(second.url("alice", since=quote(cursor)), hello=False)
    assert (await resumed.recv_event("hello"))["recovered"] is True
    assert [m["title"] for m in await resumed.messages_until("while-down")] == ["while-down"]
