"""
Restart storms: many clients handshaking at once, and every session coming
back after a restart.

While more than ``NOTIFYD_MAX_PENDING_HANDSHAKES`` handshakes are in
progress, a new one is answered at once with a retry hint (503 and
Retry-After; close 1013 with ``retry_ms`` for a browser) instead of waiting
and timing out. A restarted ``notifyd serve`` (SIGTERM, then started again,
as systemd does) gets every session back from its cursor with a writer
committing throughout: every row exactly once. The time from the SIGTERM
until the last session is live again is printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Origin

from .conftest import SECRET, TIMEOUT, RunningDaemon, insert
from .processes import free_port, mint, running_notifyd, serve_env, wait_until_healthy

_RETRY_MS = re.compile(r"retry_ms=(\d+)")


async def _hold_pending(daemon: RunningDaemon, count: int) -> list[ClientConnection]:
    """
    ``count`` upgraded connections that never send their auth frame: each
    stays a handshake in progress until it authenticates or times out.
    """
    return [
        await connect(f"ws://127.0.0.1:{daemon.port}/ws/message", open_timeout=TIMEOUT)
        for _ in range(count)
    ]


async def _connect_honouring_retry_after(url: str) -> ClientConnection:
    """
    Connect, waiting out each 503's Retry-After (with jitter) in between.
    """
    deadline = time.monotonic() + 3 * TIMEOUT
    while True:
        try:
            return await connect(url, open_timeout=TIMEOUT)
        except InvalidStatus as exc:
            assert exc.response.status_code == 503, exc.response
            assert time.monotonic() < deadline, "never let in"
            await asyncio.sleep(float(exc.response.headers["Retry-After"]) * random.uniform(1, 1.5))


async def test_handshakes_past_the_limit_get_503_with_retry_after_at_once(
    start_daemon: Callable[..., Awaitable[RunningDaemon]],
) -> None:
    """
    With the pending-handshake limit reached, 50 concurrent handshakes are
    each answered 503 with a Retry-After of 1-2 s well within their open
    timeout; once the pending ones are through, the same clients connect.
    """
    daemon = await start_daemon(max_pending_handshakes=5, auth_timeout_s=30)
    pending = await _hold_pending(daemon, 5)

    async def refused(user: str) -> InvalidStatus:
        try:
            ws = await connect(daemon.url(user), open_timeout=TIMEOUT)
        except InvalidStatus as exc:
            return exc
        await ws.close()
        raise AssertionError(f"{user} was let in past the limit")

    answers = await asyncio.gather(*(refused(f"u{i}") for i in range(50)))
    for answer in answers:
        assert answer.response.status_code == 503, answer.response
        assert 1 <= int(answer.response.headers["Retry-After"]) <= 2, answer.response.headers

    for ws in pending:
        await ws.send(json.dumps({"action": "auth", "token": daemon.token("held")}))
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["event"] == "hello"
    clients = await asyncio.gather(
        *(_connect_honouring_retry_after(daemon.url(f"u{i}")) for i in range(50))
    )
    for ws in clients:
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["event"] == "hello"
    for ws in clients + pending:
        await ws.close()
    # The 50 first answers, and more while they all came back at once.
    assert daemon.daemon.stats.limit_trips["pending_handshakes"] >= 50


async def test_browser_handshake_past_the_limit_is_closed_with_1013_and_a_retry_hint(
    start_daemon: Callable[..., Awaitable[RunningDaemon]],
) -> None:
    """
    A browser cannot read a refused handshake's status, so one with an
    Origin header is upgraded and closed at once with 1013 and retry_ms.
    """
    daemon = await start_daemon(max_pending_handshakes=2, auth_timeout_s=30)
    pending = await _hold_pending(daemon, 2)
    ws = await connect(
        daemon.url("browser"), origin=Origin("http://app.example"), open_timeout=TIMEOUT
    )
    try:
        await asyncio.wait_for(ws.recv(), TIMEOUT)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 1013, exc
        hint = _RETRY_MS.search(exc.rcvd.reason)
        assert hint is not None and 1000 <= int(hint.group(1)) <= 2000, exc.rcvd.reason
    else:
        raise AssertionError("the shed browser session was not closed")
    for held in pending:
        await held.close()


async def test_handshakes_that_end_free_their_place(
    start_daemon: Callable[..., Awaitable[RunningDaemon]],
) -> None:
    """
    Handshakes that became sessions, or whose connection was lost before
    authenticating, no longer count against the limit.
    """
    daemon = await start_daemon(max_pending_handshakes=3, auth_timeout_s=30)
    live = []
    for i in range(5):
        live.append(await _connect_honouring_retry_after(daemon.url(f"u{i}")))
        assert json.loads(await asyncio.wait_for(live[-1].recv(), TIMEOUT))["event"] == "hello"
    dropped = await _hold_pending(daemon, 3)
    for ws in dropped:
        ws.transport.abort()
        await ws.wait_closed()
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            ws = await connect(daemon.url("late"), open_timeout=TIMEOUT)
            break
        except InvalidStatus as exc:
            # The server may not have seen the aborts yet.
            assert exc.response.status_code == 503
            assert time.monotonic() < deadline, "dropped handshakes kept their place"
            await asyncio.sleep(0.05)
    assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["event"] == "hello"
    await ws.close()
    for client in live:
        await client.close()


async def test_handshake_refused_by_websockets_after_admission_frees_its_place(
    start_daemon: Callable[..., Awaitable[RunningDaemon]],
) -> None:
    """
    A handshake that admission accepted but websockets then refused (here a
    wrong Sec-WebSocket-Version: 400, no handler ever runs) does not keep
    its place once its connection is gone.
    """
    daemon = await start_daemon(max_pending_handshakes=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(
        b"GET /ws/message HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 7\r\n\r\n"
    )
    status = await asyncio.wait_for(reader.readline(), TIMEOUT)
    assert status.split()[1] == b"400", status
    await asyncio.wait_for(reader.read(), TIMEOUT)  # the server closes it
    writer.close()
    ws = await _connect_honouring_retry_after(daemon.url("after"))
    assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["event"] == "hello"
    await ws.close()


class StormSession:
    """
    A client that stays connected whatever happens: it reconnects with its
    last cursor after a close, honouring 1012's and 1013's ``retry_ms`` and
    503's Retry-After (with jitter), and retries a refused TCP connect.
    """

    def __init__(self, port: int | list[int], user: str) -> None:
        # With several ports (instances behind one balancer), each attempt
        # goes to the next one: a session closed by one instance comes back
        # on another.
        self.urls = [
            f"ws://127.0.0.1:{p}/ws/message?token={mint(user)}"
            for p in (port if isinstance(port, list) else [port])
        ]
        self.attempts = random.randrange(len(self.urls))
        self.user = user
        self.cursor: str | None = None
        self.titles: list[str] = []
        self.hellos: list[tuple[float, dict[str, Any]]] = []
        self.shed = 0
        self.refused = 0
        self.live = asyncio.Event()
        self.done = asyncio.Event()
        self.end_title = f"end-{user}"
        self._stop = False
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop:
            url = self.urls[self.attempts % len(self.urls)]
            self.attempts += 1
            url += f"&since={quote(self.cursor, safe='')}" if self.cursor else ""
            delay = 0.0
            reason = ""
            try:
                async with connect(url, open_timeout=TIMEOUT, close_timeout=1) as ws:
                    async for text in ws:
                        frame = json.loads(text)
                        if frame["event"] == "hello":
                            self.hellos.append((time.monotonic(), frame))
                            self.cursor = frame["cursor"]
                            self.live.set()
                        elif frame["event"] == "message":
                            self.titles.append(frame["title"])
                            self.cursor = frame["cursor"]
                            if frame["title"] == self.end_title:
                                self.done.set()
                        elif frame["event"] == "resync":
                            raise AssertionError(f"{self.user} was told to resync: {frame}")
                    reason = ws.close_reason or ""
            except ConnectionClosed as exc:
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
            except InvalidStatus as exc:
                assert exc.response.status_code == 503, exc.response
                self.shed += 1
                delay = float(exc.response.headers["Retry-After"]) * random.uniform(1, 1.5)
            except TimeoutError:
                raise AssertionError(f"{self.user}'s handshake timed out") from None
            except (OSError, InvalidHandshake):
                # Nothing listens yet: the restarting server is not up.
                self.refused += 1
                delay = random.uniform(0.05, 0.2)
            self.live.clear()
            hint = _RETRY_MS.search(reason)
            if hint is not None:
                delay = int(hint.group(1)) / 1000
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        self._stop = True
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def _all_set(
    events: list[asyncio.Event], tasks: list[asyncio.Task[None]], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not all(event.is_set() for event in events):
        failed = [task for task in tasks if task.done()]
        if failed:
            failed[0].result()
        missing = sum(not event.is_set() for event in events)
        assert time.monotonic() < deadline, f"{missing} sessions not there within {timeout}s"
        await asyncio.sleep(0.05)


class RoundRobinWriter:
    """
    Inserts ``w0``, ``w1``, ... to ``names`` in turn, one commit every 2 ms,
    until stopped; ``written`` is what it committed.
    """

    def __init__(self, dsn: str, names: list[str]) -> None:
        self.dsn = dsn
        self.names = names
        self.written: list[str] = []
        self._stopping = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        connection = await asyncpg.connect(self.dsn)
        try:
            n = 0
            while not self._stopping.is_set():
                await insert(connection, self.names[n % len(self.names)], f"w{n}")
                self.written.append(f"w{n}")
                n += 1
                await asyncio.sleep(0.002)
        finally:
            await connection.close()

    async def past(self, count: int) -> None:
        """
        Return once ``count`` rows are committed.
        """
        deadline = time.monotonic() + 6 * TIMEOUT
        while len(self.written) < count:
            assert not self.task.done(), self.task
            assert time.monotonic() < deadline, "the writer stalled"
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stopping.set()
        await self.task


async def _assert_every_row_reached_its_sessions_once(
    dsn: str, names: list[str], sessions: list[StormSession], *, all_resumed: bool
) -> None:
    """
    A last row per user, then: every session holds every row of its user
    exactly once, and every resume was proven (``recovered``); with
    ``all_resumed``, every session resumed at least once.
    """
    app = await asyncpg.connect(dsn)
    try:
        for name in names:
            await insert(app, name, f"end-{name}")
        rows = await app.fetch("SELECT to_user, title FROM t_message_real_time")
    finally:
        await app.close()
    await _all_set([s.done for s in sessions], [s.task for s in sessions], 6 * TIMEOUT)
    committed: dict[str, set[str]] = {name: set() for name in names}
    for row in rows:
        committed[row["to_user"]].add(row["title"])
    for session in sessions:
        twice = [t for t, n in Counter(session.titles).items() if n > 1]
        assert not twice, f"{session.user} got {twice[:5]} twice"
        assert set(session.titles) == committed[session.user], (
            f"{session.user} missed {sorted(committed[session.user] - set(session.titles))[:5]}"
        )
        resumed = session.hellos[1:]
        assert all(hello["recovered"] is True for _, hello in resumed)
        assert resumed or not all_resumed, f"{session.user} never resumed"


_QUEUED_CONNECTIONS = 1000


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 0


@pytest.mark.skipif(
    _somaxconn() < _QUEUED_CONNECTIONS,
    reason=f"net.core.somaxconn below {_QUEUED_CONNECTIONS} caps any listen backlog",
)
async def test_a_thousand_connections_queue_while_the_server_cannot_accept(dsn: str) -> None:
    """
    notifyd serve is stopped (SIGSTOP), so it accepts nothing: the kernel
    still completes the TCP handshakes of 1,000 clients arriving together
    into the listen backlog, where they wait for the server instead of
    having their SYNs dropped and retried 1, 3, 7 s later (asyncio's default
    backlog of 100 would complete about 100). Once resumed, it serves them.
    """
    port = free_port()
    env = serve_env(dsn, port, NOTIFYD_JWT_SECRET=SECRET, NOTIFYD_LOG_LEVEL="WARNING")
    async with running_notifyd("serve", env=env) as server:
        await wait_until_healthy(port, server)
        os.kill(server.process.pid, signal.SIGSTOP)
        writers: list[asyncio.StreamWriter] = []
        try:

            async def queued() -> None:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), TIMEOUT
                )
                writers.append(writer)

            results = await asyncio.gather(
                *(queued() for _ in range(_QUEUED_CONNECTIONS)), return_exceptions=True
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            assert not failed, f"{len(failed)} of {_QUEUED_CONNECTIONS} not queued: {failed[0]!r}"
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
            for writer in writers:
                writer.close()
        async with connect(
            f"ws://127.0.0.1:{port}/ws/message?token={mint('after-queue')}", open_timeout=TIMEOUT
        ) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert hello["event"] == "hello"


# Well below websockets' close timeout (5 s), well above a FIN's way over
# loopback on a busy machine.
_UNANSWERED_CLOSE_S = 2.5


async def _raw_session(port: int, user: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """
    A WebSocket session opened over a plain TCP stream, up to its hello, so
    that the test decides whether it ever answers a close frame.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /ws/message?token={mint(user)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    opcode, payload = await _server_frame(reader)
    assert opcode == 0x1 and b'"event":"hello"' in payload, payload
    return reader, writer


async def _server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """
    One unmasked frame from the server: its opcode and payload.
    """
    first, second = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(length), TIMEOUT)


