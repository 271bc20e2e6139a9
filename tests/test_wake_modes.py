"""
Wake-ups under load (docs/deployment.md): the polling lease turns the
triggers' NOTIFYs off while notifyd reads anyway, and nothing committed is
left waiting when it is turned back on.

The absence of a NOTIFY is proven with a later sentinel NOTIFY: a listener
receives notifications in commit order, so whatever the commits before the
sentinel sent has arrived when the sentinel does. The fallback probe is set
to 60 s wherever a test proves a prompt delivery, so the probe cannot be
what delivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from notifyd.db import Database
from notifyd.metrics import registry_for, render_metrics
from notifyd.pacing import READ_BURST, Mode

from .conftest import TIMEOUT, RunningDaemon, insert
from .processes import free_port
from .test_chaos import ResumingClient, _kill_listeners, assert_exactly_the_committed_rows, settle

NOW_MS = "floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
# The fallback that must not be what delivers in these tests.
SLOW_PROBE = {"probe_interval_s": 60.0, "probe_timeout_s": 5.0}


async def set_lease(connection: asyncpg.Connection, ms_from_now: int) -> None:
    """The lease's end, ``ms_from_now`` from now (negative: over)."""
    await connection.execute(
        f"SELECT setval('notifyd_poll_lease', greatest(0, {NOW_MS} + $1::bigint))", ms_from_now
    )


class Notifications:
    """A LISTEN on notifyd's channel from a connection of the test's own."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.payloads: asyncio.Queue[str] = asyncio.Queue()
        self._sentinels = 0

    def _take(self, connection: object, pid: int, channel: str, payload: str) -> None:
        self.payloads.put_nowait(payload)

    async def before_sentinel(self, sender: asyncpg.Connection) -> list[str]:
        """
        What arrived, in order, from commits made before this call (the
        probes of running daemons left out).
        """
        self._sentinels += 1
        sentinel = f"sentinel-{self._sentinels}"
        await sender.execute("SELECT pg_notify('notifyd', $1)", sentinel)
        received = []
        while True:
            payload = await asyncio.wait_for(self.payloads.get(), TIMEOUT)
            if payload == sentinel:
                return [p for p in received if not p.startswith("probe:")]
            received.append(payload)


@pytest.fixture
async def notifications(dsn: str) -> AsyncIterator[Notifications]:
    connection = await asyncpg.connect(dsn)
    listening = Notifications(connection)
    await connection.add_listener("notifyd", listening._take)
    yield listening
    await connection.close()


def kinds(payloads: list[str]) -> list[str]:
    """
    What the triggers' notifications say, by kind: "r" (an insert carrying
    its rows), "m" (an insert that does not), "e" (read/delete events).
    """
    return [payload[:1] for payload in payloads]


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``condition`` until it holds, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_a_repeatable_read_transaction_sees_a_lease_cleared_after_it_began(
    db, dsn, notifications
):
    """Begun under a lease, lease cleared before its INSERT: its commit does NOTIFY."""
    await set_lease(db, 60_000)
    app = await asyncpg.connect(dsn)
    try:
        async with app.transaction(isolation="repeatable_read"):
            # The snapshot is taken here, with the lease in force.
            assert await app.fetchval(f"SELECT last_value > {NOW_MS} FROM notifyd_poll_lease")
            await set_lease(db, -1)
            # Not read through the snapshot: the transaction sees it cleared.
            assert not await app.fetchval(f"SELECT last_value > {NOW_MS} FROM notifyd_poll_lease")
            await insert(app, "alice", "under a cleared lease")
    finally:
        await app.close()
    assert kinds(await notifications.before_sentinel(db)) == ["r"]


async def test_a_repeatable_read_transaction_begun_before_a_lease_skips_its_notify(
    db, dsn, notifications
):
    """Begun with no lease, INSERT once one is in force: no NOTIFY at its commit."""
    app = await asyncpg.connect(dsn)
    try:
        async with app.transaction(isolation="serializable"):
            assert await app.fetchval("SELECT count(*) FROM t_message_real_time") == 0
            await set_lease(db, 60_000)
            await insert(app, "alice", "under a lease started later")
    finally:
        await app.close()
    assert await notifications.before_sentinel(db) == []


async def test_only_a_transactions_first_inserting_statement_carries_its_rows(
    db, dsn, notifications
):
    """
    Later statements name the transaction only, so that what a NOTIFY
    carries is every row its transaction inserted so far; a rollback to a
    savepoint takes the earlier rows back, and the next transaction starts
    afresh.
    """
    app = await asyncpg.connect(dsn)
    try:
        async with app.transaction():
            await insert(app, "alice", "first statement")
            await insert(app, "alice", "second statement")
        async with app.transaction():
            with contextlib.suppress(RuntimeError):
                async with app.transaction():
                    await insert(app, "alice", "rolled back")
                    raise RuntimeError("roll back to the savepoint")
            await insert(app, "alice", "first that stays")
        await insert(app, "alice", "a transaction of its own")
    finally:
        await app.close()
    assert kinds(await notifications.before_sentinel(db)) == ["r", "m", "r", "r"]


async def test_a_statement_under_a_lease_keeps_the_transactions_later_ones_from_carrying_rows(
    db, dsn, notifications
):
    """
    Its rows were not carried, so a later statement of the same transaction,
    after the lease, must not carry (and so claim) the transaction's rows.
    """
    await set_lease(db, 60_000)
    app = await asyncpg.connect(dsn)
    try:
        async with app.transaction():
            await insert(app, "alice", "under the lease")
            await set_lease(db, -1)
            await insert(app, "alice", "after it")
    finally:
        await app.close()
    assert kinds(await notifications.before_sentinel(db)) == ["m"]


async def test_a_table_flag_would_be_read_through_the_snapshot(db, dsn):
    """Why a sequence: a REPEATABLE READ transaction keeps a table row's old value."""
    await db.execute("CREATE TABLE flag (on_ boolean)")
    await db.execute("INSERT INTO flag VALUES (true)")
    app = await asyncpg.connect(dsn)
    try:
        async with app.transaction(isolation="repeatable_read"):
            assert await app.fetchval("SELECT on_ FROM flag")
            await db.execute("UPDATE flag SET on_ = false")
            assert await app.fetchval("SELECT on_ FROM flag"), "the snapshot's value"
    finally:
        await app.close()


