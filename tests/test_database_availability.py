"""
``notifyd serve`` and ``notifyd check`` against a database that cannot be
used (a hot standby) or is not there yet, as real subprocesses against real
PostgreSQL clusters of their own (never the session ``cluster``).

Every subprocess gets the test runner's environment minus any ``NOTIFYD_*``
variable, plus what the test sets. Every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO

import asyncpg
import pytest
from websockets.asyncio.client import connect

from notifyd.auth import TokenVerifier
from notifyd.db import schema_sql
from notifyd.embedded import EmbeddedPostgres
from notifyd.settings import Settings

from .conftest import SECRET, TIMEOUT, insert

_CLUSTER_SETTINGS = {"fsync": "off", "synchronous_commit": "off"}


def _free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on (bound, then released).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _env(dsn: str, port: int) -> dict[str, str]:
    """
    os.environ without NOTIFYD_* variables, plus what ``serve`` needs.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("NOTIFYD_")}
    env.update(
        NOTIFYD_DSN=dsn,
        NOTIFYD_PORT=str(port),
        NOTIFYD_JWT_SECRET=SECRET,
        NOTIFYD_RECONNECT_MAX_S="0.5",
    )
    return env


async def _apply_schema(dsn: str) -> None:
    """
    Create notifyd's table, indexes and trigger in the database at *dsn*.
    """
    connection = await asyncpg.connect(dsn, timeout=TIMEOUT)
    try:
        await connection.execute(schema_sql())
    finally:
        await connection.close()


@dataclass
class _Finished:
    """
    A CLI run that exited.
    """

    code: int
    stdout: str
    stderr: str

    def lines(self, stream: str) -> list[str]:
        return [line for line in getattr(self, stream).splitlines() if line.strip()]


async def _run_cli(*args: str, env: dict[str, str], timeout: float) -> _Finished:
    """
    Run ``python -m notifyd ARGS``; fail (after killing it) if it outlives *timeout*.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "notifyd",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"notifyd {' '.join(args)} did not exit within {timeout}s")
    assert process.returncode is not None
    return _Finished(process.returncode, stdout.decode(), stderr.decode())


@dataclass
class _Serving:
    """
    A running ``notifyd serve``; stderr goes to a file readable at any time.
    """

    process: asyncio.subprocess.Process
    stderr_file: IO[bytes]

    def stderr(self) -> str:
        # pread: the child shares this file's offset, so never seek it.
        fd = self.stderr_file.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    async def wait_for_stderr(self, *fragments: str, timeout: float) -> str:
        """
        Poll until one stderr line contains every fragment; return that line.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in self.stderr().splitlines():
                if all(fragment in line for fragment in fragments):
                    return line
            assert self.process.returncode is None, (
                f"serve exited ({self.process.returncode}): {self.stderr()}"
            )
            assert time.monotonic() < deadline, (
                f"no stderr line with {fragments} within {timeout}s: {self.stderr()}"
            )
            await asyncio.sleep(0.05)

    async def stop(self) -> int:
        """
        SIGTERM, then the exit code (killed and failed if it does not exit in time).
        """
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), 2 * TIMEOUT)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            pytest.fail(f"serve ignored SIGTERM for {2 * TIMEOUT}s: {self.stderr()}")

    async def close(self) -> None:
        """
        Kill the process if it still runs and release the stderr file.
        """
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.stderr_file.close()


async def _start_serve(env: dict[str, str]) -> _Serving:
    stderr_file = tempfile.TemporaryFile()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "notifyd",
            "serve",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr_file,
        )
    except BaseException:
        stderr_file.close()
        raise
    return _Serving(process, stderr_file)


async def _wait_until_healthy(port: int, serving: _Serving, timeout: float) -> None:
    """
    Poll GET /healthz until it answers 200.
    """

    def get() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    deadline = time.monotonic() + timeout
    while True:
        status = await asyncio.to_thread(get)
        if status == 200:
            return
        assert serving.process.returncode is None, serving.stderr()
        assert time.monotonic() < deadline, (
            f"/healthz never answered 200 within {timeout}s (last {status}): {serving.stderr()}"
        )
        await asyncio.sleep(0.05)


@pytest.fixture
async def primary_and_standby() -> AsyncIterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    """
    A primary with notifyd's schema and a running hot standby of it.
    """
    primary = EmbeddedPostgres(settings=_CLUSTER_SETTINGS)
    standby: EmbeddedPostgres | None = None
    try:
        await asyncio.to_thread(primary.start)
        await _apply_schema(primary.dsn)
        standby = await asyncio.to_thread(EmbeddedPostgres.standby_of, primary)
        await asyncio.to_thread(standby.start)
        yield primary, standby
    finally:
        if standby is not None:
            await asyncio.to_thread(standby.cleanup)
        await asyncio.to_thread(primary.cleanup)


