"""
Chaos: writers, 50 users and their clients, while Postgres restarts, the
listener is killed, notifyd restarts and clients drop. In the end every
client holds exactly the committed rows of its user, each once.

Seeded (``NOTIFYD_CHAOS_SEED``) and bounded in time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from urllib.parse import quote

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .conftest import TIMEOUT, RunningDaemon
from .processes import free_port

USERS = [f"user{i:02d}" for i in range(50)]
WRITERS = 4
CHAOS_SECONDS = float(os.environ.get("NOTIFYD_CHAOS_SECONDS", "12"))
SEED = int(os.environ.get("NOTIFYD_CHAOS_SEED", "20261126"))


class ResumingClient:
    """
    One user's client: reconnects with its last cursor until told to stop.
    """

    def __init__(self, user: str, token: str, port: int) -> None:
        self.user = user
        self.token = token
        self.port = port
        self.cursor: str | None = None
        self.received: Counter[str] = Counter()
        self.titles: set[str] = set()
        self.problems: list[str] = []
        self.ws = None
        self.stopping = False

    async def run(self) -> None:
        while not self.stopping:
            url = f"ws://127.0.0.1:{self.port}/ws/message?token={self.token}"
            if self.cursor is not None:
                url += f"&since={quote(self.cursor)}"
            try:
                async with connect(url, open_timeout=2, close_timeout=1) as ws:
                    self.ws = ws
                    async for data in ws:
                        self._take(json.loads(data))
            except (OSError, ConnectionClosed, InvalidHandshake, InvalidStatus, TimeoutError):
                pass
            self.ws = None
            if not self.stopping:
                await asyncio.sleep(0.05)  # reconnect pacing, not synchronisation

    def _take(self, frame: dict) -> None:
        event = frame["event"]
        if event == "hello":
            if self.cursor is not None and frame.get("recovered") is not True:
                self.problems.append(f"resume not recovered: {frame}")
            if self.cursor is None:
                self.cursor = frame["cursor"]
        elif event == "message":
            assert frame["toUser"] == self.user
            self.received[frame["id"]] += 1
            self.titles.add(frame["title"])
            self.cursor = frame["cursor"]
        elif event == "resync":
            self.problems.append("resync")
            self.cursor = frame["cursor"]

    def drop(self) -> None:
        if self.ws is not None and self.ws.transport is not None:
            self.ws.transport.abort()


async def _writer(dsn: str, rng: random.Random, stop: asyncio.Event, number: int) -> None:
    connection = None
    sequence = 0
    while not stop.is_set():
        try:
            if connection is None:
                connection = await asyncpg.connect(dsn, timeout=2)
            async with connection.transaction():
                for _ in range(rng.randint(1, 3)):
                    sequence += 1
                    await connection.execute(
                        "INSERT INTO t_message_real_time (to_user, title) VALUES ($1, $2)",
                        rng.choice(USERS),
                        f"w{number}-{sequence}",
                    )
                if rng.random() < 0.2:
                    raise _Rollback
        except _Rollback:
            pass
        except Exception:  # the database is restarting: reconnect
            if connection is not None:
                connection.terminate()
            connection = None
            await asyncio.sleep(0.05)
        await asyncio.sleep(rng.uniform(0, 0.01))
    if connection is not None:
        await connection.close()


class _Rollback(Exception):
    pass


async def test_chaos_every_client_ends_with_exactly_the_committed_rows_of_its_user(
    cluster, start_daemon, dsn, admin_dsn
):
    """Restarts, kills and drops at random: received id sets equal committed rows, no duplicates."""
    if cluster is None:
        pytest.skip("needs the embedded cluster to restart it")
    rng = random.Random(SEED)
    port = free_port()
    running: RunningDaemon = await start_daemon(
        port=port, probe_interval_s=0.5, probe_timeout_s=1.0
    )
    clients = [ResumingClient(user, running.token(user), port) for user in USERS]
    client_tasks = [asyncio.create_task(c.run()) for c in clients]
    # Rows committed before a client's first hello are not its to receive:
    # start writing only once every client has a position.
    ready_by = time.monotonic() + 3 * TIMEOUT
    while not all(c.cursor is not None for c in clients):
        assert time.monotonic() < ready_by, "clients did not connect"
        await asyncio.sleep(0.02)
    stop_writing = asyncio.Event()
    writer_tasks = [
        asyncio.create_task(_writer(dsn, random.Random(rng.random()), stop_writing, n))
        for n in range(WRITERS)
    ]
    events = Counter()
    deadline = time.monotonic() + CHAOS_SECONDS
    schedule: list[str] = []
    try:
        while time.monotonic() < deadline or len(events) < 4:
            if not schedule:
                schedule = ["restart_postgres", "kill_listener", "restart_notifyd", "drop_clients"]
                rng.shuffle(schedule)
            await asyncio.sleep(rng.uniform(0.2, 1.0))  # chaos pacing
            action = schedule.pop()
            events[action] += 1
            if action == "restart_postgres":
                await asyncio.to_thread(cluster.restart)
            elif action == "kill_listener":
                await _kill_listeners(admin_dsn)
            elif action == "restart_notifyd":
                await running.daemon.stop()
                running = await start_daemon(port=port, probe_interval_s=0.5, probe_timeout_s=1.0)
            else:
                for client in rng.sample(clients, 10):
                    client.drop()
    finally:
        stop_writing.set()
        await asyncio.gather(*writer_tasks)

    committed = await settle(dsn, USERS, clients, client_tasks, 6 * TIMEOUT)

    assert sum(len(rows) for rows in committed.values()) > 300, (
        "too little traffic to prove anything"
    )
    assert len(events) == 4, events
    print(f"chaos seed={SEED} events={dict(events)} rows={sum(map(len, committed.values()))}")
    assert_exactly_the_committed_rows(clients, committed)


async def settle(
    dsn: str,
    users: list[str],
    clients: list[ResumingClient],
    client_tasks: list[asyncio.Task[None]],
    timeout: float,
) -> dict[str, set[str]]:
    """
    A last row per user; once every client has it, the clients stop.
    Returns every user's committed row ids.
    """
    app = await asyncpg.connect(dsn)
    try:
        await app.executemany(
            "INSERT INTO t_message_real_time (to_user, title) VALUES ($1, 'sentinel')",
            [(user,) for user in users],
        )
        committed: dict[str, set[str]] = {user: set() for user in users}
        for record in await app.fetch("SELECT id, to_user FROM t_message_real_time"):
            committed[record["to_user"]].add(record["id"])
    finally:
        await app.close()
    finish = time.monotonic() + timeout
    while not all("sentinel" in c.titles for c in clients):
        assert time.monotonic() < finish, "clients did not catch up"
        await asyncio.sleep(0.05)
    for client in clients:
        client.stopping = True
        client.drop()
    await asyncio.gather(*client_tasks)
    return committed


def assert_exactly_the_committed_rows(
    clients: list[ResumingClient], committed: dict[str, set[str]]
) -> None:
    """
    Every client saw no protocol problem and holds exactly its user's
    committed rows, each once.
    """
    for client in clients:
        assert not client.problems, (client.user, client.problems[:3])
        duplicates = [i for i, n in client.received.items() if n > 1]
        assert not duplicates, (client.user, duplicates[:3])
        missing = committed[client.user] - set(client.received)
        extra = set(client.received) - committed[client.user]
        assert not missing and not extra, (client.user, len(missing), len(extra))


async def _kill_listeners(admin_dsn: str) -> None:
    try:
        connection = await asyncpg.connect(admin_dsn, timeout=2)
    except Exception:
        return  # the database is down right now: nothing to kill
    try:
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%'"
        )
    finally:
        await connection.close()