async def test_no_trigger_notifies_while_a_lease_is_in_force_and_all_do_after(db, notifications):
    """Insert, update is_read and delete under a lease: no NOTIFY; once over, m and e again."""
    await set_lease(db, 60_000)
    message = await insert(db, "alice", "quiet")
    await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", message)
    await db.execute("DELETE FROM t_message_real_time WHERE id = $1", message)
    assert await notifications.before_sentinel(db) == []
    await set_lease(db, -1)
    message = await insert(db, "alice", "loud")
    await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", message)
    assert kinds(await notifications.before_sentinel(db)) == ["r", "e"]


async def test_renewing_the_lease_never_shortens_it_and_notifies(dsn, db, notifications):
    """set_lease sets now + ms unless a longer lease is in force; announce_lease sends 'poll'."""
    database = await Database.connect(dsn)
    try:
        lease = await database.set_lease(1000)
        await database.announce_lease()
        assert lease.in_force and 990 <= lease.until_ms - lease.now_ms <= 1000
        await set_lease(db, 30_000)
        longer = await database.set_lease(1000)
        await database.announce_lease()
        assert longer.until_ms - longer.now_ms > 20_000
    finally:
        await database.close()
    assert await notifications.before_sentinel(db) == ["poll", "poll"]


async def test_a_row_that_skipped_its_notify_and_commits_after_the_lease_is_delivered(
    dsn, db, start_daemon, open_client
):
    """Inserted under a lease, committed after it ended: draining delivers it, not the probe."""
    running = await start_daemon(wake="notify", **SLOW_PROBE)
    pacer = running.daemon.delivery.pacer
    client = await open_client(running.url("alice"))
    await set_lease(db, 1500)
    await db.execute("SELECT pg_notify('notifyd', 'poll')")  # as announce_lease does
    await wait_until(lambda: pacer.mode is Mode.POLLING, "polling")
    app = await asyncpg.connect(dsn)
    try:
        transaction = app.transaction()
        await transaction.start()
        await insert(app, "alice", "committed while draining")
        await wait_until(lambda: pacer.mode is not Mode.POLLING, "the lease's end", 2 * TIMEOUT)
        await transaction.commit()
    finally:
        await app.close()
    await client.messages_until("committed while draining")
    await wait_until(lambda: pacer.mode is Mode.NOTIFY, "notify mode again")


