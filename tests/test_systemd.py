"""
Running under systemd: the sd_notify conversation, key rotation on SIGHUP,
the hardened unit file, and several instances on one database.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from notifyd.systemd import SystemdNotifier

from .conftest import SECRET, TIMEOUT, insert, missing_tool
from .processes import (
    SYSTEMD_PREFIXES,
    free_port,
    mint,
    running_notifyd,
    serve_env,
    wait_until_listening,
)

REPO = Path(__file__).resolve().parent.parent


class NotifySocket:
    """
    A datagram socket standing in for systemd's NOTIFY_SOCKET.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def until(self, field: str, timeout: float = TIMEOUT) -> list[str]:
        """
        Receive datagrams until one contains ``field``; returns all so far.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            assert remaining > 0, f"no {field} in {self.messages}"
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), remaining)
            self.messages.append(data.decode())
            if field in data.decode().split("\n"):
                return self.messages

    async def quiet_for(self, field: str, seconds: float) -> None:
        """
        Assert that no datagram with ``field`` arrives for ``seconds``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), remaining)
            except TimeoutError:
                return
            self.messages.append(data.decode())
            assert field not in data.decode().split("\n"), f"{field} while it should stop"


async def test_sd_notify_ready_after_probe_watchdog_only_while_listening_then_stopping(
    tmp_path, dsn, admin_dsn
):
    """READY=1 once proven; WATCHDOG=1 stops while LISTEN is down and resumes; RELOADING; STOPPING."""
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    env = serve_env(
        dsn,
        port,
        strip=SYSTEMD_PREFIXES,
        NOTIFYD_LOG_LEVEL="WARNING",
        NOTIFYD_JWT_SECRET=SECRET,
        NOTIFYD_PROBE_INTERVAL_S="0.2",
        NOTIFYD_PROBE_TIMEOUT_S="0.5",
        NOTIFYD_RECONNECT_MAX_S="0.3",
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="200000",
    )
    database = dsn.rsplit("/", 1)[1]
    try:
        async with running_notifyd("serve", env=env, stop_signal=signal.SIGKILL) as server:
            process = server.process
            admin = await asyncpg.connect(admin_dsn)
            try:
                messages = await notify.until("READY=1")
                assert not any("WATCHDOG=1" in m for m in messages), "watchdog before ready"
                assert any(m.startswith("READY=1") and "STATUS=" in m for m in messages)
                await notify.until("WATCHDOG=1")
                await notify.until("WATCHDOG=1")

                # Take the LISTEN path away and keep it away.
                await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = $1 AND query ILIKE 'LISTEN%'",
                    database,
                )
                await notify.quiet_for("WATCHDOG=1", 0.3)  # in-flight datagrams drain
                await notify.quiet_for("WATCHDOG=1", 1.0)

                await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
                await notify.until("WATCHDOG=1")

                process.send_signal(signal.SIGHUP)
                messages = await notify.until("RELOADING=1")
                await notify.until("READY=1")

                process.send_signal(signal.SIGTERM)
                await notify.until("STOPPING=1")
                assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
            finally:
                await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
                await admin.close()
    finally:
        notify.sock.close()


