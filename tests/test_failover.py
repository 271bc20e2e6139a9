"""
Database failover: a primary with a streaming standby made by
``pg_basebackup -R`` (:mod:`tests.standby`), ``notifyd serve`` as a
subprocess with a ``NOTIFYD_DSN`` naming both hosts the libpq way
(``target_session_attrs=read-write``), real WebSocket sessions and a writer
committing across the failover. The primary stops, the standby is promoted,
and notifyd must find the new primary by itself.

What counts as "committed" is what the promoted standby holds: a row the
standby never received is lost by the database, not by notifyd, and the
tests check sessions against the new primary's table. The time from the
promotion to the first delivery is printed (``pytest -s``), never asserted
beyond a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import asyncpg
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from notifyd import failover
from notifyd.cursor import Snapshot
from notifyd.db import DATABASE_ERRORS, Database, schema_sql
from notifyd.demo.embedded import EmbeddedPostgres
from notifyd.exceptions import DatabaseError
from notifyd.queries import advance_xact_id
from notifyd.recall import Recall

from .conftest import SECRET, TIMEOUT, with_database
from .pgproxy import switching_proxy
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

DATABASE = "app"
USERS = ("ann", "bob", "cid")
# Probe and retry settings short enough that a failover is noticed quickly.
_SERVE_SETTINGS = {
    "NOTIFYD_JWT_SECRET": SECRET,
    "NOTIFYD_RECONNECT_MAX_S": "0.5",
    "NOTIFYD_PROBE_INTERVAL_S": "1",
    "NOTIFYD_PROBE_TIMEOUT_S": "2",
    "NOTIFYD_POLL_INTERVAL_S": "0.5",
}
_INSERT = "INSERT INTO t_message_real_time (to_user, title, content) VALUES ($1, $2, 'c')"
# Within this, everything must be back after the promotion (measured: well under a second).
_FAILOVER_DEADLINE_S = 6 * TIMEOUT
_POLL_S = 0.05


@dataclass
class Recorder:
    """
    A WebSocket session that records every frame it receives, with the time.
    """

    user: str
    ws: ClientConnection
    frames: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, port: int, user: str, since: str | None = None) -> Recorder:
        url = f"ws://127.0.0.1:{port}/ws/message?token={mint(user)}"
        if since is not None:
            url += f"&since={quote(since, safe='')}"
        recorder = cls(user, await connect(url, open_timeout=TIMEOUT))
        recorder.task = asyncio.create_task(recorder._read())
        await recorder.wait_for(lambda frame: frame["event"] == "hello")
        return recorder

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for text in self.ws:
                self.frames.append((time.monotonic(), json.loads(text)))
                self.changed.set()

    async def wait_for(self, predicate: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        """
        The first frame so far matching ``predicate``, waiting for it.
        """
        deadline = time.monotonic() + timeout
        while True:
            for _, frame in self.frames:
                if predicate(frame):
                    return frame
            assert self.task is not None and not self.task.done(), (
                f"{self.user}'s session closed: {self.ws.close_code} {self.ws.close_reason}"
            )
            self.changed.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{self.user}: no matching frame within {timeout}s"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    def messages(self) -> list[dict[str, Any]]:
        return [frame for _, frame in self.frames if frame["event"] == "message"]

    def hello(self) -> dict[str, Any]:
        return next(frame for _, frame in self.frames if frame["event"] == "hello")

    async def close(self) -> None:
        await self.ws.close()
        if self.task is not None:
            await self.task


class Writer:
    """
    An application committing one row at a time, round robin over the users,
    through the multi-host DSN; it reconnects after any error, as an
    application using libpq's failover would.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.acknowledged: list[str] = []
        self.acknowledged_at: dict[str, float] = {}
        # Rows whose COMMIT got no answer: on the new primary or not.
        self.unknown: list[str] = []
        self.errors = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._count = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait_acknowledged(self, count: int, timeout: float = _FAILOVER_DEADLINE_S) -> None:
        """
        Wait until ``count`` more rows than now were acknowledged.
        """
        target = len(self.acknowledged) + count
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < target:
            assert self._task is not None and not self._task.done(), "the writer died"
            assert time.monotonic() < deadline, f"the writer is stuck ({self.errors} errors)"
            await asyncio.sleep(_POLL_S)

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        connection: asyncpg.Connection | None = None
        try:
            while not self._stop.is_set():
                try:
                    if connection is None:
                        connection = await asyncpg.connect(self._dsn, timeout=2)
                    title = f"w{self._count}"
                    user = USERS[self._count % len(USERS)]
                    self._count += 1
                    try:
                        await connection.execute(_INSERT, user, title)
                    except DATABASE_ERRORS:
                        self.unknown.append(title)
                        raise
                    self.acknowledged.append(title)
                    self.acknowledged_at[title] = time.monotonic()
                    await asyncio.sleep(0.005)
                except (*DATABASE_ERRORS, TimeoutError):
                    self.errors += 1
                    if connection is not None:
                        connection.terminate()
                        connection = None
                    await asyncio.sleep(_POLL_S)
        finally:
            if connection is not None:
                connection.terminate()


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


