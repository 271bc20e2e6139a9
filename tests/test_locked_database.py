"""
A database that refuses writes (``default_transaction_read_only``) or an
application holding ``ACCESS EXCLUSIVE`` on the message table: what a
client asks that must write (``read``, ``unread``, ``delete``,
``read_all``) or read the table (``history``) is answered ``unavailable``
within the action's bounds (a free pool connection within 1 s, a lock
within 1 s, the statement within 3 s), not after the lock; nothing waits
behind it (tasks, pool waiters); pushes of what is readable go on; and all
of it works again by itself once the database does.

Real PostgreSQL, a real in-process daemon, real WebSocket clients. The
times measured are printed (run with ``-s``), never asserted: the
assertions are on order (answered while the lock is still held).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from .conftest import TIMEOUT, insert

# In an order where each changes something (so each is answered, even by
# events, when it finally runs).
ACTIONS: list[dict[str, Any]] = [
    {"action": "history", "before": None, "limit": 20, "type": None, "unread_only": False},
    {"action": "read", "ids": []},
    {"action": "unread", "ids": []},
    {"action": "read_all"},
    {"action": "delete", "ids": []},
]
SESSIONS = 20
# As long as the application holds its lock (an ALTER TABLE, say).
LOCK_S = 8.0


async def answer_to(client: Any, request_id: str, timeout: float = 3 * TIMEOUT) -> dict[str, Any]:
    """
    The next frame answering ``request_id``: an error or history echoing
    it, or the event a change to the inbox causes (which has no id).
    """
    deadline = time.monotonic() + timeout
    while True:
        frame = await client.recv(max(0.01, deadline - time.monotonic()))
        if frame.get("id") == request_id or frame["event"] in ("read", "deleted"):
            return frame


@contextlib.asynccontextmanager
async def table_locked(dsn: str) -> AsyncIterator[None]:
    """
    An application transaction holding ACCESS EXCLUSIVE on the message
    table for LOCK_S seconds, or until the block ends if that is sooner.
    """
    locker = await asyncpg.connect(dsn)
    done = asyncio.Event()

    async def hold() -> None:
        async with locker.transaction():
            await locker.execute("LOCK TABLE t_message_real_time IN ACCESS EXCLUSIVE MODE")
            locked.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), LOCK_S)

    locked = asyncio.Event()
    holder = asyncio.create_task(hold())
    try:
        await locked.wait()
        yield
    finally:
        done.set()
        await holder
        await locker.close()


async def lock_still_held(db: asyncpg.Connection) -> bool:
    held = await db.fetchval(
        "SELECT count(*) FROM pg_locks WHERE relation = 't_message_real_time'::regclass "
        "AND mode = 'AccessExclusiveLock' AND granted"
    )
    return bool(held == 1)


def pool_waiters(running: Any) -> int:
    return len(running.daemon.db.pool._pool._queue._getters)


async def test_under_a_table_lock_every_writing_action_and_history_answer_unavailable_before_it_ends(
    daemon, open_client, db, dsn
):
    """ACCESS EXCLUSIVE held by the app: read, unread, delete, read_all and history say unavailable while it is held."""
    message = await insert(db, "alice", "before the lock")
    alice = await open_client(daemon.url("alice"))
    took, answers = {}, []
    async with table_locked(dsn):
        for n, action in enumerate(ACTIONS):
            request = {**action, "id": f"q{n}"}
            if "ids" in request:
                request["ids"] = [message]
            started = time.monotonic()
            await alice.send(request)
            answers.append(await answer_to(alice, f"q{n}"))
            took[action["action"]] = time.monotonic() - started
        held = await lock_still_held(db)
    print(
        f"\nunder a {LOCK_S:.0f} s table lock, answered in: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in took.items())
    )
    assert held
    assert [(a["event"], a.get("code")) for a in answers] == [("error", "unavailable")] * len(
        ACTIONS
    ), answers
    # And by itself again once the lock is gone.
    await alice.send({"action": "read", "ids": [message], "id": "after"})
    while (frame := await alice.recv())["event"] != "read":
        assert frame["event"] != "error", frame
    assert frame["ids"] == [message]
    await alice.send({**ACTIONS[0], "id": "h"})
    assert (await answer_to(alice, "h"))["event"] == "history"


async def test_many_sessions_acting_under_a_table_lock_leave_nothing_waiting(
    daemon, open_client, db, dsn
):
    """SESSIONS sessions send read during the lock: all answered while it is held, no task or pool waiter left behind."""
    messages = [await insert(db, f"user{n}", "before the lock") for n in range(SESSIONS)]
    clients = [await open_client(daemon.url(f"user{n}")) for n in range(SESSIONS)]
    peak = {"waiters": 0, "tasks": 0}
    sampling = True

    async def sample() -> None:
        while sampling:
            peak["waiters"] = max(peak["waiters"], pool_waiters(daemon))
            peak["tasks"] = max(peak["tasks"], len(asyncio.all_tasks()))
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    async with table_locked(dsn):
        # Counted once the lock holder and the sampler run: only the
        # daemon's tasks can change it from here.
        tasks_before = len(asyncio.all_tasks())
        started = time.monotonic()
        for n, client in enumerate(clients):
            await client.send({"action": "read", "ids": [messages[n]], "id": f"r{n}"})
        answers = [await answer_to(client, f"r{n}") for n, client in enumerate(clients)]
        all_answered = time.monotonic() - started
        waiting_now = pool_waiters(daemon)
        tasks_now = len(asyncio.all_tasks())
        held = await lock_still_held(db)
    sampling = False
    await sampler
    print(
        f"\n{SESSIONS} sessions' reads under the lock: all answered in {all_answered:.2f}s; "
        f"pool waiters peak {peak['waiters']}, after the answers {waiting_now}; "
        f"tasks before {tasks_before}, peak {peak['tasks']}, after the answers {tasks_now}"
    )
    assert held
    assert {answer.get("code") for answer in answers} == {"unavailable"}
    assert waiting_now == 0
    # The sessions' handlers are back to waiting for frames: no task more.
    assert tasks_now <= tasks_before


async def _notifyd_backends(db: asyncpg.Connection) -> list[int]:
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    )
    return [row["pid"] for row in rows]


async def test_a_read_only_database_keeps_pushing_answers_writes_unavailable_and_recovers_by_itself(
    daemon, open_client, db, dsn
):
    """default_transaction_read_only on: pushes go on, read says unavailable at once; off again: read works with no restart."""
    name = await db.fetchval("SELECT current_database()")
    message = await insert(db, "alice", "before")
    alice = await open_client(daemon.url("alice"))
    await db.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    try:
        # New sessions are read-only: make notifyd's sessions new ones.
        for pid in await _notifyd_backends(db):
            await db.execute("SELECT pg_terminate_backend($1)", pid)
        # The app's own (older) session still writes: the push goes on.
        await insert(db, "alice", "while read-only")
        await alice.messages_until("while read-only")
        started = time.monotonic()
        await alice.send({"action": "read", "ids": [message], "id": "ro"})
        answer = await answer_to(alice, "ro")
        took = time.monotonic() - started
        assert (answer["event"], answer["code"]) == ("error", "unavailable")
    finally:
        await db.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
    print(f"\nread on a read-only database answered unavailable in {took:.2f}s")
    # Writable again: the next read works without anything restarted.
    await alice.send({"action": "read", "ids": [message], "id": "rw"})
    while (frame := await alice.recv())["event"] != "read":
        assert frame.get("id") != "rw", frame
    assert frame["ids"] == [message]
