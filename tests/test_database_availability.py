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
import signal
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from websockets.asyncio.client import connect

from notifyd.db import schema_sql
from notifyd.demo.embedded import EmbeddedPostgres

from .conftest import SECRET, TIMEOUT, insert
from .pgproxy import notification_dropping_proxy
from .processes import (
    free_port,
    mint,
    run_cli,
    running_notifyd,
    serve_env,
    wait_until_healthy,
)

_CLUSTER_SETTINGS = {"fsync": "off", "synchronous_commit": "off"}
# What every ``serve``/``check`` here gets besides its DSN and port.
_SERVE_SETTINGS = {"NOTIFYD_JWT_SECRET": SECRET, "NOTIFYD_RECONNECT_MAX_S": "0.5"}


async def _apply_schema(dsn: str) -> None:
    """
    Create notifyd's table, indexes and trigger in the database at *dsn*.
    """
    connection = await asyncpg.connect(dsn, timeout=TIMEOUT)
    try:
        await connection.execute(schema_sql())
    finally:
        await connection.close()


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
    _primary, standby = primary_and_standby
    replica = await asyncpg.connect(standby.dsn, timeout=TIMEOUT)
    try:
        assert await replica.fetchval("select pg_is_in_recovery()") is True
        # The standby has the schema: only its being in recovery is wrong.
        assert await replica.fetchval("select to_regclass('t_message_real_time') is not null")
    finally:
        await replica.close()

    result = await run_cli(
        "serve", env=serve_env(standby.dsn, free_port(), **_SERVE_SETTINGS), timeout=TIMEOUT
    )

    assert result.code == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = result.stderr_lines
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

    result = await run_cli(
        "check", env=serve_env(standby.dsn, free_port(), **_SERVE_SETTINGS), timeout=TIMEOUT
    )

    assert result.code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, (result.stdout, result.stderr)
    problems = [line for line in result.stdout_lines if line.startswith("problem:")]
    assert len(problems) == 1, result.stdout
    assert "hot standby" in problems[0] and "in recovery" in problems[0], result.stdout
    assert "ok: database reachable" not in result.stdout, result.stdout


async def test_serve_waiting_for_database_exits_0_on_sigterm() -> None:
    """`notifyd serve` still retrying its first connection stops promptly on SIGTERM."""
    # Nothing listens on this port: serve stays in its connect-retry loop.
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    env = serve_env(unreachable, free_port(), **_SERVE_SETTINGS)
    async with running_notifyd("serve", env=env, stop_signal=signal.SIGKILL) as serving:
        await serving.wait_for_output("cannot connect", "retrying", timeout=TIMEOUT)
        serving.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(serving.process.wait(), TIMEOUT)
        except TimeoutError:
            pytest.fail(f"serve ignored SIGTERM for {TIMEOUT}s while waiting for the database")
        assert code == 0, serving.output()
        assert "Traceback" not in serving.output(), serving.output()


async def test_check_with_listen_dsn_on_hot_standby_names_the_standby(
    primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    """`notifyd check` with NOTIFYD_LISTEN_DSN on a standby exits 1 naming the standby."""
    primary, standby = primary_and_standby
    env = serve_env(primary.dsn, free_port(), NOTIFYD_LISTEN_DSN=standby.dsn, **_SERVE_SETTINGS)

    result = await run_cli("check", env=env, timeout=TIMEOUT)

    assert result.code == 1, (result.stdout, result.stderr)
    problems = [line for line in result.stdout_lines if line.startswith("problem:")]
    assert len(problems) == 1, result.stdout
    assert "standby" in problems[0], result.stdout


async def test_serve_started_before_database_retries_then_delivers_once_it_is_up() -> None:
    """`notifyd serve` started before PostgreSQL retries, then turns healthy and pushes rows."""
    pg = EmbeddedPostgres(settings=_CLUSTER_SETTINGS)
    try:
        # The schema must exist before serve first connects (Daemon.start
        # checks it at once), so create it, then take the database away.
        pg.start()
        await _apply_schema(pg.dsn)
        pg.stop()
        assert not pg.is_running()

        port = free_port()
        env = serve_env(pg.dsn, port, **_SERVE_SETTINGS)
        async with running_notifyd("serve", env=env, stop_signal=signal.SIGKILL) as serving:
            line = await serving.wait_for_output("cannot connect", "retrying", timeout=TIMEOUT)
            assert "WARNING" in line, line
            # Still waiting, not given up: a second attempt is logged too.
            deadline = time.monotonic() + TIMEOUT
            while serving.output().count("retrying") < 2:
                assert serving.process.returncode is None, serving.output()
                assert time.monotonic() < deadline, serving.output()
                await asyncio.sleep(0.05)
            assert "Traceback" not in serving.output(), serving.output()

            await asyncio.to_thread(pg.start)
            await wait_until_healthy(port, serving, timeout=3 * TIMEOUT)

            async with connect(
                f"ws://127.0.0.1:{port}/ws/message?token={mint('alice')}", open_timeout=TIMEOUT
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
            assert code == 0, serving.output()
            assert "Traceback" not in serving.output(), serving.output()
    finally:
        await asyncio.to_thread(pg.cleanup)


async def test_serve_exits_1_in_one_line_when_notifies_never_reach_its_listen_connection(dsn):
    """A LISTEN DSN that swallows notifications (a transaction-mode pooler) stops `serve` with exit 1 and one line naming the setting."""
    port = free_port()
    async with notification_dropping_proxy(dsn) as listen_dsn:
        env = serve_env(
            dsn,
            port,
            NOTIFYD_LISTEN_DSN=listen_dsn,
            NOTIFYD_PROBE_INTERVAL_S="0.2",
            NOTIFYD_PROBE_TIMEOUT_S="0.5",
            **_SERVE_SETTINGS,
        )
        async with running_notifyd("serve", env=env, stdout_pipe=True) as serving:
            code = await asyncio.wait_for(serving.process.wait(), 6 * TIMEOUT)
            errors = serving.output()
    assert code == 1, errors
    assert len(errors.splitlines()) == 1, errors
    assert "NOTIFYD_LISTEN_DSN" in errors and "pooler" in errors, errors


async def test_serve_through_a_forwarding_proxy_stays_up_and_delivers(dsn, open_client, db):
    """The same proxy passing notifications through: `serve` proves its path and delivers, so the exit above is the pooler's doing."""
    port = free_port()
    async with notification_dropping_proxy(dsn, drop=False) as listen_dsn:
        env = serve_env(dsn, port, NOTIFYD_LISTEN_DSN=listen_dsn, **_SERVE_SETTINGS)
        async with running_notifyd("serve", env=env) as serving:
            await wait_until_healthy(port, serving, path="/readyz")
            client = await open_client(f"ws://127.0.0.1:{port}/ws/message?token={mint('alice')}")
            await insert(db, "alice", "through the proxy")
            frames = await client.messages_until("through the proxy")
            assert frames[-1]["toUser"] == "alice"