async def _wait_for_readyz(port: int, status: int, server: NotifydProcess, timeout: float) -> float:
    """
    Poll /readyz until it answers ``status``; returns when (monotonic).
    """
    deadline = time.monotonic() + timeout
    while (answer := await asyncio.to_thread(_readyz, port)) != status:
        assert server.process.returncode is None, server.output()
        assert time.monotonic() < deadline, f"/readyz stayed {answer}, not {status}"
        await asyncio.sleep(_POLL_S)
    return time.monotonic()


async def _rows_by_user(dsn: str) -> dict[str, list[str]]:
    """
    Each user's titles in the database at ``dsn``, in seq order.
    """
    connection = await asyncpg.connect(dsn, timeout=TIMEOUT)
    try:
        records = await connection.fetch(
            "SELECT to_user, title FROM t_message_real_time ORDER BY seq"
        )
    finally:
        await connection.close()
    rows: dict[str, list[str]] = {user: [] for user in USERS}
    for record in records:
        rows[record["to_user"]].append(record["title"])
    return rows


@dataclass
class Failover:
    """
    A replicated pair with notifyd's schema in ``app``, and ``notifyd serve``
    on it through the two-host DSN.
    """

    pair: ReplicatedPair
    server: NotifydProcess
    port: int
    dsn: str

    def database_dsn(self, host_dsn: str) -> str:
        return with_database(host_dsn, DATABASE)


@contextlib.asynccontextmanager
async def _failover(*, synchronous: bool = False) -> AsyncIterator[Failover]:
    async with replicated_pair(synchronous=synchronous) as pair:
        await app_database(pair, DATABASE, TIMEOUT)
        dsn = pair.dsn(DATABASE)
        port = free_port()
        env = serve_env(dsn, port, **_SERVE_SETTINGS)
        async with running_notifyd("serve", env=env) as server:
            await wait_until_healthy(port, server, path="/readyz")
            yield Failover(pair, server, port, dsn)


def _assert_exactly_once(user: str, received: list[str], committed: list[str]) -> None:
    duplicates = [title for title, n in Counter(received).items() if n > 1]
    assert not duplicates, f"{user} got {duplicates} twice"
    missing = [title for title in committed if title not in set(received)]
    assert not missing, f"{user} never got {missing}"
    extra = [title for title in received if title not in set(committed)]
    assert not extra, f"{user} got {extra}, which the new primary does not hold"