async def test_a_stopping_server_ends_its_sessions_without_waiting_for_their_answers(
    dsn: str,
) -> None:
    """
    SIGTERM with 20 sessions whose clients never answer a close frame: each
    gets close 1012 with a retry hint and then the end of the stream at
    once, rather than after the server waited out its 5 s close timeout for
    an answer (at 10,000 sessions those waits outlasted the shutdown
    timeout); the process exits 0.
    """
    port = free_port()
    env = serve_env(dsn, port, NOTIFYD_JWT_SECRET=SECRET, NOTIFYD_LOG_LEVEL="WARNING")
    async with running_notifyd("serve", env=env) as server:
        await wait_until_healthy(port, server)
        sessions = [await _raw_session(port, f"mute{i}") for i in range(20)]
        server.process.send_signal(signal.SIGTERM)
        for reader, writer in sessions:
            while (frame := await _server_frame(reader))[0] != 0x8:
                pass
            code = int.from_bytes(frame[1][:2], "big")
            assert code == 1012 and _RETRY_MS.search(frame[1][2:].decode()), frame
            # Nothing was answered, and the end of the stream comes well
            # before websockets' close timeout (5 s) would have ended it.
            assert await asyncio.wait_for(reader.read(), _UNANSWERED_CLOSE_S) == b""
            writer.close()
        assert await asyncio.wait_for(server.process.wait(), TIMEOUT) == 0, server.output()


