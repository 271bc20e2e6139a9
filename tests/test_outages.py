"""
Nothing lost across listener outages, database restarts, daemon crashes,
slow clients and dead peers.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import time
from urllib.parse import quote

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from notifyd.db import DATABASE_ERRORS
from notifyd.logs import line_handler

from .conftest import SECRET, TIMEOUT, insert
from .pgproxy import connection_cutting_proxy
from .processes import free_port, running_notifyd, serve_env, wait_until_listening

_LISTENER_QUERY = (
    "SELECT pid FROM pg_stat_activity WHERE query ILIKE 'LISTEN%' AND datname = current_database()"
)


async def _wait_until(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _terminate_listener(db) -> None:
    pids = await db.fetch(_LISTENER_QUERY)
    assert pids, "no LISTEN backend found"
    for record in pids:
        await db.execute("SELECT pg_terminate_backend($1)", record["pid"])


async def test_listener_terminated_while_committing_loses_nothing_and_keeps_sessions(
    daemon, open_client, db, dsn
):
    """pg_terminate_backend on the LISTEN connection mid-stream: the client gets every row, same socket."""
    client = await open_client(daemon.url("alice"))
    writer = await asyncpg.connect(dsn)
    listener = daemon.daemon.listener
    reconnects_before = listener.health.reconnects

    async def write() -> list[str]:
        return [await insert(writer, "alice", f"w{i}") for i in range(300)]

    writing = asyncio.create_task(write())
    await client.messages_until("w20")
    await _terminate_listener(db)
    ids = await writing
    await writer.close()

    async def reconnected() -> bool:
        return listener.health.reconnects > reconnects_before and listener.health.connected

    await _wait_until(reconnected, "the listener to reconnect")
    await insert(db, "alice", "after-reconnect")
    await client.messages_until("after-reconnect")
    received = client.frames
    got = [f["id"] for f in received if f["event"] == "message" and f["title"].startswith("w")]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    assert client.ws.close_code is None


async def test_delivery_continues_by_polling_while_listen_is_down(daemon, open_client, db):
    """With the LISTEN connection gone and not back, committed rows still arrive."""
    client = await open_client(daemon.url("alice"))
    daemon.daemon.listener._dsn = "postgresql://nobody@127.0.0.1:1/none"  # cannot reconnect
    await _terminate_listener(db)

    async def down() -> bool:
        return not daemon.daemon.listener.health.connected

    await _wait_until(down, "the listener to notice")
    await insert(db, "alice", "during-outage")
    assert [m["title"] for m in await client.messages_until("during-outage")] == ["during-outage"]


async def test_wedged_listen_connection_is_detected_by_the_probe_and_replaced(start_daemon, db):
    """A LISTEN connection that silently stops receiving is replaced within a probe cycle."""
    daemon = await start_daemon(probe_interval_s=0.2, probe_timeout_s=0.5)
    listener = daemon.daemon.listener
    await _wait_until(lambda: _true_async(listener.health.connected), "the listener")
    connection = listener._connection
    # Unlisten behind the listener's back: the socket stays healthy, notifications stop.
    await connection.execute("UNLISTEN *")
    before = listener.health.reconnects

    async def replaced() -> bool:
        return listener.health.reconnects > before and listener.health.connected

    await _wait_until(replaced, "the probe to replace the listener")


async def _true_async(value: bool) -> bool:
    return value


async def test_postgres_restart_while_a_writer_inserts_delivers_every_committed_row_once(
    cluster, daemon, open_client, dsn
):
    """Restart the cluster mid-stream: all committed rows arrive once, no rolled-back row ever."""
    if cluster is None:
        pytest.skip("needs the embedded cluster to restart it")
    client = await open_client(daemon.url("alice"))
    stop_writing = asyncio.Event()
    rolled_back: list[str] = []

    async def write() -> None:
        i = 0
        connection = None
        while not stop_writing.is_set():
            try:
                if connection is None or connection.is_closed():
                    connection = await asyncpg.connect(dsn)
                transaction = connection.transaction()
                await transaction.start()
                await insert(connection, "alice", f"w{i}")
                if i % 5 == 4:
                    await transaction.rollback()
                    rolled_back.append(f"w{i}")
                else:
                    await transaction.commit()
            except Exception:  # any failure around the restart: reconnect
                if connection is not None:
                    connection.terminate()
                connection = None
                await asyncio.sleep(0.02)
            i += 1
            await asyncio.sleep(0)
        if connection is not None:
            await connection.close()

    writing = asyncio.create_task(write())
    await client.messages_until("w30")
    await asyncio.to_thread(cluster.restart)
    # Keep writing a little after the restart, then stop and take the truth from the table.
    app = await _connect_retry(dsn)
    await _wait_until(
        lambda: _count_at_least(app, 200), "the writer to write after the restart", 3 * TIMEOUT
    )
    stop_writing.set()
    await writing
    await insert(app, "alice", "sentinel")
    committed = {
        r["id"]
        for r in await app.fetch("SELECT id FROM t_message_real_time WHERE title <> 'sentinel'")
    }
    await app.close()
    await client.messages_until("sentinel", timeout=3 * TIMEOUT)
    received = client.frames
    got = [f["id"] for f in received if f["event"] == "message" and f["title"] != "sentinel"]
    assert len(got) == len(set(got)), "a row was delivered twice"
    assert set(got) == committed
    titles = {f["title"] for f in received if f["event"] == "message"}
    assert not titles & set(rolled_back)
    assert client.ws.close_code is None


async def _count_at_least(connection, n: int) -> bool:
    return await connection.fetchval("SELECT count(*) FROM t_message_real_time") >= n


async def _connect_retry(dsn: str):
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return await asyncpg.connect(dsn)
        except DATABASE_ERRORS:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_daemon_killed_and_restarted_clients_resume_without_loss(daemon, dsn, db):
    """SIGKILL notifyd while rows are committed; clients resuming with their cursor miss nothing."""
    port = free_port()
    token = daemon.token("alice")
    url = f"ws://127.0.0.1:{port}/ws/message?token={token}"
    env = serve_env(dsn, port, NOTIFYD_JWT_SECRET=SECRET, NOTIFYD_LOG_LEVEL="WARNING")
    received: list[dict] = []
    async with running_notifyd("serve", env=env) as first:
        await wait_until_listening(port, first)
        async with connect(url, open_timeout=TIMEOUT) as ws:
            assert json.loads(await ws.recv())["event"] == "hello"
            for i in range(20):
                await insert(db, "alice", f"before-{i}")
            while len(received) < 20:
                frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                if frame["event"] == "message":
                    received.append(frame)
            first.process.send_signal(signal.SIGKILL)
            await first.process.wait()
    for i in range(20):
        await insert(db, "alice", f"during-{i}")
    async with running_notifyd("serve", env=env) as second:
        await wait_until_listening(port, second)
        cursor = received[-1]["cursor"]
        async with connect(url + f"&since={quote(cursor)}", open_timeout=TIMEOUT) as ws:
            hello = json.loads(await ws.recv())
            assert hello["event"] == "hello" and hello["recovered"] is True
            while received[-1]["title"] != "during-19":
                frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                if frame["event"] == "message":
                    received.append(frame)
    titles = [m["title"] for m in received]
    assert titles == [f"before-{i}" for i in range(20)] + [f"during-{i}" for i in range(20)]


async def test_client_that_never_reads_is_bounded_and_does_not_delay_others(
    start_daemon, open_client, db
):
    """A stalled reader's queue stays within its byte bound; it gets resync or 4429; others flow."""
    bound = 256 * 1024
    daemon = await start_daemon(session_queue_bytes=bound, slow_client_timeout_s=1.0)
    stalled = await open_client(daemon.url("slow"), max_queue=1, max_size=2**22)
    healthy = await open_client(daemon.url("fast"))
    payload = "x" * 50_000
    peak = 0
    for i in range(150):
        await insert(db, "slow", f"s{i}", payload)
        await insert(db, "fast", f"f{i}")
        if i % 10 == 9:
            assert [m["title"] for m in await healthy.messages_until(f"f{i}")][-1] == f"f{i}"
        for session in daemon.daemon.hub.sessions_of("slow") or []:
            peak = max(peak, session.outbox.queued_chars)
    assert peak <= bound
    frames = []
    try:
        while not frames or frames[-1]["event"] != "resync":
            frames.append(await stalled.recv())
    except ConnectionClosed:
        pass
    events = {f["event"] for f in frames}
    assert "resync" in events or stalled.ws.close_code == 4429, (events, stalled.ws.close_code)


