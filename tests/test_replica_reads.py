"""
Reads on a hot standby (NOTIFYD_READ_DSN), against a real streaming standby
made with pg_basebackup (:mod:`tests.standby`) and ``notifyd serve`` as a
subprocess: rows are read there, a wake-up that comes before the standby
replayed its commit waits for it, a user's own write shows in that user's
next history, a standby that lags past the bound or is gone is bypassed for
the primary and used again, bad values of the setting are refused, cursors
made on one server resume on the other, and a chaos run with replay paused
and resumed delivers every committed row exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from notifyd.replica import parse_lsn

from .conftest import SECRET, TIMEOUT
from .processes import (
    NotifydProcess,
    free_port,
    mint,
    run_cli,
    running_notifyd,
    serve_env,
    wait_until_healthy,
)
from .standby import ReplicatedPair, app_database, replicated_pair, wait_until_replayed
from .test_chaos import ResumingClient, assert_exactly_the_committed_rows, settle
from .test_failover import Recorder

DATABASE = "app"
_POLL_S = 0.02
_INSERT = "INSERT INTO t_message_real_time (to_user, title, content) VALUES ($1, $2, 'c')"


@dataclass
class Served:
    pair: ReplicatedPair
    server: NotifydProcess
    port: int
    primary: str
    standby: str

    def metric(self, name: str) -> float:
        """
        The metric's value; with workers, the sum of every worker's series.
        """
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        values = [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith((name + " ", name + "{"))
        ]
        if not values:
            raise AssertionError(f"{name} not on /metrics")
        return sum(values)

    async def wait_metric(self, name: str, predicate: object, timeout: float = TIMEOUT) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = await asyncio.to_thread(self.metric, name)
            if predicate(value):  # type: ignore[operator]
                return value
            assert time.monotonic() < deadline, f"{name} stayed {value}"
            await asyncio.sleep(_POLL_S)

    async def standby_sql(self, query: str) -> object:
        connection = await asyncpg.connect(self.standby, timeout=TIMEOUT)
        try:
            return await connection.fetchval(query)
        finally:
            await connection.close()

    async def insert(self, user: str, title: str) -> None:
        connection = await asyncpg.connect(self.primary, timeout=TIMEOUT)
        try:
            await connection.execute(_INSERT, user, title)
        finally:
            await connection.close()


@contextlib.asynccontextmanager
async def _served(max_lag_ms: int = 1000, **settings: str) -> AsyncIterator[Served]:
    async with replicated_pair() as pair:
        primary, standby = await app_database(pair, DATABASE, TIMEOUT)
        port = free_port()
        env = serve_env(
            primary,
            port,
            NOTIFYD_JWT_SECRET=SECRET,
            NOTIFYD_READ_DSN=standby,
            NOTIFYD_READ_MAX_LAG_MS=str(max_lag_ms),
            NOTIFYD_POLL_INTERVAL_S="0.5",
            **settings,
        )
        async with running_notifyd("serve", env=env) as server:
            await wait_until_healthy(port, server, path="/readyz")
            served = Served(pair, server, port, primary, standby)
            yield served


async def _standby_table_reads(served: Served) -> int:
    value = await served.standby_sql(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables "
        "WHERE relname = 't_message_real_time'"
    )
    return int(value)  # type: ignore[call-overload]


async def test_rows_are_read_on_the_standby_and_a_paused_replay_falls_back_to_the_primary() -> None:
    # Rows are not pushed ahead here: each must come through its window read.
    async with _served(max_lag_ms=800, NOTIFYD_PUSH_AHEAD="false") as served:
        ann = await Recorder.open(served.port, "ann")
        await served.wait_metric("notifyd_read_replica_in_use", lambda v: v == 1)
        before = await _standby_table_reads(served)
        await served.insert("ann", "on-standby")
        await ann.wait_for(lambda f: f.get("title") == "on-standby")
        # The table was read on the standby (its statistics are flushed
        # within a second or so).
        deadline = time.monotonic() + TIMEOUT
        while await _standby_table_reads(served) <= before:
            assert time.monotonic() < deadline, "no read of the table on the standby"
            await asyncio.sleep(0.1)
        assert served.metric("notifyd_read_replica_fallbacks_total") == 0

        # Replay paused: the row comes anyway, through the primary, once the
        # bound has passed; never lost.
        await served.standby_sql("SELECT pg_wal_replay_pause()")
        await served.insert("ann", "while-paused")
        await ann.wait_for(lambda f: f.get("title") == "while-paused")
        assert served.metric("notifyd_read_replica_fallbacks_total") >= 1
        assert served.metric("notifyd_read_replica_in_use") == 0

        # Replay resumed: the standby is used again.
        await served.standby_sql("SELECT pg_wal_replay_resume()")
        await served.wait_metric("notifyd_read_replica_in_use", lambda v: v == 1)
        await served.insert("ann", "after-resume")
        await ann.wait_for(lambda f: f.get("title") == "after-resume")
        titles = [m["title"] for m in ann.messages()]
        assert titles == ["on-standby", "while-paused", "after-resume"]
        await ann.close()


async def test_a_wake_up_before_the_standby_replayed_the_commit_waits_for_replay() -> None:
    async with _served(max_lag_ms=60_000, NOTIFYD_PUSH_AHEAD="false") as served:
        ann = await Recorder.open(served.port, "ann")
        await served.wait_metric("notifyd_read_replica_in_use", lambda v: v == 1)
        await served.standby_sql("SELECT pg_wal_replay_pause()")
        started = await served.standby_sql("SELECT clock_timestamp()")
        await served.insert("ann", "early-wake")
        # Delivery has its NOTIFY and is asking the standby how far it has
        # replayed, again and again.
        connection = await asyncpg.connect(served.standby, timeout=TIMEOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not await connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND query LIKE '%pg_last_wal_replay_lsn%' AND state_change > $1)",
                started,
            ):
                assert time.monotonic() < deadline, "delivery is not waiting for replay"
                await asyncio.sleep(_POLL_S)
        finally:
            await connection.close()
        assert not ann.messages()
        await served.standby_sql("SELECT pg_wal_replay_resume()")
        await ann.wait_for(lambda f: f.get("title") == "early-wake")
        assert served.metric("notifyd_read_replica_fallbacks_total") == 0
        await ann.close()


async def test_a_transaction_open_across_windows_read_on_the_standby_is_delivered_at_its_commit() -> (
    None
):
    # A standby's own snapshot lists no transaction in progress: a window
    # bounded by it would take the open transaction for committed and never
    # read its row. Bounded by the primary's snapshot, the row comes.
    async with _served(max_lag_ms=60_000) as served:
        ann = await Recorder.open(served.port, "ann")
        await served.wait_metric("notifyd_read_replica_in_use", lambda v: v == 1)
        held = await asyncpg.connect(served.primary, timeout=TIMEOUT)
        try:
            transaction = held.transaction()
            await transaction.start()
            await held.execute(_INSERT, "ann", "held-open")
            # Later transactions commit and are read on the standby while
            # that one is still open.
            for title in ("after-1", "after-2"):
                await served.insert("ann", title)
                await ann.wait_for(lambda f, title=title: f.get("title") == title)  # type: ignore[misc]
            await transaction.commit()
        finally:
            await held.close()
        await ann.wait_for(lambda f: f.get("title") == "held-open")
        assert [m["title"] for m in ann.messages()] == ["after-1", "after-2", "held-open"]
        assert served.metric("notifyd_read_replica_fallbacks_total") == 0
        await ann.close()


async def test_a_join_right_after_a_wal_segment_switch_is_replayed_on_the_standby_at_once() -> None:
    # After pg_switch_wal() the primary's insert position lies past the next
    # segment's header, where a standby's replay never gets until another
    # record comes: the target is the segment boundary. No probe NOTIFY
    # writes that record meanwhile.
    async with _served(max_lag_ms=800, NOTIFYD_PROBE_INTERVAL_S="3600") as served:
        standby = served.pair.standby
        assert standby is not None
        ann = await Recorder.open(served.port, "ann")
        await served.wait_metric("notifyd_read_replica_in_use", lambda v: v == 1)
        await served.insert("ann", "before-switch")
        cursor = (await ann.wait_for(lambda f: f.get("title") == "before-switch"))["cursor"]
        await ann.close()
        connection = await asyncpg.connect(served.primary, timeout=TIMEOUT)
        try:
            head = await connection.fetchrow(
                "SELECT pg_switch_wal() IS NOT NULL AS switched,"
                " pg_current_wal_insert_lsn()::text AS lsn,"
                " pg_size_bytes(current_setting('wal_segment_size')) AS segment"
            )
        finally:
            await connection.close()
        assert head is not None and parse_lsn(head["lsn"]) % head["segment"] == 40
        # tests/standby.py waits for the same boundary, and returns as soon
        # as the switch is replayed: not only once the next record (the
        # primary's running-transactions record, within 15 s) comes.
        await wait_until_replayed(served.pair.primary.dsn, standby.dsn, timeout=2.0)
        # Its replay is read on the standby, up to the join's window end.
        ann = await Recorder.open(served.port, "ann", since=cursor)
        assert ann.hello()["recovered"] is True and not ann.messages()
        await ann.close()
        assert served.metric("notifyd_read_replica_fallbacks_total") == 0
        assert served.metric("notifyd_read_replica_in_use") == 1


async def test_a_message_marked_read_is_never_unread_in_the_history_right_after() -> None:
    # The bound is long enough that delivery, waiting for the standby to
    # replay the read's event, does not bypass it before the history is
    # asked for: only the user's own write position keeps that history off
    # the standby, which has not replayed the read.
    async with _served(max_lag_ms=5000) as served:
        ann = await Recorder.open(served.port, "ann")
        await served.wait_metric("notifyd_read_replica_in_use", lambda v: v == 1)
        await served.insert("ann", "to-read")
        message = await ann.wait_for(lambda f: f.get("title") == "to-read")
        await served.standby_sql("SELECT pg_wal_replay_pause()")
        # A session's frames are answered in order: the history right after
        # the read has committed.
        await ann.ws.send(json.dumps({"action": "read", "ids": [message["id"]], "id": 1}))
        await ann.ws.send(json.dumps({"action": "history", "id": 2}))
        history = await ann.wait_for(lambda f: f["event"] == "history")
        assert [(m["id"], m["isRead"]) for m in history["messages"]] == [(message["id"], "1")]
        await served.standby_sql("SELECT pg_wal_replay_resume()")
        await ann.close()


async def test_a_stopped_standby_is_bypassed_and_cursors_resume_across_both_servers() -> None:
    async with _served(max_lag_ms=800) as served:
        standby = served.pair.standby
        assert standby is not None
        ann = await Recorder.open(served.port, "ann")
        await served.wait_metric("notifyd_read_replica_in_use", lambda v: v == 1)
        await served.insert("ann", "s1")
        cursor = (await ann.wait_for(lambda f: f.get("title") == "s1"))["cursor"]
        await ann.close()

        # Made on the standby, resumed on the primary.
        await asyncio.to_thread(standby.stop)
        await served.insert("ann", "p1")
        await served.insert("ann", "p2")
        ann = await Recorder.open(served.port, "ann", since=cursor)
        await ann.wait_for(lambda f: f.get("title") == "p2")
        assert ann.hello()["recovered"] is True
        assert [m["title"] for m in ann.messages()] == ["p1", "p2"]
        await served.insert("ann", "p3")
        cursor = (await ann.wait_for(lambda f: f.get("title") == "p3"))["cursor"]
        assert served.metric("notifyd_read_replica_in_use") == 0
        await ann.close()

        # Made on the primary, resumed on the standby once it is back.
        await asyncio.to_thread(standby.start)
        await served.insert("ann", "s2")
        await served.wait_metric("notifyd_read_replica_in_use", lambda v: v == 1)
        ann = await Recorder.open(served.port, "ann", since=cursor)
        await ann.wait_for(lambda f: f.get("title") == "s2")
        assert [m["title"] for m in ann.messages()] == ["s2"]
        assert ann.hello()["recovered"] is True
        await ann.close()


async def test_a_read_dsn_that_is_the_primary_another_cluster_or_nothing_is_said_at_start() -> None:
    async with replicated_pair() as pair, replicated_pair() as other:
        primary, standby = await app_database(pair, DATABASE, TIMEOUT)
        _, foreign = await app_database(other, DATABASE, TIMEOUT)
        nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/{DATABASE}"
        for read_dsn, said in (
            (primary, "NOTIFYD_READ_DSN is not a hot standby"),
            (foreign, "NOTIFYD_READ_DSN is a standby of another cluster"),
        ):
            env = serve_env(primary, free_port(), NOTIFYD_JWT_SECRET=SECRET)
            env["NOTIFYD_READ_DSN"] = read_dsn
            served = await run_cli("serve", env=env)
            assert served.code == 1 and said in served.stderr, served.stderr
            assert "Traceback" not in served.stderr
            checked = await run_cli("check", env=env)
            assert checked.code == 1 and said in checked.stdout + checked.stderr
        env = serve_env(primary, free_port(), NOTIFYD_JWT_SECRET=SECRET)
        env["NOTIFYD_READ_DSN"] = nowhere
        checked = await run_cli("check", env=env)
        assert checked.code == 1
        assert "NOTIFYD_READ_DSN cannot be reached" in checked.stdout, checked.stdout
        env["NOTIFYD_READ_DSN"] = standby
        checked = await run_cli("check", env=env)
        assert checked.code == 0, checked.stdout
        assert "ok: NOTIFYD_READ_DSN is a hot standby of the same cluster" in checked.stdout
        # Unreachable at start: it serves, reading on the primary.
        port = free_port()
        env = serve_env(primary, port, NOTIFYD_JWT_SECRET=SECRET, NOTIFYD_READ_DSN=nowhere)
        async with running_notifyd("serve", env=env) as server:
            await wait_until_healthy(port, server, path="/readyz")
            ann = await Recorder.open(port, "ann")
            connection = await asyncpg.connect(primary, timeout=TIMEOUT)
            try:
                await connection.execute(_INSERT, "ann", "via-primary")
            finally:
                await connection.close()
            await ann.wait_for(lambda f: f.get("title") == "via-primary")
            await ann.close()
            assert "NOTIFYD_READ_DSN cannot be reached" in server.output()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_chaos_with_replay_paused_and_resumed_delivers_every_committed_row_once(
    workers: str,
) -> None:
    """
    With one process or two workers sharing the port (a user's sessions on
    either), replay paused and resumed while a writer commits and sessions
    drop and resume: every committed row reaches every session once.
    """
    rng = random.Random(18)
    users = [f"u{i}" for i in range(6)]
    async with _served(max_lag_ms=300, NOTIFYD_WORKERS=workers) as served:
        clients = [
            ResumingClient(users[i % len(users)], mint(users[i % len(users)]), served.port)
            for i in range(24)
        ]
        tasks = [asyncio.create_task(client.run()) for client in clients]
        # Every client has its first cursor before the first row: a fresh
        # session is not sent what committed before it.
        deadline = time.monotonic() + TIMEOUT
        while not all(client.cursor is not None for client in clients):
            assert time.monotonic() < deadline, "clients did not connect"
            await asyncio.sleep(_POLL_S)
        stop = asyncio.Event()

        async def write() -> None:
            connection = await asyncpg.connect(served.primary, timeout=TIMEOUT)
            try:
                n = 0
                while not stop.is_set():
                    async with connection.transaction():
                        for _ in range(rng.randint(1, 3)):
                            await connection.execute(_INSERT, rng.choice(users), f"c{n}")
                            n += 1
                    await asyncio.sleep(0.003)  # pacing the writer, not synchronisation
            finally:
                await connection.close()

        writer = asyncio.create_task(write())
        for _ in range(6):
            await served.standby_sql("SELECT pg_wal_replay_pause()")
            await asyncio.sleep(rng.uniform(0.05, 0.6))  # how long replay stays paused
            await served.standby_sql("SELECT pg_wal_replay_resume()")
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            for client in rng.sample(clients, 3):
                client.drop()
        stop.set()
        await writer
        committed = await settle(served.primary, users, clients, tasks, timeout=6 * TIMEOUT)
        assert_exactly_the_committed_rows(clients, committed)
        assert served.metric("notifyd_read_replica_fallbacks_total") >= 1