async def test_an_instance_waiting_for_notify_hears_of_another_instances_lease(
    dsn, start_daemon, open_client
):
    """A renewal wakes a wake=notify instance: rows inserted under the lease reach it."""
    listening = await start_daemon(wake="notify", **SLOW_PROBE)
    client = await open_client(listening.url("bob"))
    app = await Database.connect(dsn)
    try:
        for n in range(3):
            await app.set_lease(1000)  # what a busy instance does
            await app.announce_lease()
            # No wait on the other instance: only the renewal's NOTIFY wakes it.
            await app.insert_message(to_user="bob", title=f"under lease {n}", content="c")
            await client.messages_until(f"under lease {n}")
    finally:
        await app.close()
    assert listening.daemon.delivery.pacer.mode is not Mode.NOTIFY


async def _load(dsn: str, stop: asyncio.Event, commits: Counter[str]) -> None:
    """Single-row INSERT transactions, one after another, counted."""
    connection = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            await insert(connection, "load", f"load {commits['load']}")
            commits["load"] += 1
    finally:
        await connection.close()


async def test_a_busy_instance_turns_notifies_off_and_a_notify_instance_still_delivers(
    dsn, db, start_daemon, open_client, notifications
):
    """A (low poll_above) takes the lease under load; B (wake=notify) delivers every row."""
    busy = await start_daemon(poll_above=20, **SLOW_PROBE)
    quiet = await start_daemon(wake="notify", **SLOW_PROBE)
    client = await open_client(quiet.url("bob"))
    stop = asyncio.Event()
    commits = Counter[str]()
    load = asyncio.create_task(_load(dsn, stop, commits))
    try:
        await wait_until(lambda: busy.daemon.stats.polling_leases > 0, "a polling lease")
        await notifications.before_sentinel(db)  # drop what came before the lease
        before = commits["load"]
        modes = Counter[Mode]()
        for n in range(20):
            await insert(db, "bob", f"bob {n}")
            received = await client.messages_until(f"bob {n}")
            assert [m["title"] for m in received] == [f"bob {n}"]
            modes[quiet.daemon.delivery.pacer.mode] += 1
        during = await notifications.before_sentinel(db)
        committed = commits["load"] - before + 20
    finally:
        stop.set()
        await load
    # Under the lease the commits stopped notifying (all but those around a
    # renewal that came late on a busy machine).
    assert modes[Mode.POLLING] > 0, modes
    assert committed > 40
    inserts = kinds(during).count("r") + kinds(during).count("m")
    assert inserts < committed / 4, (inserts, committed)
    vitals = busy.daemon.vitals()
    assert vitals.wake is not None and vitals.wake.setting == "auto"
    assert quiet.daemon.vitals().health_report()["wake"]["setting"] == "notify"
    text = render_metrics(registry_for(busy.daemon.vitals, busy.daemon.stats)).decode()
    modes_exported = re.findall(r'notifyd_wake_mode\{mode="(\w+)"\} ([01])\.0', text)
    assert sorted(m for m, _ in modes_exported) == ["draining", "notify", "polling"]
    assert [v for _, v in modes_exported].count("1") == 1
    leases = re.search(r"notifyd_polling_leases_total ([0-9.]+)", text)
    assert leases is not None and float(leases.group(1)) >= 1
    rows = re.search(r"notifyd_rows_read_total ([0-9.]+)", text)
    assert rows is not None and float(rows.group(1)) >= committed


