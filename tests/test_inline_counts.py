"""
Unread counts on the message frame (``?counts=inline``): an opted-in
session gets one frame per new message, the counts on the last message of a
delivery round exactly as the ``unread`` event would have carried them, and
the ordinary ``unread`` event whenever that would be wrong or incomplete.
Old clients (no parameter) still get ``unread`` events.

Each fallback is forced into one delivery round deterministically: the
changes are made in one transaction (a new message and a read, delete,
unread-again or announcement), the round is held by a lock while a session
joins, or the session is made slow for real by a client that stops reading.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import asyncpg

from notifyd.ledger import ByType, UnreadLedger

from .conftest import Client, RunningDaemon, insert
from .receiver import until, until_async
from .test_categories import truth


def inline_url(daemon: RunningDaemon, user: str) -> str:
    return daemon.url(user, counts="inline")


async def frames_until_pong(client: Client) -> list[dict[str, Any]]:
    """
    The frames a session is sent before the answer to a ping sent now.

    Called once a round's last message has arrived: the rest of that round
    (its events and unread counts) was written with it, so it is all here.
    """
    await client.send({"action": "ping"})
    frames = []
    while (frame := await client.recv())["event"] != "pong":
        frames.append(frame)
    return frames


async def frames_until_title(client: Client, title: str) -> list[dict[str, Any]]:
    """
    Every frame up to the message titled ``title``, then the rest of its round.
    """
    frames = []
    while True:
        frame = await client.recv()
        frames.append(frame)
        if frame["event"] == "message" and frame["title"] == title:
            return frames + await frames_until_pong(client)


def counts_of(frame: dict[str, Any]) -> tuple[int, ByType] | None:
    """
    The counts a frame carries: an unread event's, or a message frame's.
    """
    if frame["event"] == "unread":
        return frame["count"], frame["byType"]
    if "unread" in frame or "unreadByType" in frame:
        return frame["unread"], frame["unreadByType"]
    return None


async def test_an_opted_in_client_gets_one_frame_per_message_under_a_burst(
    daemon, open_client, db, dsn
):
    """
    Single-row commits from four connections at once: the opted-in session
    gets exactly one frame per message and no unread event; each message
    that carries counts carries the counts of every message received up to
    it (by type), and the last one the tables' counts.
    """
    client = await open_client(inline_url(daemon, "alice"))
    types = ["comment", "like", None]

    async def writer(seed: int) -> None:
        connection = await asyncpg.connect(dsn)
        try:
            for n in range(60):
                await insert(connection, "alice", f"w{seed}-{n}", type=types[(seed + n) % 3])
        finally:
            await connection.close()

    await asyncio.gather(*(writer(seed) for seed in range(4)))
    sent = 4 * 60
    frames = [await client.recv() for _ in range(sent)]
    frames += await frames_until_pong(client)
    assert [frame["event"] for frame in frames] == ["message"] * sent
    carried = assert_counts_follow_the_messages(frames)
    assert counts_of(frames[-1]) == (sent, await truth(db, "alice"))
    stats = daemon.daemon.stats
    assert stats.inline_counts == carried > 1
    assert stats.inline_count_mismatches == 0


def assert_counts_follow_the_messages(frames: list[dict[str, Any]]) -> int:
    """
    Each message frame that carries counts carries those of all the
    messages up to it, when all are new and unread; returns how many did.
    """
    so_far: ByType = {}
    carried = 0
    for frame in frames:
        category = frame["type"] or ""
        so_far[category] = so_far.get(category, 0) + 1
        counts = counts_of(frame)
        if counts is not None:
            carried += 1
            assert counts == (sum(so_far.values()), so_far), frame
    return carried


async def test_a_statement_read_in_pages_carries_the_counts_on_its_last_row(
    start_daemon, open_client, db
):
    """
    A 35-row statement read in pages of 10, 20 and 5 rows: one frame per
    row, the last with the counts of all 35. A 30-row one fills its pages
    (10, 20), so its last page is empty and the counts, known only then,
    come as an unread event after the 30 rows.
    """
    daemon = await start_daemon(fetch_batch=10)
    client = await open_client(inline_url(daemon, "alice"))
    statement = (
        "INSERT INTO t_message_real_time (to_user, title, type) "
        "SELECT 'alice', $1 || g, 'system' FROM generate_series(1, $2::int) AS g"
    )
    await db.execute(statement, "a", 35)
    frames = await frames_until_title(client, "a35")
    assert [frame["event"] for frame in frames] == ["message"] * 35
    assert assert_counts_follow_the_messages(frames) == 1
    assert counts_of(frames[-1]) == (35, {"system": 35})

    await db.execute(statement, "b", 30)
    assert await assert_falls_back(client, "b30", db) == ["message"] * 30 + ["unread"]


async def test_old_clients_still_get_an_unread_event_beside_an_opted_in_session(
    daemon, open_client, db
):
    """
    Two sessions of one user: the one without the parameter (or with
    another value) gets the message without counts and an unread event;
    the opted-in one gets the message with the counts, and nothing else.
    """
    old = await open_client(daemon.url("alice"))
    other_value = await open_client(daemon.url("alice", counts="events"))
    new = await open_client(inline_url(daemon, "alice"))
    await insert(db, "alice", "hi", type="comment")
    want = (1, {"comment": 1})
    for client in (old, other_value):
        message, unread = await frames_until_title(client, "hi")
        assert "unread" not in message and "unreadByType" not in message
        assert (unread["event"], counts_of(unread)) == ("unread", want)
    [message] = await frames_until_title(new, "hi")
    assert counts_of(message) == want


async def assert_falls_back(
    client: Client, last_title: str, db: asyncpg.Connection, want: ByType | None = None
) -> list[str]:
    """
    The round ending with ``last_title`` reached the opted-in client with no
    counts on any message and one unread event, last, with the tables'
    counts (``want`` when given); returns the round's events in order.
    """
    frames = await frames_until_title(client, last_title)
    if frames[-1]["event"] != "unread":
        # A round read in pages writes its earlier pages as they come, so
        # its unread event may follow the pong.
        while (frame := await client.recv())["event"] != "unread":
            frames.append(frame)
        frames.append(frame)
    round_ = frames[next(i for i, f in enumerate(frames) if f["event"] == "message") :]
    for frame in round_:
        if frame["event"] == "message":
            assert counts_of(frame) is None, frame
    assert round_[-1]["event"] == "unread", round_
    if want is None:
        want = await truth(db, "alice")
    assert counts_of(round_[-1]) == (sum(want.values()), want)
    return [frame["event"] for frame in round_]


async def test_a_read_in_the_same_round_sends_the_unread_event(daemon, open_client, db):
    """A new message and the app's read of another one, in one transaction: counts as an event."""
    client = await open_client(inline_url(daemon, "alice"))
    earlier = await insert(db, "alice", "earlier", type="like")
    await client.messages_until("earlier")
    async with db.transaction():
        await insert(db, "alice", "new", type="comment")
        await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", earlier)
    assert await assert_falls_back(client, "new", db) == ["message", "read", "unread"]


