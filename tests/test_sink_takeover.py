"""
The webhook's sender lock against dying instances: real ``notifyd serve``
subprocesses, SIGKILLed or cut off from Postgres while a POST is in flight,
and the real receiver of :mod:`tests.receiver`, which stops answering after
the 8th acknowledgement.

Before the lock, a claimed batch was leased for batch x timeout + 5 s
(105 s with the defaults used here), and the whole queue waited for a dead
instance's lease. Each test prints the takeover time it measured.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import time
from collections.abc import AsyncIterator

import asyncpg

from .conftest import SECRET, TIMEOUT
from .processes import (
    NotifydProcess,
    free_port,
    running_notifyd,
    serve_env,
    wait_until_healthy,
)
from .receiver import Post, Receiver, until_async

WEBHOOK_SECRET = "whsec-" + "t" * 26
MESSAGES = 40
ACKED_BEFORE_HOLD = 8
# The lease a claimed batch had before the sender lock (defaults: 10 x 10 s + 5 s).
OLD_LEASE_S = 105.0


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver(WEBHOOK_SECRET.encode())
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


@contextlib.asynccontextmanager
async def instance(dsn: str, receiver: Receiver) -> AsyncIterator[NotifydProcess]:
    """
    A ``notifyd serve`` with the webhook sink at its default batch, timeout
    and poll, healthy (its sink started) when yielded.
    """
    port = free_port()
    env = serve_env(
        dsn,
        port,
        NOTIFYD_JWT_SECRET=SECRET,
        NOTIFYD_SINKS="webhook",
        NOTIFYD_WEBHOOK_URL=receiver.url,
        NOTIFYD_WEBHOOK_SECRET=WEBHOOK_SECRET,
        NOTIFYD_RECONNECT_MAX_S="0.5",
    )
    async with running_notifyd("serve", env=env) as process:
        await wait_until_healthy(port, process)
        yield process


async def insert_messages(db: asyncpg.Connection) -> list[str]:
    """
    MESSAGES messages, one commit each, to four users; their ids in order.
    """
    return [
        await db.fetchval(
            "INSERT INTO t_message_real_time (to_user, title, content) "
            "VALUES ($1, $2, 'c') RETURNING id::text",
            f"user{n % 4}",
            f"m{n}",
        )
        for n in range(MESSAGES)
    ]


async def holder_backend(db: asyncpg.Connection) -> tuple[int, str]:
    """
    The backend pid and application_name of the session holding the
    webhook's sender lock in this database (polled until one does).
    """

    async def ask() -> asyncpg.Record | None:
        return await db.fetchrow(
            "SELECT a.pid, a.application_name FROM pg_locks AS l "
            "JOIN pg_stat_activity AS a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()"
        )

    row = await until_async(ask, what="a sender lock holder")
    return int(row["pid"]), str(row["application_name"])


def check_sent_once_in_order(posts: list[Post], ids: list[str], in_flight: str) -> None:
    """
    Every message posted, first posts in commit order, and none twice but
    the one in flight at the failure (with the same Idempotency-Key).
    """
    posted = [post.message["id"] for post in posts]
    assert list(dict.fromkeys(posted)) == ids
    twice = {key: n for key, n in collections.Counter(posted).items() if n > 1}
    assert set(twice) <= {in_flight} and all(n == 2 for n in twice.values()), twice
    keys = {post.headers["Idempotency-Key"] for post in posts if post.message["id"] == in_flight}
    assert keys == {in_flight}
    assert all(post.verified for post in posts)


async def all_sent(db: asyncpg.Connection, ids: list[str]) -> bool:
    states = await db.fetch(
        "SELECT state FROM t_message_dispatch WHERE message_id = ANY($1::text[])", ids
    )
    return len(states) == len(ids) and all(row["state"] == "sent" for row in states)


async def test_after_a_sigkill_mid_post_the_restarted_instance_sends_within_seconds(dsn, db):
    """SIGKILL with a POST in flight, restart: the queue moves again at once, not after a lease; once each, in order."""
    async with webhook_receiver() as receiver:
        receiver.hold(after=ACKED_BEFORE_HOLD)
        async with instance(dsn, receiver) as first:
            ids = await insert_messages(db)
            posts = await receiver.wait_for(lambda posts: len(posts) > ACKED_BEFORE_HOLD)
            await first.stop(signal.SIGKILL)
        in_flight = posts[ACKED_BEFORE_HOLD].message["id"]
        receiver.release()
        restarted = time.monotonic()
        async with instance(dsn, receiver):
            healthy_after = time.monotonic() - restarted
            # Bounded well below the old lease: without the lock this waits
            # for OLD_LEASE_S and fails.
            posts = await receiver.wait_for(
                lambda posts: len(posts) > ACKED_BEFORE_HOLD + 1, timeout=2 * TIMEOUT
            )
            moved_after = posts[ACKED_BEFORE_HOLD + 1].at - restarted
            posts = await receiver.wait_for(
                lambda posts: len({p.message["id"] for p in posts}) == MESSAGES
            )
            await until_async(lambda: all_sent(db, ids), what="every message marked sent")
        check_sent_once_in_order(receiver.snapshot(), ids, in_flight)
        print(
            f"\nrestart after SIGKILL: queue moving {moved_after:.2f}s after the restart "
            f"(process start included; /healthz answered 200 after {healthy_after:.2f}s); "
            f"old lease {OLD_LEASE_S:.0f}s"
        )


async def test_a_second_instance_takes_over_at_once_when_the_sender_is_killed(dsn, db):
    """Two instances, the lock holder SIGKILLed mid-POST: the other sends the rest at once; once each, in order."""
    async with webhook_receiver() as receiver:
        receiver.hold(after=ACKED_BEFORE_HOLD)
        async with instance(dsn, receiver) as one, instance(dsn, receiver) as two:
            ids = await insert_messages(db)
            posts = await receiver.wait_for(lambda posts: len(posts) > ACKED_BEFORE_HOLD)
            _, name = await holder_backend(db)
            sender, standby = (one, two) if name.endswith(f":{one.process.pid}") else (two, one)
            assert name.endswith(f":{sender.process.pid}"), name
            in_flight = posts[ACKED_BEFORE_HOLD].message["id"]
            receiver.release()
            killed = time.monotonic()
            await sender.stop(signal.SIGKILL)
            posts = await receiver.wait_for(
                lambda posts: len(posts) > ACKED_BEFORE_HOLD + 1, timeout=TIMEOUT
            )
            took_over_after = posts[ACKED_BEFORE_HOLD + 1].at - killed
            await receiver.wait_for(lambda posts: len({p.message["id"] for p in posts}) == MESSAGES)
            await until_async(lambda: all_sent(db, ids), what="every message marked sent")
            _, name = await holder_backend(db)
            assert name.endswith(f":{standby.process.pid}"), name
            assert standby.process.returncode is None
        check_sent_once_in_order(receiver.snapshot(), ids, in_flight)
        print(
            f"\nsecond instance after SIGKILL of the sender: next POST {took_over_after * 1000:.0f}ms "
            f"after the kill; old lease {OLD_LEASE_S:.0f}s"
        )


async def test_a_sender_cut_off_from_postgres_loses_the_lock_and_sends_no_more(dsn, db):
    """The sender's lock session terminated mid-POST: the other instance sends at once; the cut one never sends again in parallel."""
    async with webhook_receiver() as receiver:
        receiver.hold(after=ACKED_BEFORE_HOLD)
        async with instance(dsn, receiver) as one, instance(dsn, receiver) as two:
            ids = await insert_messages(db)
            posts = await receiver.wait_for(lambda posts: len(posts) > ACKED_BEFORE_HOLD)
            pid, name = await holder_backend(db)
            cut, other = (one, two) if name.endswith(f":{one.process.pid}") else (two, one)
            in_flight = posts[ACKED_BEFORE_HOLD].message["id"]
            cut_at = time.monotonic()
            assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
            # The other instance posts the row in flight again while the cut
            # one is still waiting for its answer.
            posts = await receiver.wait_for(
                lambda posts: len(posts) > ACKED_BEFORE_HOLD + 1, timeout=TIMEOUT
            )
            took_over_after = posts[ACKED_BEFORE_HOLD + 1].at - cut_at
            assert posts[ACKED_BEFORE_HOLD + 1].message["id"] == in_flight
            receiver.release()
            await receiver.wait_for(lambda posts: len({p.message["id"] for p in posts}) == MESSAGES)
            await until_async(lambda: all_sent(db, ids), what="every message marked sent")
            _, name = await holder_backend(db)
            assert name.endswith(f":{other.process.pid}"), name
            await cut.wait_for_output("lost the sender lock", timeout=TIMEOUT)
        # The row in flight went twice (the cut POST and the takeover's): no other.
        check_sent_once_in_order(receiver.snapshot(), ids, in_flight)
        print(f"\nlock session terminated: next POST {took_over_after * 1000:.0f}ms after the cut")


async def test_a_live_sender_with_a_slow_receiver_keeps_the_lock(dsn, db):
    """A receiver that answers late (not a failure): the other instance only waits in the lock's queue; nothing is posted twice."""
    async with webhook_receiver() as receiver:
        receiver.hold(after=ACKED_BEFORE_HOLD)
        async with instance(dsn, receiver) as one, instance(dsn, receiver) as two:
            ids = await insert_messages(db)
            await receiver.wait_for(lambda posts: len(posts) > ACKED_BEFORE_HOLD)
            pid, _ = await holder_backend(db)

            async def other_waits() -> bool:
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid) "
                    "WHERE l.locktype = 'advisory' AND NOT l.granted "
                    "AND a.datname = current_database()"
                )
                return bool(waiting == 1)

            await until_async(other_waits, what="the other instance in the lock's queue")
            receiver.release()
            await receiver.wait_for(lambda posts: len({p.message["id"] for p in posts}) == MESSAGES)
            await until_async(lambda: all_sent(db, ids), what="every message marked sent")
            assert (await holder_backend(db))[0] == pid
            assert one.process.returncode is None and two.process.returncode is None
        assert [post.message["id"] for post in receiver.snapshot()] == ids