async def test_modes_switching_under_load_and_a_killed_listener_lose_nothing(
    dsn, admin_dsn, start_daemon
):
    """Bursts and lulls, long transactions across switches, LISTEN killed at switches: exact."""
    rng = random.Random(15)
    users = [f"user{i:02d}" for i in range(12)]
    auto_port, notify_port = free_port(), free_port()
    busy = await start_daemon(port=auto_port, poll_above=40, **SLOW_PROBE)
    quiet = await start_daemon(port=notify_port, wake="notify", **SLOW_PROBE)
    instances: list[RunningDaemon] = [busy, quiet]
    clients = [
        ResumingClient(user, busy.token(user), (auto_port, notify_port)[i % 2])
        for i, user in enumerate(users)
    ]
    client_tasks = [asyncio.create_task(c.run()) for c in clients]
    deadline = time.monotonic() + 3 * TIMEOUT
    while not all(c.cursor is not None for c in clients):
        assert time.monotonic() < deadline, "clients did not connect"
        await asyncio.sleep(0.02)

    switches = Counter[str]()
    stop = asyncio.Event()
    burst = asyncio.Event()

    async def write(number: int) -> None:
        connection = await asyncpg.connect(dsn)
        sequence = 0
        try:
            while not stop.is_set():
                sequence += 1
                async with connection.transaction():
                    await insert(connection, rng.choice(users), f"w{number}-{sequence}")
                    if rng.random() < 0.03:  # a long transaction, likely across a switch
                        await asyncio.sleep(rng.uniform(0.3, 1.5))
                # Load pacing: flat out in a burst, a few a second in a lull.
                await asyncio.sleep(0 if burst.is_set() else rng.uniform(0.2, 0.4))
        finally:
            await connection.close()

    async def kill_at_switches() -> None:
        seen = busy.daemon.delivery.pacer.mode
        while not stop.is_set():
            mode = busy.daemon.delivery.pacer.mode
            if mode is not seen:
                switches[f"{seen}->{mode}"] += 1
                seen = mode
                if rng.random() < 0.4:
                    switches["listener killed"] += 1
                    await _kill_listeners(admin_dsn)
            await asyncio.sleep(0.002)

    writers = [asyncio.create_task(write(n)) for n in range(3)]
    killer = asyncio.create_task(kill_at_switches())
    pacer = busy.daemon.delivery.pacer
    try:
        for _ in range(4):
            burst.set()
            await wait_until(lambda: pacer.mode is Mode.POLLING, "a lease under a burst")
            await asyncio.sleep(rng.uniform(0.3, 1.0))  # load shaping: polling under load
            burst.clear()
            await wait_until(lambda: pacer.mode is Mode.NOTIFY, "notify after a lull")
    finally:
        stop.set()
        await asyncio.gather(*writers, killer)

    committed = await settle(dsn, users, clients, client_tasks, 3 * TIMEOUT)

    print(f"switches={dict(switches)} rows={sum(map(len, committed.values()))}")
    assert busy.daemon.stats.polling_leases >= 4, switches
    assert sum(map(len, committed.values())) > 300, "too little traffic to prove anything"
    assert switches["listener killed"] >= 1, switches
    assert any(k.endswith("->notify") for k in switches), switches
    assert_exactly_the_committed_rows(clients, committed)
    assert all(not i.daemon.failed for i in instances)


async def test_commits_one_at_a_time_never_queue_at_the_notify_lock_so_no_lease_starts(
    dsn, db, start_daemon, open_client
):
    """
    One writer flat out (hundreds of commits a second, above the old fixed
    threshold): the lock is looked at, never seen queued, and NOTIFY stays.
    """
    instance = await start_daemon(**SLOW_PROBE)
    client = await open_client(instance.url("bob"))
    stats = instance.daemon.stats
    stop = asyncio.Event()
    commits = Counter[str]()
    load = asyncio.create_task(_load(dsn, stop, commits))
    try:
        await wait_until(lambda: stats.notify_lock_samples >= 20, "20 looks at the NOTIFY lock")
    finally:
        stop.set()
        await load
    await insert(db, "bob", "after the load")
    await client.messages_until("after the load")
    assert stats.notify_lock_waiting_samples == 0
    assert stats.polling_leases == 0
    assert instance.daemon.delivery.pacer.mode is Mode.NOTIFY