async def test_peer_that_stops_answering_pings_is_dropped_and_its_session_freed(start_daemon):
    """A client that never answers pings is disconnected and unregistered."""
    daemon = await start_daemon(ping_interval_s=0.2, ping_timeout_s=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(
        (
            f"GET /ws/message?token={daemon.token('mute')} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{daemon.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    hub = daemon.daemon.hub

    async def registered() -> bool:
        return hub.sessions_of("mute") is not None

    async def freed() -> bool:
        return hub.sessions_of("mute") is None

    await _wait_until(registered, "the session to register")
    await _wait_until(freed, "the mute peer to be dropped")
    writer.close()


async def test_connection_lost_in_the_middle_of_a_large_window_resumes_after_the_last_routed_row(
    start_daemon, open_client, db, dsn
):
    """The query connection cut while a window's rest is read: every row arrives once, in order."""
    rows = 20_000
    # About 150 bytes per row on the wire: the cut falls inside the window.
    async with connection_cutting_proxy(dsn, after_bytes=rows * 75) as (proxied, cut):
        daemon = await start_daemon(dsn=proxied, listen_dsn=dsn, fetch_batch=10)
        client = await open_client(daemon.url("alice"))
        await db.execute(
            "INSERT INTO t_message_real_time (to_user, title) "
            "SELECT 'alice', 'w' || g FROM generate_series(1, $1) AS g",
            rows,
        )
        titles = [m["title"] for m in await client.messages_until(f"w{rows}")]
        assert cut.is_set()
        await daemon.daemon.stop()  # while its pool's proxy still runs
    assert titles == [f"w{g}" for g in range(1, rows + 1)]


async def test_delivery_reads_again_as_soon_as_listen_returns_after_an_outage_in_one_line_logs(
    cluster, start_daemon, open_client, dsn, caplog
):
    """
    A long database outage backs delivery's retries off to many seconds;
    when the database is back, delivery reads as soon as LISTEN returns, not
    when its back-off ends, and the outage is logged one line per event
    (asyncpg's pool reconnect failures included), never with a traceback.
    """
    if cluster is None:
        pytest.skip("needs the embedded cluster to stop it")
    running = await start_daemon(reconnect_max_s=0.3)
    delivery = running.daemon.delivery
    # Longer than the deadline below: only LISTEN's return can end the wait.
    delivery._retry_max = 3600.0
    client = await open_client(running.url("alice"))
    caplog.set_level(logging.INFO, logger="notifyd.delivery")
    lines = io.StringIO()
    handler = line_handler("kv", lines)
    logging.getLogger().addHandler(handler)
    try:
        await asyncio.to_thread(cluster.stop)
        try:
            # The 8th failed read starts a 12.8 s back-off.
            await _wait_until(
                lambda: _true_async(delivery.stats.read_failures >= 8),
                "delivery to back off past the deadline",
                timeout=6 * TIMEOUT,
            )
        finally:
            await asyncio.to_thread(cluster.start)
        app = await _connect_retry(dsn)
        await insert(app, "alice", "after the outage")
        await app.close()
        await client.messages_until("after the outage", timeout=TIMEOUT)
    finally:
        logging.getLogger().removeHandler(handler)
    output = lines.getvalue()
    assert "Failed to restore the pool connection floor" in output
    assert "delivery reads again after" in output
    assert "Traceback" not in output, output