async def test_failover_to_promoted_standby_delivers_every_replicated_row_once_and_resumes_cursors() -> (
    None
):
    """
    Primary stopped, standby promoted, writer running throughout: notifyd
    finds the new primary through the two-host DSN, /readyz is 503 during
    the outage and 200 after, every live session gets every row the new
    primary holds exactly once, and a cursor taken before the failover
    resumes after it with nothing missing and nothing twice.
    """
    async with _failover() as setup:
        live = [await Recorder.open(setup.port, user) for user in USERS for _ in range(2)]
        leaving = [await Recorder.open(setup.port, user) for user in USERS]
        writer = Writer(setup.dsn)
        writer.start()
        try:
            await writer.wait_acknowledged(60)
            # Sessions that go away before the failover, keeping their cursor.
            cursors: dict[str, tuple[str, list[str]]] = {}
            for session in leaving:
                await session.wait_for(lambda frame: frame["event"] == "message")
                await session.close()
                before = [frame["title"] for frame in session.messages()]
                cursors[session.user] = (session.messages()[-1]["cursor"], before)
            await writer.wait_acknowledged(30)

            stopping = time.monotonic()
            await asyncio.to_thread(setup.pair.primary.stop, "fast")
            outage_seen = await _wait_for_readyz(setup.port, 503, setup.server, TIMEOUT)
            delivered_before_promotion = sum(len(s.messages()) for s in live)
            await asyncio.to_thread(setup.pair.promote)
            promoted = time.monotonic()
            ready_again = await _wait_for_readyz(
                setup.port, 200, setup.server, _FAILOVER_DEADLINE_S
            )
            await writer.wait_acknowledged(60)
        finally:
            await writer.stop()
        assert outage_seen < promoted

        # One last row per user, then everything up to it must be there.
        assert setup.pair.standby is not None
        new_primary = setup.database_dsn(setup.pair.standby.dsn)
        app = await asyncpg.connect(new_primary, timeout=TIMEOUT)
        try:
            for user in USERS:
                await app.execute(_INSERT, user, f"end-{user}")
        finally:
            await app.close()
        for session in live:
            await session.wait_for(lambda frame, u=session.user: frame.get("title") == f"end-{u}")
        committed = await _rows_by_user(new_primary)
        for session in live:
            _assert_exactly_once(
                session.user,
                [frame["title"] for frame in session.messages()],
                committed[session.user],
            )

        resumed = []
        for user, (cursor, before) in cursors.items():
            session = await Recorder.open(setup.port, user, since=cursor)
            resumed.append(session)
            await session.wait_for(lambda frame, u=user: frame.get("title") == f"end-{u}")
            assert session.hello()["recovered"] is True, session.hello()
            _assert_exactly_once(
                user, before + [frame["title"] for frame in session.messages()], committed[user]
            )

        first_delivery = min(
            arrived
            for session in live
            for arrived, frame in session.frames
            if frame["event"] == "message" and arrived > promoted
        )
        # The baseline, in the same run: commit to delivery before the outage.
        steady = sorted(
            arrived - writer.acknowledged_at[frame["title"]]
            for session in live
            for arrived, frame in session.frames
            if frame["event"] == "message"
            and frame["title"] in writer.acknowledged_at
            and arrived < stopping
        )
        first_new = min(
            (at, title) for title, at in writer.acknowledged_at.items() if at > promoted
        )[1]
        first_new_delivered = min(
            arrived
            for session in live
            for arrived, frame in session.frames
            if frame.get("title") == first_new
        )
        lost = set(writer.acknowledged) - {t for titles in committed.values() for t in titles}
        print(
            f"\nfailover: promotion to first delivery {1000 * (first_delivery - promoted):.0f} ms, "
            f"to /readyz 200 {1000 * (ready_again - promoted):.0f} ms; the first commit on "
            f"the new primary delivered "
            f"{1000 * (first_new_delivered - writer.acknowledged_at[first_new]):.1f} ms after "
            f"it was acknowledged, {1000 * (writer.acknowledged_at[first_new] - promoted):.0f} ms "
            "after the promotion; commit to delivery "
            f"before the outage {1000 * steady[len(steady) // 2]:.1f} ms (median); "
            f"{len(writer.acknowledged)} rows acknowledged, {len(lost)} of them not on the "
            f"new primary; {delivered_before_promotion} deliveries before the promotion; "
            + (await setup.server.wait_for_output("repaired in", timeout=TIMEOUT)).split(
                'msg="', 1
            )[-1]
        )
        for session in live + resumed:
            await session.close()