async def test_writers_queueing_at_the_notify_lock_start_a_lease_and_every_row_arrives(
    dsn, db, admin_dsn, start_daemon, open_client
):
    """
    A commit that holds the NOTIFY lock while it waits for a synchronous
    standby that never answers queues every other notifying commit behind
    it: the instance sees the queue, takes the lease, and once the stuck
    commit is let go every row reaches its session once.
    """
    instance = await start_daemon(**SLOW_PROBE)
    client = await open_client(instance.url("bob"))
    stats = instance.daemon.stats
    admin = await asyncpg.connect(admin_dsn)
    stuck = await asyncpg.connect(dsn)
    stop = asyncio.Event()
    commits = Counter[str]()
    loads: list[asyncio.Task[None]] = []
    commit: asyncio.Task[str] | None = None
    await admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody_answers'")
    await admin.execute("SELECT pg_reload_conf()")
    try:
        # One writer: it cannot queue behind itself, only behind the stuck commit.
        loads = [asyncio.create_task(_load(dsn, stop, commits))]
        await wait_until(lambda: stats.notify_lock_samples > 0, "a look at the NOTIFY lock")
        await stuck.execute("SET synchronous_commit = on")
        pid = stuck.get_server_pid()
        deadline = time.monotonic() + TIMEOUT
        while True:  # the checkpointer publishes the standby setting a moment after the reload
            assert time.monotonic() < deadline, "no commit waited for the synchronous standby"
            commit = asyncio.create_task(insert(stuck, "bob", "held the lock"))
            waiting = None
            while not commit.done() and waiting != "SyncRep":
                waiting = await admin.fetchval(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid
                )
            if waiting == "SyncRep":
                break
            await commit
        pacer = instance.daemon.delivery.pacer
        await wait_until(lambda: pacer.mode is Mode.POLLING, "a lease taken for the queue")
        # The lock is still held, yet a new commit goes through (it skips
        # its NOTIFY) and reaches its session by polling.
        async with asyncio.timeout(TIMEOUT):
            await insert(db, "bob", "under the lease")
            await client.messages_until("under the lease")
        assert not commit.done()
        assert stats.notify_lock_waiting_samples >= 3
    finally:
        await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.execute("SELECT pg_cancel_backend($1)", stuck.get_server_pid())
        if commit is not None:
            with contextlib.suppress(asyncpg.PostgresError):
                await commit
        stop.set()
        await asyncio.gather(*loads)
        await stuck.close()
        await admin.close()
    await insert(db, "bob", "after the queue")
    titles = [m["title"] for m in await client.messages_until("after the queue")]
    assert titles.count("held the lock") == 1 and titles[-1] == "after the queue"
    assert stats.polling_leases >= 1


async def test_close_commits_are_read_at_once_while_the_read_budget_lasts(
    db, start_daemon, open_client
):
    """
    With a 2 s batch interval, commits a moment apart are still each read at
    once (the budget's burst), not held back behind the one before.
    """
    instance = await start_daemon(wake="notify", batch_interval_ms=2000, **SLOW_PROBE)
    client = await open_client(instance.url("bob"))
    budget = instance.daemon.delivery.read_budget
    # The start-up's own reads (the join, LISTEN coming up) spent some; a full
    # budget leaves one read spare for the expiry sweep's, which may fall in.
    await wait_until(lambda: budget.available(time.monotonic()) >= READ_BURST, "the budget")
    for n in range(READ_BURST - 1):
        await insert(db, "bob", f"close {n}")
        async with asyncio.timeout(1.0):  # half the interval: no wait for the budget
            await client.messages_until(f"close {n}")


async def test_a_stream_of_notifies_costs_at_most_one_read_per_batch_interval(
    dsn, db, start_daemon, open_client
):
    """
    Commits back to back for a while with a 100 ms batch interval: past the
    burst, each read serves every commit of its interval, and all arrive.
    """
    instance = await start_daemon(wake="notify", batch_interval_ms=100, **SLOW_PROBE)
    client = await open_client(instance.url("bob"))
    stats = instance.daemon.stats
    reads_before, started = stats.window_reads, time.monotonic()
    stop = asyncio.Event()
    commits = Counter[str]()
    load = asyncio.create_task(_load(dsn, stop, commits))
    try:
        await wait_until(lambda: commits["load"] >= 300, "300 commits")
    finally:
        stop.set()
        await load
    elapsed = time.monotonic() - started
    reads = stats.window_reads - reads_before
    await insert(db, "bob", "after the stream")
    await client.messages_until("after the stream")
    # Every commit is read by a window (rows pushed ahead too, within
    # moments).
    await wait_until(lambda: stats.rows_read >= commits["load"], "every commit read")
    assert reads <= READ_BURST + elapsed / 0.1 + 2, (reads, elapsed, commits["load"])