async def test_an_unread_again_in_the_same_round_sends_the_unread_event(daemon, open_client, db):
    """A new message and the app's unread-again of a read one, in one transaction."""
    client = await open_client(inline_url(daemon, "alice"))
    earlier = await insert(db, "alice", "earlier", type="like", is_read="1")
    await client.messages_until("earlier")
    async with db.transaction():
        await insert(db, "alice", "new", type="comment")
        await db.execute("UPDATE t_message_real_time SET is_read = '0' WHERE id = $1", earlier)
    assert await assert_falls_back(client, "new", db) == ["message", "read", "unread"]


async def test_a_delete_in_the_same_round_sends_the_unread_event(daemon, open_client, db):
    """A new message and the app's delete of an unread one, in one transaction."""
    client = await open_client(inline_url(daemon, "alice"))
    earlier = await insert(db, "alice", "earlier", type="like")
    await client.messages_until("earlier")
    async with db.transaction():
        await insert(db, "alice", "new", type="comment")
        await db.execute("DELETE FROM t_message_real_time WHERE id = $1", earlier)
    assert await assert_falls_back(client, "new", db) == ["message", "deleted", "unread"]


async def test_an_expiry_in_the_same_round_sends_the_unread_event(daemon, open_client, db):
    """A new message and the app moving another one's expire_at to the past, in one transaction."""
    client = await open_client(inline_url(daemon, "alice"))
    earlier = await insert(db, "alice", "earlier", type="like")
    await client.messages_until("earlier")
    async with db.transaction():
        await insert(db, "alice", "new", type="comment")
        await db.execute(
            "UPDATE t_message_real_time SET expire_at = now() - interval '1 hour' WHERE id = $1",
            earlier,
        )
    # (The expired message counts no more: the tables' count of test_categories
    # predates expire_at.)
    events = await assert_falls_back(client, "new", db, want={"comment": 1})
    assert events == ["message", "deleted", "unread"]