async def test_synchronous_replication_keeps_every_acknowledged_row_through_a_primary_crash() -> (
    None
):
    """
    With synchronous_standby_names and synchronous_commit=on, a primary that
    crashes (immediate stop, no shutdown checkpoint) loses no acknowledged
    commit: after the promotion every acknowledged row reaches its sessions
    exactly once.
    """
    async with _failover(synchronous=True) as setup:
        live = [await Recorder.open(setup.port, user) for user in USERS]
        writer = Writer(setup.dsn)
        writer.start()
        try:
            await writer.wait_acknowledged(60)
            await asyncio.to_thread(setup.pair.primary.stop, "immediate")
            await _wait_for_readyz(setup.port, 503, setup.server, TIMEOUT)
            await asyncio.to_thread(setup.pair.promote)
            await _wait_for_readyz(setup.port, 200, setup.server, _FAILOVER_DEADLINE_S)
            await writer.wait_acknowledged(30)
        finally:
            await writer.stop()
        assert setup.pair.standby is not None
        new_primary = setup.database_dsn(setup.pair.standby.dsn)
        app = await asyncpg.connect(new_primary, timeout=TIMEOUT)
        try:
            for user in USERS:
                await app.execute(_INSERT, user, f"end-{user}")
        finally:
            await app.close()
        committed = await _rows_by_user(new_primary)
        held = {title for titles in committed.values() for title in titles}
        assert set(writer.acknowledged) <= held, (
            f"acknowledged but lost: {sorted(set(writer.acknowledged) - held)}"
        )
        for session in live:
            await session.wait_for(lambda frame, u=session.user: frame.get("title") == f"end-{u}")
            _assert_exactly_once(
                session.user,
                [frame["title"] for frame in session.messages()],
                committed[session.user],
            )
            await session.close()


async def test_check_accepts_a_two_host_dsn_before_and_after_a_failover() -> None:
    """
    `notifyd check` with the libpq two-host DSN finds the primary, and after
    the primary stops and the standby is promoted, finds the new one.
    """
    async with _failover() as setup:
        env = serve_env(setup.dsn, free_port(), **_SERVE_SETTINGS)
        before = await run_cli("check", env=env, timeout=3 * TIMEOUT)
        assert before.code == 0, (before.stdout, before.stderr)

        await asyncio.to_thread(setup.pair.primary.stop, "fast")
        during = await run_cli("check", env=env, timeout=3 * TIMEOUT)
        assert during.code != 0, during.stdout
        assert "Traceback" not in during.stdout + during.stderr, (during.stdout, during.stderr)

        await asyncio.to_thread(setup.pair.promote)
        after = await run_cli("check", env=env, timeout=3 * TIMEOUT)
        assert after.code == 0, (after.stdout, after.stderr)


_INSERT_RETURNING = _INSERT + " RETURNING xact_id::text::bigint"
_CLUSTER = "SELECT system_identifier::text FROM pg_control_system()"
_NEXT_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"


async def _wait_for_backend(dsn: str, application_name: str, timeout: float) -> None:
    """
    Poll pg_stat_activity at ``dsn`` until a backend of that name is there.
    """
    connection = await asyncpg.connect(dsn, timeout=timeout)
    try:
        deadline = time.monotonic() + timeout
        while not await connection.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = $1",
            application_name,
        ):
            assert time.monotonic() < deadline, f"no backend {application_name!r} within {timeout}s"
            await asyncio.sleep(_POLL_S)
    finally:
        await connection.close()


async def _until_rows_read(port: int, rows: int) -> None:
    """
    Wait until the instance on ``port`` has read ``rows`` rows in windows.
    """

    def read() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as reply:
            text = reply.read().decode()
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("notifyd_rows_read_total")
        )

    deadline = time.monotonic() + TIMEOUT
    while await asyncio.to_thread(read) < rows:
        assert time.monotonic() < deadline, f"instance on {port} never read {rows} rows"
        await asyncio.sleep(_POLL_S)