async def test_every_session_resumes_exactly_once_after_a_sigterm_restart(dsn: str) -> None:
    """
    SESSIONS sessions and a writer running: notifyd serve gets SIGTERM (its
    sessions are closed with 1012 and a retry hint) and is started again on
    the same port with a low pending-handshake limit. Every session comes
    back from its cursor (recovered, never a resync) and in the end holds
    every row of its user exactly once; none of their handshakes timed out.
    """
    sessions_count, users = 1000, 250
    port = free_port()
    env = serve_env(
        dsn,
        port,
        NOTIFYD_JWT_SECRET=SECRET,
        NOTIFYD_MAX_PENDING_HANDSHAKES="100",
        NOTIFYD_LOG_LEVEL="WARNING",
    )
    names = [f"user{i}" for i in range(users)]
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_notifyd("serve", env=env))
        await wait_until_healthy(port, first, path="/readyz")
        sessions = [StormSession(port, names[i % users]) for i in range(sessions_count)]
        tasks = [s.task for s in sessions]
        try:
            await _all_set([s.live for s in sessions], tasks, 6 * TIMEOUT)
            writer = RoundRobinWriter(dsn, names)
            await writer.past(200)

            restarted = time.monotonic()
            code = await first.stop()
            assert code == 0, first.output()
            second = await stack.enter_async_context(running_notifyd("serve", env=env))
            started = time.monotonic()
            await _all_set([s.live for s in sessions], tasks, 12 * TIMEOUT)
            back = time.monotonic()
            await writer.past(400)
            await writer.stop()
            await _assert_every_row_reached_its_sessions_once(
                dsn, names, sessions, all_resumed=True
            )
            shed = sum(s.shed for s in sessions)
            print(
                f"\nrestart of {sessions_count} sessions: last session live "
                f"{back - restarted:.2f} s after SIGTERM ({back - started:.2f} s after the new "
                f"process started); {shed} handshakes shed with 503, "
                f"{sum(s.refused for s in sessions)} connects refused while down; "
                f"{len(writer.written)} rows written across the restart"
            )
            assert second.process.returncode is None
        finally:
            for session in sessions:
                await session.stop()


