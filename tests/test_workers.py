"""
``NOTIFYD_WORKERS``: one parent, several workers sharing the port.

Real processes (``python -m notifyd serve``), a real PostgreSQL, real
WebSocket clients, and a datagram socket standing in for systemd. Which
worker holds a client's connection is read from ``/proc`` (the server-side
socket of the client's port belongs to exactly one worker pid). The pure
decisions of the parent are tested at the end, without processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from notifyd.fleet import decode_line, encode_line, merged_exposition, send_line
from notifyd.loop import loop_factory
from notifyd.workers import (
    FIRST_BEAT_S,
    START_FAILURES_LIMIT,
    Worker,
    all_healthy,
    crashes_after_exit,
    exit_code_of,
    is_stalled,
    restart_delay,
    status_line,
)

from .conftest import SECRET, TIMEOUT, insert
from .processes import (
    SYSTEMD_PREFIXES,
    NotifydProcess,
    free_port,
    mint,
    run_cli,
    running_notifyd,
    serve_env,
    wait_until_healthy,
)
from .test_chaos import USERS, ResumingClient, _writer, assert_exactly_the_committed_rows, settle
from .test_systemd import NotifySocket

POLL_S = 0.05


# -- reading the process tree ------------------------------------------------------


def children(pid: int) -> set[int]:
    """
    The live child processes of ``pid``.
    """
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # state, ppid: a zombie is no longer a worker.
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


async def wait_for_workers(
    server: NotifydProcess, count: int, *, other_than: set[int] = frozenset()
) -> set[int]:
    """
    Poll until ``server`` has ``count`` children, none of them in ``other_than``.
    """
    deadline = time.monotonic() + 3 * TIMEOUT
    while True:
        pids = children(server.process.pid)
        if len(pids) == count and not pids & other_than:
            return pids
        assert server.process.returncode is None, server.output()
        assert time.monotonic() < deadline, (pids, server.output())
        await asyncio.sleep(POLL_S)


def _inodes_connected_from(port: int) -> set[int]:
    """
    Socket inodes of the loopback TCP connections whose remote port is
    ``port``: the server side of the client that bound it.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port:
                    inodes.add(int(fields[9]))
    return inodes


def worker_of(client: ClientConnection, workers: set[int]) -> int:
    """
    The worker pid holding ``client``'s connection.
    """
    client_port = client.transport.get_extra_info("sockname")[1]
    inodes = _inodes_connected_from(client_port)
    for pid in workers:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                    return pid
    raise AssertionError(f"no worker holds the connection from port {client_port}")


# -- talking to it -----------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as reply:
        return reply.read().decode()