async def test_a_failover_that_lost_transactions_pushes_and_resumes_the_rows_under_reused_ids() -> (
    None
):
    """
    The standby misses the old primary's last transactions (it was down
    while they committed, and notifyd pushed their rows), the primary
    crashes, the standby is promoted and hands their transaction ids out
    again. Rows committed under those ids before notifyd reaches the new
    primary, and one in a transaction still open then, reach every live
    session of two instances exactly once, and sessions resuming from
    cursors made before the failover (some inside the lost tail) get them
    too.
    """
    async with contextlib.AsyncExitStack() as stack:
        setup = await stack.enter_async_context(_failover())
        second_port = free_port()
        second = await stack.enter_async_context(
            running_notifyd("serve", env=serve_env(setup.dsn, second_port, **_SERVE_SETTINGS))
        )
        await wait_until_healthy(second_port, second, path="/readyz")
        servers = (setup.server, second)
        pair = setup.pair
        assert pair.standby is not None
        old_primary = setup.database_dsn(pair.primary.dsn)
        new_primary = setup.database_dsn(pair.standby.dsn)
        live = [
            await Recorder.open(port, user) for port in (setup.port, second_port) for user in USERS
        ]
        leave_early = [await Recorder.open(setup.port, user) for user in USERS]
        leave_late = [await Recorder.open(setup.port, user) for user in USERS]
        cursors: list[tuple[str, str, list[str]]] = []

        async def leave(sessions: list[Recorder], prefix: str) -> None:
            for session in sessions:
                await session.wait_for(lambda f, u=session.user: f.get("title") == f"{prefix}-{u}")
                await session.close()
                titles = [frame["title"] for frame in session.messages()]
                cursors.append((session.user, session.messages()[-1]["cursor"], titles))

        app = await asyncpg.connect(old_primary, timeout=TIMEOUT)
        try:
            for user in USERS:
                await app.execute(_INSERT, user, f"before-{user}")
            await leave(leave_early, "before")
            await wait_until_replayed(pair.primary.dsn, pair.standby.dsn, TIMEOUT)
            await asyncio.to_thread(pair.standby.stop, "fast")
            # The lost tail: transactions on other tables too (their ids
            # come back as well), then rows that notifyd pushes.
            lost_ids = [
                await app.fetchval("SELECT pg_current_xact_id()::text::bigint") for _ in range(5)
            ]
            for user in USERS:
                lost_ids.append(await app.fetchval(_INSERT_RETURNING, user, f"lost-{user}"))
            await leave(leave_late, "lost")
            for session in live:
                await session.wait_for(lambda f, u=session.user: f.get("title") == f"lost-{u}")
            # Their windows have read them too (rows pushed ahead are
            # confirmed within moments): each watermark calls their ids
            # finished, which is what makes the repair wait below.
            for port in (setup.port, second_port):
                await _until_rows_read(port, 2 * len(USERS))
        finally:
            await app.close()

        # notifyd frozen, so that rows commit on the new primary before it gets there.
        for server in servers:
            server.process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.to_thread(pair.primary.stop, "immediate")
            await asyncio.to_thread(pair.standby.start)
            await asyncio.to_thread(pair.promote)
            new = await asyncpg.connect(new_primary, timeout=TIMEOUT)
            straggler = await asyncpg.connect(new_primary, timeout=TIMEOUT)
            reused_ids = [
                await new.fetchval(_INSERT_RETURNING, user, f"reused-{user}") for user in USERS
            ]
            open_transaction = straggler.transaction()
            await open_transaction.start()
            reused_ids.append(
                await straggler.fetchval(_INSERT_RETURNING, USERS[0], f"straggler-{USERS[0]}")
            )
        finally:
            for server in servers:
                server.process.send_signal(signal.SIGCONT)
        try:
            # What this test is about: the new primary handed the lost ids out again.
            assert all(xid <= max(lost_ids) for xid in reused_ids), (reused_ids, lost_ids)
            # The repair waits for the transaction still open under a reused id.
            await _wait_for_backend(new_primary, "notifyd history repair", _FAILOVER_DEADLINE_S)
            await open_transaction.commit()
            for user in USERS:
                await new.execute(_INSERT, user, f"end-{user}")
        finally:
            await straggler.close()
            await new.close()

        committed = await _rows_by_user(new_primary)
        lost = {f"lost-{user}" for user in USERS}
        assert not lost & {title for titles in committed.values() for title in titles}
        for session in live:
            await session.wait_for(
                lambda f, u=session.user: f.get("title") == f"end-{u}", _FAILOVER_DEADLINE_S
            )
            received = [frame["title"] for frame in session.messages()]
            _assert_exactly_once(
                session.user, [t for t in received if t not in lost], committed[session.user]
            )
        for user, cursor, before in cursors:
            session = await Recorder.open(setup.port, user, since=cursor)
            await session.wait_for(lambda f, u=user: f.get("title") == f"end-{u}")
            assert session.hello()["recovered"] is True, session.hello()
            replayed = [frame["title"] for frame in session.messages()]
            _assert_exactly_once(
                user, [t for t in before + replayed if t not in lost], committed[user]
            )
            await session.close()
        # Both repaired; rows were moved (which instance moved which is a
        # matter of timing: what must hold is asserted above).
        for server in servers:
            await server.wait_for_output("repaired in", timeout=TIMEOUT)
        moved = [
            line
            for server in servers
            for line in server.output().splitlines()
            if "repaired in" in line
        ]
        assert any(re.search(r"their [1-9][0-9]* rows and events moved", line) for line in moved)
        print("\nlossy failover: " + " | ".join(line.split('msg="', 1)[-1] for line in moved))
        for session in live:
            await session.close()