async def test_another_users_read_in_the_same_round_leaves_the_counts_inline(
    daemon, open_client, db
):
    """Only the user whose counts an event moves falls back: bob's read does not touch alice's."""
    client = await open_client(inline_url(daemon, "alice"))
    await open_client(inline_url(daemon, "bob"))
    bobs = await insert(db, "bob", "bob's")
    async with db.transaction():
        await insert(db, "alice", "new", type="comment")
        await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", bobs)
    [message] = await frames_until_title(client, "new")
    assert counts_of(message) == (1, {"comment": 1})


async def test_an_announcement_in_the_same_round_sends_the_unread_event(daemon, open_client, db):
    """A user's message and an announcement in one round, in either order: no frame carries counts."""
    client = await open_client(inline_url(daemon, "alice"))
    async with db.transaction():
        await insert(db, "alice", "own", type="comment")
        await insert(db, "*", "notice", type="system")
    assert await assert_falls_back(client, "notice", db) == ["message", "message", "unread"]
    # The same in the other order: the user's message is then the round's last.
    async with db.transaction():
        await insert(db, "*", "notice2", type="system")
        await insert(db, "alice", "own2", type="comment")
    assert await assert_falls_back(client, "own2", db) == ["message", "message", "unread"]
    # Alone, an announcement moves counts with the event too.
    await insert(db, "*", "second", type="system")
    assert await assert_falls_back(client, "second", db) == ["message", "unread"]


async def test_an_announcement_deleted_in_the_same_round_sends_the_unread_event(
    daemon, open_client, db
):
    """A new message and the app's delete of a counted announcement, in one transaction."""
    client = await open_client(inline_url(daemon, "alice"))
    notice = await insert(db, "*", "notice", type="system")
    await client.messages_until("notice")
    async with db.transaction():
        await insert(db, "alice", "new", type="comment")
        await db.execute("DELETE FROM t_message_real_time WHERE id = $1", notice)
    assert await assert_falls_back(client, "new", db) == ["message", "deleted", "unread"]


async def blocked_window_reads(db: asyncpg.Connection) -> list[str]:
    """
    The window reads waiting for a lock: "first" (the statement that also
    counts joining users) or "lean".
    """
    queries = await db.fetch(
        "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND (query LIKE '%WITH ev AS%' OR query LIKE '%pg_current_snapshot()%')"
    )
    # Only the start of a long statement is kept there: the first one's
    # begins with its events.
    return ["first" if "WITH ev AS" in q["query"] else "lean" for q in queries]


async def test_a_session_joining_in_the_same_round_sends_the_unread_event(
    start_daemon, open_client, db, dsn
):
    """
    The round that admits a second session of the user counts them again:
    the first session gets the round's message without counts and the
    event; the joining one gets the message's counts in its hello.

    The round is held by a lock on the event table (its read waits for it
    before taking its snapshot) until the message has committed. Probes,
    which also wake delivery, are kept out of the way (the first one is
    done before the first session joins, the next one is an hour later);
    should another wake-up's read be the one held (the expiry sweep's), the
    join is let through and tried again. Rows are not pushed ahead here: the
    message must come in the held round.
    """
    daemon = await start_daemon(probe_interval_s=3600.0, push_ahead=False)
    health = daemon.daemon.listener.health
    await until(lambda: health.last_probe_ok is not None, what="the first probe")
    first = await open_client(inline_url(daemon, "alice"))
    for _attempt in range(3):
        locker = await asyncpg.connect(dsn)
        try:
            holding = locker.transaction()
            await holding.start()
            await locker.execute("LOCK TABLE t_message_event IN ACCESS EXCLUSIVE MODE")
            second = asyncio.ensure_future(open_client(inline_url(daemon, "alice"), hello=False))
            blocked = await until_async(
                lambda: blocked_window_reads(db), what="a window read to wait for the lock"
            )
            if blocked == ["first"]:
                await insert(db, "alice", "new", type="comment")
            await holding.commit()
        finally:
            await locker.close()
        if blocked == ["first"]:
            break
        await (await second).recv_event("hello")
        await second.result().close()
    else:
        raise AssertionError("the joining round's read was never the one held")
    assert await assert_falls_back(first, "new", db) == ["message", "unread"]
    hello = await (await second).recv_event("hello")
    assert (hello["unread"], hello["unreadByType"]) == (1, {"comment": 1})