async def test_a_rolling_restart_of_two_instances_loses_nothing(dsn: str) -> None:
    """
    Two instances on one database, sessions spread over both and a writer
    running; the first is stopped (SIGTERM) and started again, then the
    second, as a rolling deploy does. Each session closed by a stopping
    instance resumes on the other from its cursor; in the end every session
    holds every row of its user exactly once, and every resume was proven.
    """
    sessions_count, users = 300, 100
    ports = [free_port(), free_port()]
    envs = [
        serve_env(dsn, port, NOTIFYD_JWT_SECRET=SECRET, NOTIFYD_LOG_LEVEL="WARNING")
        for port in ports
    ]
    names = [f"user{i}" for i in range(users)]
    async with contextlib.AsyncExitStack() as stack:
        instances = [
            await stack.enter_async_context(running_notifyd("serve", env=env)) for env in envs
        ]
        for port, instance in zip(ports, instances, strict=True):
            await wait_until_healthy(port, instance, path="/readyz")
        sessions = [StormSession(ports, names[i % users]) for i in range(sessions_count)]
        tasks = [s.task for s in sessions]
        try:
            await _all_set([s.live for s in sessions], tasks, 6 * TIMEOUT)
            writer = RoundRobinWriter(dsn, names)
            await writer.past(100)
            for k in (0, 1):
                assert await instances[k].stop() == 0, instances[k].output()
                await writer.past(len(writer.written) + 100)
                instances[k] = await stack.enter_async_context(
                    running_notifyd("serve", env=envs[k])
                )
                await wait_until_healthy(ports[k], instances[k], path="/readyz")
                await _all_set([s.live for s in sessions], tasks, 12 * TIMEOUT)
            await writer.past(len(writer.written) + 100)
            await writer.stop()
            await _assert_every_row_reached_its_sessions_once(
                dsn, names, sessions, all_resumed=False
            )
            # Both stops moved sessions: at least the first instance's half resumed.
            assert sum(len(s.hellos) > 1 for s in sessions) >= sessions_count // 2
        finally:
            for session in sessions:
                await session.stop()