async def test_a_server_that_will_not_tell_its_timeline_is_served_with_one_warning(
    db, login_role, caplog
) -> None:
    """
    Where the timeline cannot be read (here pg_control_system() is refused
    to notifyd's role, as some managed services do), notifyd connects and
    reads all the same, and says once that failovers will not be repaired.
    """
    await db.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    dsn = await login_role("IN ROLE pg_read_all_data")
    database = await Database.connect(dsn, size=2)
    try:
        base = await database.snapshot()
        await db.execute(_INSERT, "ann", "told")
        window = await database.window(base, limit=10)
        assert [row["title"] for row in window.rows] == ["told"]
    finally:
        await database.close()
    assert database.lineage.unknowable is not None
    assert "pg_control_system" in database.lineage.unknowable
    warnings = [
        r for r in caplog.records if "cannot tell the database's timeline" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings


async def test_a_dsn_that_leads_to_another_cluster_starts_delivery_again_without_moving_rows(
    dsn, db, start_daemon, open_client, caplog
) -> None:
    """
    The address in the DSN moves to another cluster (another system
    identifier, not a promoted standby): notifyd says so, touches none of
    that cluster's rows, and pushes what is committed there from then on.
    """
    database = urlsplit(dsn).path.lstrip("/")
    other = EmbeddedPostgres()
    await asyncio.to_thread(other.start)
    try:
        admin = await asyncpg.connect(other.dsn, timeout=TIMEOUT)
        try:
            await admin.execute(f'CREATE DATABASE "{database}"')
        finally:
            await admin.close()
        other_db = await asyncpg.connect(with_database(other.dsn, database), timeout=TIMEOUT)
        try:
            await other_db.execute(schema_sql())
            already = await other_db.fetchval(
                _INSERT + " RETURNING xact_id::text", "ann", "there before"
            )
            other_next = await other_db.fetchval(_NEXT_XID)
            async with switching_proxy(dsn) as (url, switch):
                running = await start_daemon(dsn=url)
                client = await open_client(running.url("ann"))
                # The first cluster's ids run well ahead of the other's, as
                # a repair would take ids to pass them.
                while await db.fetchval(_NEXT_XID) < other_next + 1000:
                    await db.execute(advance_xact_id(other_next + 1000))
                await db.execute(_INSERT, "ann", "first cluster")
                await client.messages_until("first cluster")
                switch.to(other.dsn)
                lineage = running.daemon.db.lineage
                delivery = running.daemon.delivery
                deadline = time.monotonic() + _FAILOVER_DEADLINE_S
                while (
                    lineage.changed is not None
                    or lineage.known is None
                    or not (
                        delivery.watermark is not None
                        and lineage.known.cluster != (await db.fetchval(_CLUSTER))
                    )
                ):
                    assert time.monotonic() < deadline, "never reached the other cluster"
                    await asyncio.sleep(_POLL_S)
                await other_db.execute(_INSERT, "ann", "second cluster")
                await client.messages_until("second cluster")
            assert (
                await other_db.fetchval(
                    "SELECT xact_id::text FROM t_message_real_time WHERE title = 'there before'"
                )
                == already
            )
            # No ids taken there to pass the first cluster's snapshots.
            assert await other_db.fetchval(_NEXT_XID) < other_next + 100
        finally:
            await other_db.close()
    finally:
        await asyncio.to_thread(other.cleanup)
    assert any("another cluster now" in r.getMessage() for r in caplog.records)


async def test_a_history_too_far_behind_to_repair_is_named_and_what_follows_is_pushed(
    start_daemon, open_client, monkeypatch, caplog
) -> None:
    """
    The promoted standby's next transaction id lies further below notifyd's
    snapshots than a repair takes ids (here the bound lowered to 500, with
    2,000 ids lost): notifyd takes none, says so in one error line, and
    pushes what is committed on the new primary from then on.
    """
    monkeypatch.setattr(failover, "MAX_ADVANCE", 500)
    async with replicated_pair() as pair:
        assert pair.standby is not None
        old_primary, _ = await app_database(pair, DATABASE, TIMEOUT)
        app = await asyncpg.connect(old_primary, timeout=TIMEOUT)
        try:
            running = await start_daemon(dsn=pair.dsn(DATABASE), reconnect_max_s=0.2)
            client = await open_client(running.url("ann"))
            await app.execute(_INSERT, "ann", "before")
            await client.messages_until("before")
            await wait_until_replayed(pair.primary.dsn, pair.standby.dsn, TIMEOUT)
            await asyncio.to_thread(pair.standby.stop, "fast")
            start = await app.fetchval(_NEXT_XID)
            await app.execute(advance_xact_id(start + 2000))
            await app.execute(_INSERT, "ann", "lost")
            await client.messages_until("lost")
        finally:
            await app.close()
        lineage = running.daemon.db.lineage
        before = lineage.known
        await asyncio.to_thread(pair.primary.stop, "immediate")
        await asyncio.to_thread(pair.standby.start)
        await asyncio.to_thread(pair.promote)
        deadline = time.monotonic() + _FAILOVER_DEADLINE_S
        while lineage.known == before or lineage.changed is not None:
            assert time.monotonic() < deadline, "the new primary's history was never accepted"
            await asyncio.sleep(_POLL_S)
        new = await asyncpg.connect(with_database(pair.standby.dsn, DATABASE), timeout=TIMEOUT)
        try:
            await new.execute(_INSERT, "ann", "after")
            # None taken to pass the old snapshots.
            assert await new.fetchval(_NEXT_XID) < start + 100
        finally:
            await new.close()
        await client.messages_until("after")
    errors = [r for r in caplog.records if "below the snapshots read before" in r.getMessage()]
    assert len(errors) == 1, errors


async def test_a_repair_that_cannot_get_the_repair_lock_fails_and_takes_no_ids(
    dsn, start_daemon, monkeypatch
):
    """
    Another instance holding the repair lock past the timeout: the repair
    fails with one DatabaseError (delivery retries it next round) and takes
    no transaction ids beside the other instance's repair.
    """
    monkeypatch.setattr(failover, "_LOCK_WAIT_S", 0.3)
    running = await start_daemon()
    recall = Recall()
    recall.note(0.0, Snapshot(100, 100, frozenset()), Snapshot(101, 101, frozenset()), [])
    other = await asyncpg.connect(dsn)
    try:
        await other.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", failover._LOCK)
        before = int(await other.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))
        # A watermark far ahead: a repair that went on would take ids up to it.
        ahead = Snapshot(before + 20_000, before + 20_000, frozenset())
        with pytest.raises(DatabaseError, match="another instance held"):
            await failover.repair(running.daemon.db, recall, ahead)
        after = int(await other.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))
        assert after - before < 100, (before, after)
    finally:
        await other.close()