async def test_a_session_that_is_behind_gets_the_unread_event_in_its_queue(
    start_daemon, open_client, db
):
    """
    A client that stops reading until its frames queue on the server: the
    queued message carries no counts (an overflow would drop it for a
    resync, with them) and the unread event follows it in the queue.
    """
    daemon = await start_daemon(slow_client_timeout_s=60.0)
    stalled = await open_client(inline_url(daemon, "alice"), max_queue=1, max_size=2**22)
    stats = daemon.daemon.stats

    def queued() -> int:
        return sum(len(s.outbox) for s in daemon.daemon.hub.sessions_of("alice") or ())

    big = "x" * 256 * 1024
    for n in range(400):
        before = stats.delivered
        await insert(db, "alice", f"big{n}", big, type="bulk")
        await until(lambda: stats.delivered > before, what=f"big{n} routed")  # noqa: B023
        if queued():
            break
    assert queued(), "the client's frames never queued on the server"
    before = stats.delivered
    await insert(db, "alice", "small", type="comment")
    await until(lambda: stats.delivered > before, what="small routed")
    assert queued(), "the queue drained before the message was routed"

    frames = []
    while not ((frame := await stalled.recv())["event"] == "message" and frame["title"] == "small"):
        frames.append(frame)
    assert counts_of(frame) is None
    unread = await stalled.recv()
    want = await truth(db, "alice")
    assert counts_of(unread) == (sum(want.values()), want)
    # The big messages written before the queue formed carried their counts.
    assert any(counts_of(f) is not None for f in frames)


class _SkewedLedger(UnreadLedger):
    """
    A ledger whose preview of a window's counts is one too high: counts
    that are not what settling makes them.
    """

    def after_adding(self, user: str, adds: Mapping[str, int]) -> ByType | None:
        counts = super().after_adding(user, adds)
        return None if counts is None else {**counts, "skew": 1}


def skew(daemon: RunningDaemon) -> None:
    """
    Swap the daemon's ledger for a skewed one holding the same counts.
    """
    router = daemon.daemon.delivery._router
    skewed = _SkewedLedger()
    for user in router.unread:
        skewed.set(user, router.unread.get(user) or {})
    router.unread = skewed


async def test_counts_a_frame_carried_that_the_ledger_does_not_settle_to_are_corrected(
    start_daemon, open_client, db
):
    """
    Fault injection: when the counts a window's message carried differ from
    what the ledger settles to, the unread event follows with the right
    ones, and the mismatch is counted. (Rows are not pushed ahead here: the
    message must come with its window.)
    """
    daemon = await start_daemon(push_ahead=False)
    client = await open_client(inline_url(daemon, "alice"))
    skew(daemon)
    await insert(db, "alice", "new", type="comment")
    message, unread = await frames_until_title(client, "new")
    assert counts_of(message) == (2, {"comment": 1, "skew": 1})
    assert counts_of(unread) == (1, {"comment": 1})
    assert daemon.daemon.stats.inline_count_mismatches == 1


async def test_counts_a_row_pushed_ahead_carried_that_its_window_does_not_settle_to_are_corrected(
    daemon, open_client, db
):
    """
    Fault injection: a row pushed ahead carries what the ledger says then;
    when its window settles to other counts, the unread event follows.
    """
    client = await open_client(inline_url(daemon, "alice"))
    skew(daemon)
    await insert(db, "alice", "new", type="comment")
    message = await client.recv()
    assert message["title"] == "new" and "_a" in message["cursor"]
    assert counts_of(message) == (2, {"comment": 1, "skew": 1})
    assert counts_of(await client.recv_event("unread")) == (1, {"comment": 1})


async def test_counts_stay_exact_for_an_opted_in_session_under_concurrent_changes(
    daemon, open_client, db, dsn
):
    """
    Messages, announcements, reads and the app's deletes at once: the last
    counts the opted-in session was sent, on a message or in an event, are
    the tables' counts.
    """
    client = await open_client(inline_url(daemon, "alice"))
    ids: list[str] = []

    async def writer(seed: int) -> None:
        connection = await asyncpg.connect(dsn)
        try:
            for n in range(40):
                ids.append(await insert(connection, "alice", f"w{seed}-{n}", type=f"t{n % 3}"))
                if n % 10 == 0:
                    await insert(connection, "*", f"a{seed}-{n}", type="system")
        finally:
            await connection.close()

    async def app() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            for n in range(20):
                if len(ids) > 3:
                    victim = ids[n % len(ids)]
                    if n % 2:
                        await connection.execute(
                            "UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", victim
                        )
                    else:
                        await connection.execute(
                            "DELETE FROM t_message_real_time WHERE id = $1", victim
                        )
                await asyncio.sleep(0)
        finally:
            await connection.close()

    await asyncio.gather(writer(0), writer(1), app())
    await insert(db, "alice", "last", type="comment")
    frames = await frames_until_title(client, "last")
    want = await truth(db, "alice")
    final = [counts for frame in frames if (counts := counts_of(frame)) is not None][-1]
    assert final == (sum(want.values()), want)