async def test_sighup_rotates_jwt_keys_without_dropping_sessions(tmp_path, dsn, db):
    """After SIGHUP with a new secret: open sessions keep receiving, new tokens work, old ones don't."""
    old, new = "old-secret-" + "a" * 32, "new-secret-" + "b" * 32
    env_file = tmp_path / "notifyd.env"
    env_file.write_text(f"NOTIFYD_JWT_SECRET={old}\n")
    port = free_port()
    env = serve_env(dsn, port, strip=SYSTEMD_PREFIXES, NOTIFYD_LOG_LEVEL="WARNING")
    async with running_notifyd("--env-file", str(env_file), "serve", env=env) as server:
        process = server.process
        try:
            await wait_until_listening(port, server)
            old_token = mint("alice", old)
            new_token = mint("alice", new)
            async with connect(f"ws://127.0.0.1:{port}/ws/message?token={old_token}") as session:
                assert json.loads(await session.recv())["event"] == "hello"
                env_file.write_text(f"NOTIFYD_JWT_SECRET={new}\n")
                process.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + TIMEOUT
                while True:  # the reload is asynchronous: poll until the new key works
                    try:
                        async with connect(
                            f"ws://127.0.0.1:{port}/ws/message?token={new_token}"
                        ) as fresh:
                            assert json.loads(await fresh.recv())["event"] == "hello"
                        break
                    except InvalidStatus:
                        assert time.monotonic() < deadline, "new key never accepted"
                        await asyncio.sleep(0.05)
                with pytest.raises(InvalidStatus) as info:
                    async with connect(f"ws://127.0.0.1:{port}/ws/message?token={old_token}"):
                        pass
                assert info.value.response.status_code == 401
                await insert(db, "alice", "after-rotation")
                while True:
                    frame = json.loads(await asyncio.wait_for(session.recv(), TIMEOUT))
                    if frame["event"] == "message":
                        assert frame["title"] == "after-rotation"
                        break
        finally:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """
    The shipped unit with ExecStart pointing at this environment's notifyd.
    """
    text = (REPO / "systemd" / "notifyd.service").read_text()
    executable = Path(sys.executable).parent / "notifyd"
    assert executable.exists()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={executable}", text, flags=re.M)
    unit = tmp_path / "notifyd.service"
    unit.write_text(text)
    return unit


def test_unit_file_verifies_and_rates_at_most_2_0_exposure(tmp_path):
    """systemd-analyze verify passes and security rates the unit 2.0 or better."""
    if shutil.which("systemd-analyze") is None:
        missing_tool("systemd-analyze not installed: apt-get install systemd")
    unit = _unit_for_this_machine(tmp_path)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    match = re.search(
        r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout + security.stderr
    )
    assert match, security.stdout[-500:]
    assert float(match.group(1)) <= 2.0, match.group(0)


def test_unit_file_is_type_notify_with_watchdog_and_reload():
    """The unit asks for sd_notify readiness, a watchdog and SIGHUP reloads."""
    text = (REPO / "systemd" / "notifyd.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=",
    ):
        assert line in text


async def test_two_instances_deliver_to_a_users_sessions_on_both_and_sync_reads(
    start_daemon, open_client, db
):
    """A user on two instances gets each message on both; a read on one shows on the other."""
    first = await start_daemon()
    second = await start_daemon()
    on_first = await open_client(first.url("alice"))
    on_second = await open_client(second.url("alice"))
    message = await insert(db, "alice", "scaled")
    for client in (on_first, on_second):
        assert [m["id"] for m in await client.messages_until("scaled")] == [message]
    await on_first.send({"action": "read", "ids": [message]})
    deadline = time.monotonic() + TIMEOUT
    while True:
        frame = await on_second.recv(max(0.0, deadline - time.monotonic()))
        if frame["event"] == "read":
            assert frame["ids"] == [message]
            break


def test_a_notify_socket_nobody_reads_never_blocks_the_sender(tmp_path, caplog):
    """
    systemd's queue for NOTIFY_SOCKET holds a few datagrams; when it is full
    the notifier drops the message with a warning instead of blocking the
    event loop that sends it.
    """
    unread = NotifySocket(tmp_path / "notify.sock")
    notifier = SystemdNotifier(str(unread.path))
    sender = threading.Thread(
        target=lambda: [notifier.notify("WATCHDOG=1") for _ in range(100)], daemon=True
    )
    try:
        sender.start()
        sender.join(TIMEOUT)
        assert not sender.is_alive(), "notify() blocked on a full queue"
        assert any("sd_notify failed" in r.getMessage() for r in caplog.records)
    finally:
        notifier.close()
        unread.sock.close()