async def test_serve_against_hot_standby_exits_1_with_one_line_saying_so(
    primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    """`notifyd serve` on a hot standby exits 1 within TIMEOUT: one stderr line, no traceback."""
    primary, standby = primary_and_standby
    replica = await asyncpg.connect(standby.dsn, timeout=TIMEOUT)
    try:
        assert await replica.fetchval("select pg_is_in_recovery()") is True
        # The standby has the schema: only its being in recovery is wrong.
        assert await replica.fetchval("select to_regclass('t_message_real_time') is not null")
    finally:
        await replica.close()

    result = await _run_cli("serve", env=_env(standby.dsn, _free_port()), timeout=TIMEOUT)

    assert result.code == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = result.lines("stderr")
    assert len(errors) == 1, result.stderr
    assert "hot standby" in errors[0] and "in recovery" in errors[0], result.stderr
    assert errors[0].startswith("notifyd: "), result.stderr
    # No retry loop: a standby is refused at once, not waited for.
    assert "retrying" not in result.stderr, result.stderr


async def test_check_against_hot_standby_exits_1_with_problem_line(
    primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    """`notifyd check` on a hot standby exits 1 and prints a problem line saying so."""
    _, standby = primary_and_standby

    result = await _run_cli("check", env=_env(standby.dsn, _free_port()), timeout=TIMEOUT)

    assert result.code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, (result.stdout, result.stderr)
    problems = [line for line in result.lines("stdout") if line.startswith("problem:")]
    assert len(problems) == 1, result.stdout
    assert "hot standby" in problems[0] and "in recovery" in problems[0], result.stdout
    assert "ok: database reachable" not in result.stdout, result.stdout


async def test_serve_waiting_for_database_exits_0_on_sigterm() -> None:
    """`notifyd serve` still retrying its first connection stops promptly on SIGTERM."""
    # Nothing listens on this port: serve stays in its connect-retry loop.
    unreachable = f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres"
    serving = await _start_serve(_env(unreachable, _free_port()))
    try:
        await serving.wait_for_stderr("cannot connect", "retrying", timeout=TIMEOUT)
        serving.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(serving.process.wait(), TIMEOUT)
        except TimeoutError:
            pytest.fail(f"serve ignored SIGTERM for {TIMEOUT}s while waiting for the database")
        assert code == 0, serving.stderr()
        assert "Traceback" not in serving.stderr(), serving.stderr()
    finally:
        await serving.close()


async def test_check_with_listen_dsn_on_hot_standby_names_the_standby(
    primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    """`notifyd check` with NOTIFYD_LISTEN_DSN on a standby exits 1 naming the standby."""
    primary, standby = primary_and_standby
    env = _env(primary.dsn, _free_port())
    env["NOTIFYD_LISTEN_DSN"] = standby.dsn

    result = await _run_cli("check", env=env, timeout=TIMEOUT)

    assert result.code == 1, (result.stdout, result.stderr)
    problems = [line for line in result.lines("stdout") if line.startswith("problem:")]
    assert len(problems) == 1, result.stdout
    assert "standby" in problems[0], result.stdout


async def test_serve_started_before_database_retries_then_delivers_once_it_is_up() -> None:
    """`notifyd serve` started before PostgreSQL retries, then turns healthy and pushes rows."""
    pg = EmbeddedPostgres(settings=_CLUSTER_SETTINGS)
    serving: _Serving | None = None
    try:
        # The schema must exist before serve first connects (Daemon.start
        # checks it at once), so create it, then take the database away.
        pg.start()
        await _apply_schema(pg.dsn)
        pg.stop()
        assert not pg.is_running()

        port = _free_port()
        serving = await _start_serve(_env(pg.dsn, port))
        line = await serving.wait_for_stderr("cannot connect", "retrying", timeout=TIMEOUT)
        assert "WARNING" in line, line
        # Still waiting, not given up: a second attempt is logged too.
        deadline = time.monotonic() + TIMEOUT
        while serving.stderr().count("retrying") < 2:
            assert serving.process.returncode is None, serving.stderr()
            assert time.monotonic() < deadline, serving.stderr()
            await asyncio.sleep(0.05)
        assert "Traceback" not in serving.stderr(), serving.stderr()

        await asyncio.to_thread(pg.start)
        await _wait_until_healthy(port, serving, timeout=3 * TIMEOUT)

        token = TokenVerifier.from_settings(Settings(jwt_secret=SECRET)).mint("alice")
        async with connect(
            f"ws://127.0.0.1:{port}/ws/message?token={token}", open_timeout=TIMEOUT
        ) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert hello["event"] == "hello", hello
            db = await asyncpg.connect(pg.dsn, timeout=TIMEOUT)
            try:
                message_id = await insert(db, "alice", "after-outage")
            finally:
                await db.close()
            deadline = time.monotonic() + TIMEOUT
            while True:
                remaining = deadline - time.monotonic()
                assert remaining > 0, "the row inserted after startup was never pushed"
                frame = json.loads(await asyncio.wait_for(ws.recv(), remaining))
                if frame["event"] == "message":
                    break
            assert frame["title"] == "after-outage" and frame["id"] == message_id, frame

        code = await serving.stop()
        assert code == 0, serving.stderr()
        assert "Traceback" not in serving.stderr(), serving.stderr()
    finally:
        if serving is not None:
            await serving.close()
        await asyncio.to_thread(pg.cleanup)