def sessions_by_worker(text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == "notifyd_sessions":
            return {sample.labels["worker"]: sample.value for sample in family.samples}
    return {}


async def open_sessions(port: int, user: str, count: int) -> list[ClientConnection]:
    sessions = []
    for _ in range(count):
        ws = await connect(f"ws://127.0.0.1:{port}/ws/message?token={mint(user)}")
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["event"] == "hello"
        sessions.append(ws)
    return sessions


async def next_message(ws: ClientConnection, title: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if frame["event"] == "message" and frame["title"] == title:
            return frame


def workers_env(dsn: str, port: int, count: int = 2, **settings: str) -> dict[str, str]:
    values = {
        "NOTIFYD_LOG_LEVEL": "INFO",
        "NOTIFYD_JWT_SECRET": SECRET,
        "NOTIFYD_PROBE_INTERVAL_S": "0.3",
        "NOTIFYD_PROBE_TIMEOUT_S": "1",
        "NOTIFYD_RECONNECT_MAX_S": "0.3",
        "NOTIFYD_SHUTDOWN_TIMEOUT_S": "3",
        "NOTIFYD_WORKERS": str(count),
        "NOTIFYD_MAX_SESSIONS_PER_USER": "100",
        **settings,
    }
    return serve_env(dsn, port, strip=SYSTEMD_PREFIXES, **values)


@contextlib.asynccontextmanager
async def two_workers(
    dsn: str, **settings: str
) -> AsyncIterator[tuple[NotifydProcess, int, set[int]]]:
    port = free_port()
    async with running_notifyd("serve", env=workers_env(dsn, port, **settings)) as server:
        pids = await wait_for_workers(server, 2)
        await wait_until_healthy(port, server, path="/readyz")
        yield server, port, pids


async def spread_sessions(
    port: int, user: str, pids: set[int], count: int = 16
) -> dict[int, list[ClientConnection]]:
    """
    ``count`` sessions of ``user``, grouped by the worker that holds each;
    more are opened until both workers hold some.
    """
    by_worker: dict[int, list[ClientConnection]] = {pid: [] for pid in pids}
    opened = 0
    while opened < count or not all(by_worker.values()):
        assert opened < 10 * count, "every connection landed on one worker"
        (ws,) = await open_sessions(port, user, 1)
        by_worker[worker_of(ws, pids)].append(ws)
        opened += 1
    return by_worker


# -- with processes ------------------------------------------------------------------------


async def test_sessions_spread_over_both_workers_and_a_message_reaches_each_of_them(dsn, db):
    """A user's sessions land on two worker pids; one message reaches all; one scrape shows both."""
    async with two_workers(dsn) as (_, port, pids):
        by_worker = await spread_sessions(port, "alice", pids)
        message = await insert(db, "alice", "to-every-worker")
        for sessions in by_worker.values():
            for ws in sessions:
                assert (await next_message(ws, "to-every-worker"))["id"] == message
        expected = {pid: len(sessions) for pid, sessions in by_worker.items()}
        deadline = time.monotonic() + TIMEOUT
        while True:  # a worker's file is as fresh as its last heartbeat
            text = await asyncio.to_thread(scrape, port)
            counts = sessions_by_worker(text)
            if sorted(counts.values()) == sorted(expected.values()) and len(counts) == 2:
                break
            assert time.monotonic() < deadline, (counts, expected)
            await asyncio.sleep(POLL_S)
        assert set(counts) == {"0", "1"}
        types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
        assert len(types) == len(set(types)), "a family typed twice fails the whole scrape"
        for sessions in by_worker.values():
            for ws in sessions:
                await ws.close()


async def test_ready_waits_for_every_worker_then_watchdog_reload_and_stop(tmp_path, dsn):
    """READY=1 only once both workers are ready (one held stopped: none); SIGHUP, SIGTERM exit 0."""
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    env = workers_env(
        dsn,
        port,
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="400000",
        NOTIFYD_WORKER_STALL_S="60",
    )
    try:
        async with running_notifyd("serve", env=env) as server:
            pids = await wait_for_workers(server, 2)
            held = min(pids)
            os.kill(held, signal.SIGSTOP)
            try:
                await server.wait_for_output("is ready", timeout=3 * TIMEOUT)
                await notify.quiet_for("READY=1", 2.0)
                assert not any("WATCHDOG=1" in m for m in notify.messages)
                # The ready worker answers for both: not ready. (A connection
                # the held worker's socket takes gets no answer at all.)
                answers = [status for status in await readyz_answers(port, 6) if status]
                assert answers and set(answers) == {503}, answers
            finally:
                os.kill(held, signal.SIGCONT)
            messages = await notify.until("READY=1", timeout=3 * TIMEOUT)
            assert any("STATUS=2/2 workers ready" in m for m in messages), messages
            await notify.until("WATCHDOG=1")

            server.process.send_signal(signal.SIGHUP)
            await notify.until("RELOADING=1")
            await notify.until("READY=1")
            assert children(server.process.pid) == pids, "a reload ended a worker"

            assert await server.stop(signal.SIGTERM) == 0
            assert "STOPPING=1" in "\n".join(notify.messages) or await notify.until("STOPPING=1")
            assert all(_is_gone(pid) for pid in pids), "a worker outlived the parent"
    finally:
        notify.sock.close()


async def readyz_answers(port: int, attempts: int) -> list[int]:
    """
    The status of ``attempts`` GET /readyz, 0 for one not answered in 1 s.
    """

    def get() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    return [await asyncio.to_thread(get) for _ in range(attempts)]


def _is_gone(pid: int) -> bool:
    """
    Whether ``pid`` no longer runs (exited, or a zombie nobody reaped yet).
    """
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_a_killed_worker_is_replaced_its_sessions_resume_and_the_others_stay_open(dsn, db):
    """SIGKILL one worker: its clients resume from their cursors, the other's never close."""
    async with two_workers(dsn) as (server, port, pids):
        by_worker = await spread_sessions(port, "alice", pids, count=8)
        victim, survivor = sorted(pids, key=lambda pid: len(by_worker[pid]))
        before = await insert(db, "alice", "before")
        cursors = []
        for ws in by_worker[victim]:
            cursors.append((await next_message(ws, "before"))["cursor"])
        for ws in by_worker[survivor]:
            assert (await next_message(ws, "before"))["id"] == before

        os.kill(victim, signal.SIGKILL)
        for ws in by_worker[victim]:
            await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
        during = await insert(db, "alice", "while-replaced")
        replacement = (await wait_for_workers(server, 2, other_than={victim})) - {survivor}
        assert len(replacement) == 1, "the survivor was replaced too"
        await server.wait_for_output("worker", "exited with -9", timeout=TIMEOUT)

        for cursor in cursors:
            deadline = time.monotonic() + 3 * TIMEOUT
            while True:  # until the new worker binds, a connection may land nowhere
                try:
                    resumed = await connect(
                        f"ws://127.0.0.1:{port}/ws/message?token={mint('alice')}&since={cursor}"
                    )
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(POLL_S)
            hello = json.loads(await asyncio.wait_for(resumed.recv(), TIMEOUT))
            assert hello["event"] == "hello" and hello["recovered"] is True, hello
            replayed = await next_message(resumed, "while-replaced")
            assert replayed["id"] == during
            await resumed.close()
        for ws in by_worker[survivor]:
            assert ws.close_code is None, "a session on the other worker was closed"
            assert (await next_message(ws, "while-replaced"))["id"] == during
            await ws.close()
        assert children(server.process.pid) == replacement | {survivor}


async def test_a_stuck_worker_is_noticed_by_its_heartbeat_replaced_and_the_watchdog_pauses(
    tmp_path, dsn
):
    """SIGSTOP one worker: no WATCHDOG=1 while it is stuck; it is killed, replaced, pings resume."""
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    env = workers_env(
        dsn,
        port,
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="300000",
        NOTIFYD_WORKER_STALL_S="1.5",
    )
    try:
        async with running_notifyd("serve", env=env) as server:
            pids = await wait_for_workers(server, 2)
            await notify.until("READY=1", timeout=3 * TIMEOUT)
            await notify.until("WATCHDOG=1")
            stuck = min(pids)
            os.kill(stuck, signal.SIGSTOP)
            await server.wait_for_output("no heartbeat", timeout=TIMEOUT)
            drain(notify)  # pings sent before the parent noticed
            await notify.quiet_for("WATCHDOG=1", 1.0)
            replaced = await wait_for_workers(server, 2, other_than={stuck})
            assert pids - {stuck} <= replaced
            await notify.until("WATCHDOG=1", timeout=3 * TIMEOUT)
            await wait_until_healthy(port, server, path="/readyz")
    finally:
        notify.sock.close()


def drain(notify: NotifySocket) -> None:
    """
    Read and forget the datagrams already waiting.
    """
    with contextlib.suppress(BlockingIOError):
        while True:
            notify.sock.recv(4096)


@pytest.mark.parametrize("value", ["0", "-2", "many", "2.5"])
@pytest.mark.parametrize("command", ["check", "serve"])
async def test_a_bad_workers_value_is_one_line_and_exit_2(dsn, command, value):
    """NOTIFYD_WORKERS=0, negative or junk: one stderr line naming it, exit 2, no worker started."""
    env = workers_env(dsn, free_port(), NOTIFYD_WORKERS=value)
    result = await run_cli(command, env=env)
    assert result.code == 2, result
    assert len(result.stderr_lines) == 1, result.stderr
    assert "NOTIFYD_WORKERS" in result.stderr_lines[0]


async def test_workers_auto_is_the_number_of_usable_cpus(dsn):
    """NOTIFYD_WORKERS=auto starts one worker per CPU in this process's affinity mask."""
    port = free_port()
    env = workers_env(dsn, port, NOTIFYD_WORKERS="auto")
    async with running_notifyd("serve", env=env) as server:
        await wait_for_workers(server, len(os.sched_getaffinity(0)))
        assert await server.stop() == 0


async def test_workers_that_fail_before_ready_end_the_parent_with_their_line_and_code(empty_dsn):
    """A database without the schema: workers fail, the parent exits 1 with their one line."""
    env = workers_env(empty_dsn, free_port())
    result = await run_cli("serve", env=env, timeout=6 * TIMEOUT)
    assert result.code == 1, result
    assert len(result.stderr_lines) == 1, result.stderr
    assert "t_message_real_time" in result.stderr_lines[0]
    assert result.stdout.count("starting it again") == START_FAILURES_LIMIT - 1


async def test_chaos_a_worker_killed_mid_stream_loses_and_repeats_nothing(dsn):
    """Writers, 50 users' resuming clients, two workers, one killed twice: every row exactly once."""
    users = USERS
    async with two_workers(dsn) as (server, port, pids):
        clients = [ResumingClient(user, mint(user), port) for user in users]
        client_tasks = [asyncio.create_task(client.run()) for client in clients]
        deadline = time.monotonic() + 3 * TIMEOUT
        while not all(client.cursor is not None for client in clients):
            assert time.monotonic() < deadline, "clients did not connect"
            await asyncio.sleep(POLL_S)
        stop_writing = asyncio.Event()
        rng = random.Random(20261126)
        writers = [
            asyncio.create_task(_writer(dsn, random.Random(rng.random()), stop_writing, n))
            for n in range(2)
        ]
        try:
            # Each kill and the end fall after 30 more committed rows, so
            # every phase carries traffic however slow the machine.
            for _ in range(2):
                await _rows_committed_grow(dsn, by=30)
                victim = rng.choice(sorted(pids))
                os.kill(victim, signal.SIGKILL)
                pids = await wait_for_workers(server, 2, other_than={victim})
                await wait_until_healthy(port, server, path="/readyz")
            await _rows_committed_grow(dsn, by=30)
        finally:
            stop_writing.set()
            await asyncio.gather(*writers)
        committed = await settle(dsn, users, clients, client_tasks, 6 * TIMEOUT)
        assert sum(len(rows) for rows in committed.values()) > 50, "too little traffic"
        assert_exactly_the_committed_rows(clients, committed)


async def _rows_committed_grow(dsn: str, by: int) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        count = "SELECT count(*) FROM t_message_real_time"
        target = await connection.fetchval(count) + by
        deadline = time.monotonic() + 3 * TIMEOUT
        while await connection.fetchval(count) < target:
            assert time.monotonic() < deadline, f"fewer than {by} rows committed"
            await asyncio.sleep(POLL_S)
    finally:
        await connection.close()


# -- the parent's decisions, without processes ------------------------------------------


def worker(index: int = 0, **state: object) -> Worker:
    values: dict = {"pid": 100 + index, "started_at": 0.0}
    values.update(state)
    return Worker(index=index, **values)


def test_a_worker_is_stalled_past_the_stall_time_since_its_last_beat_or_its_first_allowance():
    """A beat restarts the clock; before the first one the start-up allowance applies."""
    assert not is_stalled(worker(started_at=0.0, last_beat=12.0), now=16.5, stall_s=5.0)
    assert is_stalled(worker(started_at=0.0, last_beat=12.0), now=17.5, stall_s=5.0)
    assert not is_stalled(worker(started_at=10.0), now=10.0 + FIRST_BEAT_S, stall_s=5.0)
    assert is_stalled(worker(started_at=10.0), now=10.5 + FIRST_BEAT_S, stall_s=5.0)
    assert is_stalled(worker(started_at=0.0), now=100.5, stall_s=100.0)


def test_all_healthy_needs_every_slot_filled_ready_and_beating():
    """One missing, unready, stalled or being-killed worker makes the set unhealthy."""
    fine = [worker(0, ready=True, last_beat=9.0), worker(1, ready=True, last_beat=9.0)]
    assert all_healthy(fine, 2, now=10.0, stall_s=5.0)
    assert not all_healthy([fine[0], None], 2, now=10.0, stall_s=5.0)
    assert not all_healthy([fine[0], worker(1, ready=False, last_beat=9.0)], 2, 10.0, 5.0)
    assert not all_healthy(fine, 2, now=20.0, stall_s=5.0)
    assert not all_healthy(
        [fine[0], worker(1, ready=True, last_beat=9.0, killing=True)], 2, 10.0, 5.0
    )


def test_restarts_back_off_while_a_slot_keeps_crashing_and_reset_after_a_long_life():
    """Quick exits double the delay up to a cap; a worker that lived a minute restarts at once."""
    crashes = 0
    delays = []
    for _ in range(10):
        crashes = crashes_after_exit(crashes, lived_s=1.0)
        delays.append(restart_delay(crashes))
    assert delays[:3] == [0.5, 1.0, 2.0]
    assert delays[-1] == 30.0
    assert crashes_after_exit(crashes, lived_s=120.0) == 1


def test_the_parent_exits_with_the_workers_code_or_1_for_a_signal():
    """Exit 2 (settings) and 1 (runtime) pass through; death by a signal is 1."""
    assert exit_code_of(2) == 2
    assert exit_code_of(1) == 1
    assert exit_code_of(-9) == 1


def test_status_line_sums_the_workers():
    """STATUS= says how many are ready and the sessions of all."""
    line = status_line([worker(0, ready=True, sessions=3, users=2), None], 2)
    assert line.startswith("1/2 workers ready; 3 sessions, 2 users online")


def test_merged_exposition_labels_every_series_with_its_worker_and_types_each_family_once():
    """Two workers' expositions become one valid one: a worker label, one TYPE line per name."""
    one = (
        b"# HELP notifyd_sessions Open\n# TYPE notifyd_sessions gauge\nnotifyd_sessions 3.0\n"
        b"# HELP notifyd_x_total Rows\n# TYPE notifyd_x_total counter\n"
        b'notifyd_x_total{k="a"} 7.0\n'
    )
    two = b"# HELP notifyd_sessions Open\n# TYPE notifyd_sessions gauge\nnotifyd_sessions 5.0\n"
    text = merged_exposition({0: one, 1: two}).decode()
    assert text.count("# TYPE notifyd_sessions gauge") == 1
    assert 'notifyd_sessions{worker="0"} 3.0' in text
    assert 'notifyd_sessions{worker="1"} 5.0' in text
    assert 'notifyd_x_total{k="a",worker="0"} 7.0' in text
    assert text.count("# TYPE ") == 2
    assert len(list(text_string_to_metric_families(text))) == 2  # a scrape parses it


def test_a_link_line_round_trips_and_junk_is_an_empty_message():
    """What one side encodes the other decodes; anything but a JSON object is ignored."""
    assert decode_line(encode_line({"beat": {"ready": True}})) == {"beat": {"ready": True}}
    assert decode_line(b"[1, 2]\n") == {}
    assert decode_line(b"not json\n") == {}


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_link_whose_other_side_died_refuses_lines_and_never_raises_on_either_loop(loop_name):
    """
    The parent writes to every worker's link each tick, and a killed
    worker's link closes under it: send_line must answer False, not raise
    (uvloop raises RuntimeError on a closed transport, which once ended the
    parent's supervision task and starved systemd's watchdog).
    """

    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _, writer = await asyncio.open_unix_connection(sock=ours)
        assert send_line(writer, {"all_ready": True})
        theirs.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while send_line(writer, {"all_ready": True}):
            assert loop.time() < deadline, "the link never noticed its other side closed"
            await asyncio.sleep(POLL_S)
        with contextlib.suppress(OSError):  # the broken pipe, as the link saw it
            await asyncio.wait_for(writer.wait_closed(), TIMEOUT)
        for _ in range(3):
            assert not send_line(writer, {"all_ready": False})
        writer.close()

    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        runner.run(scenario())
