"""
The ``notifyd`` command line, run as real subprocesses (``python -m notifyd``)
so exit codes, stdout and stderr are exactly what an operator sees.

Every subprocess gets the test runner's environment minus any ``NOTIFYD_*``
variable, plus what the test sets.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import signal
import time
from urllib.parse import urlsplit

import jwt
import pytest

from notifyd.db import Database

from .conftest import SECRET, TIMEOUT, insert
from .processes import (
    CLI_TIMEOUT,
    CliResult,
    clean_env,
    free_port,
    mint,
    run_cli,
    run_command,
    running_notifyd,
    serve_env,
    wait_until_healthy,
    wait_until_refused,
)


def assert_one_line_error(result: CliResult, *must_contain: str) -> None:
    """
    Exactly one non-empty stderr line, no traceback, containing each string.
    """
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    for text in must_contain:
        assert text in result.stderr_lines[0], result.stderr


# -- send, token ------------------------------------------------------------


async def test_send_delivers_to_a_connected_client_and_prints_the_same_id(dsn, daemon, open_client):
    """`notifyd send` inserts a row that alice's client receives; stdout is its id."""
    client = await open_client(daemon.url("alice"))
    result = await run_cli(
        "send", "--to", "alice", "--title", "T", "--content", "C", env=clean_env(NOTIFYD_DSN=dsn)
    )
    assert result.code == 0, result.stderr
    assert len(result.stdout_lines) == 1, result.stdout
    printed_id = result.stdout_lines[0].strip()
    frame = (await client.messages_until("T"))[-1]
    assert frame["id"] == printed_id
    assert (frame["content"], frame["toUser"]) == ("C", "alice")


async def test_token_prints_one_line_that_opens_a_session_as_the_user(daemon, open_client):
    """`notifyd token alice` prints exactly one line: a JWT the daemon accepts as alice."""
    result = await run_cli("token", "alice", env=clean_env(NOTIFYD_JWT_SECRET=SECRET))
    assert result.code == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1, result.stdout
    token = result.stdout.strip()
    client = await open_client(
        f"ws://127.0.0.1:{daemon.port}/ws/message?token={token}", hello=False
    )
    hello = await client.recv_event("hello")
    assert hello["user"] == "alice"


async def test_token_ttl_sets_exp_that_many_seconds_ahead():
    """`notifyd token --ttl 60` signs a token whose exp is about 60 s from now."""
    before = time.time()
    result = await run_cli(
        "token", "alice", "--ttl", "60", env=clean_env(NOTIFYD_JWT_SECRET=SECRET)
    )
    after = time.time()
    assert result.code == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert before + 60 - 1 <= claims["exp"] <= after + 60 + 1


# -- configuration errors ---------------------------------------------------


async def test_serve_without_dsn_exits_2_with_one_line_naming_notifyd_dsn():
    """`notifyd serve` with no NOTIFYD_DSN exits 2 with a single stderr line about NOTIFYD_DSN."""
    result = await run_cli("serve", env=clean_env(NOTIFYD_JWT_SECRET=SECRET))
    assert result.code == 2, result
    assert_one_line_error(result, "NOTIFYD_DSN")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("NOTIFYD_PORT", "notaport"), ("NOTIFYD_MAX_SESSIONS_PER_USER", "0")],
)
async def test_invalid_setting_exits_2_with_one_line_naming_the_variable(dsn, variable, value):
    """An invalid NOTIFYD_* value exits 2 with one stderr line naming that variable, no traceback."""
    env = clean_env(NOTIFYD_DSN=dsn, NOTIFYD_JWT_SECRET=SECRET, **{variable: value})
    result = await run_cli("serve", env=env)
    assert result.code == 2, result
    assert_one_line_error(result, variable)


async def test_dev_mode_on_a_non_loopback_host_is_refused_with_exit_2(dsn):
    """Path-user dev mode with NOTIFYD_HOST=0.0.0.0 exits 2 with a one-line error."""
    env = clean_env(
        NOTIFYD_DSN=dsn, NOTIFYD_DEV_INSECURE_USER_FROM_PATH="true", NOTIFYD_HOST="0.0.0.0"
    )
    result = await run_cli("serve", env=env)
    assert result.code == 2, result
    assert_one_line_error(result, "NOTIFYD_DEV_INSECURE_USER_FROM_PATH", "loopback")


@pytest.mark.parametrize("args", [("--help",), ("send", "--help")])
async def test_help_exits_0_and_prints_usage(args):
    """`notifyd --help` and `notifyd send --help` exit 0 with usage on stdout."""
    result = await run_cli(*args, env=clean_env())
    assert result.code == 0, result
    assert result.stdout.startswith("usage: notifyd"), result.stdout
    assert "Traceback" not in result.stderr


# -- check, init-db ---------------------------------------------------------


async def test_check_passes_on_a_ready_database(dsn):
    """`notifyd check` with the schema and a secret exits 0 and every line is ok."""
    result = await run_cli("check", env=clean_env(NOTIFYD_DSN=dsn, NOTIFYD_JWT_SECRET=SECRET))
    assert result.code == 0, result
    lines = result.stdout_lines
    assert lines and all(line.startswith("ok: ") for line in lines), result.stdout
    assert any("LISTEN/NOTIFY round trip works" in line for line in lines), result.stdout


async def test_check_fails_and_names_the_missing_table(empty_dsn):
    """`notifyd check` on a database without the schema exits 1 and says the table is missing."""
    result = await run_cli("check", env=clean_env(NOTIFYD_DSN=empty_dsn, NOTIFYD_JWT_SECRET=SECRET))
    assert result.code == 1, result
    problems = [line for line in result.stdout_lines if line.startswith("problem: ")]
    assert len(problems) == 1, result.stdout
    assert "t_message_real_time" in problems[0] and "does not exist" in problems[0]
    assert "Traceback" not in result.stderr


async def test_check_with_unreachable_database_exits_1_with_one_clear_line():
    """`notifyd check` against a closed port exits 1 with one 'cannot connect' line, no traceback, in time."""
    port = free_port()
    unreachable = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    started = time.monotonic()
    result = await run_cli(
        "check",
        env=clean_env(NOTIFYD_DSN=unreachable, NOTIFYD_JWT_SECRET=SECRET),
        timeout=TIMEOUT,
    )
    assert time.monotonic() - started < TIMEOUT
    assert result.code == 1, result
    problems = [line for line in result.stdout_lines if line.startswith("problem: ")]
    assert len(problems) == 1, result.stdout
    assert "cannot connect to the database" in problems[0], result.stdout
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr_lines == [], result.stderr


async def test_init_db_on_an_empty_database_exits_0_and_leaves_no_schema_problems(empty_dsn):
    """`notifyd init-db` creates the schema: exit 0, then schema_problems() is empty."""
    database = await Database.connect(empty_dsn)
    try:
        assert await database.schema_problems() != []
        result = await run_cli("init-db", env=clean_env(NOTIFYD_DSN=empty_dsn))
        assert result.code == 0, result
        assert "Traceback" not in result.stderr
        assert await database.schema_problems() == []
    finally:
        await database.close()


# -- serve, demo --------------------------------------------------------------


async def test_serve_delivers_and_on_sigterm_closes_sessions_with_1012_and_exits_0(
    dsn, db, open_client
):
    """`notifyd serve` pushes an inserted row; SIGTERM closes the client with 1012 and exits 0."""
    port = free_port()
    env = serve_env(
        dsn,
        port,
        NOTIFYD_HOST="127.0.0.1",
        NOTIFYD_JWT_SECRET=SECRET,
        NOTIFYD_PROBE_INTERVAL_S="1",
        NOTIFYD_SHUTDOWN_TIMEOUT_S="5",
    )
    async with running_notifyd("serve", env=env, stop_signal=signal.SIGINT) as server:
        await wait_until_healthy(port, server)
        client = await open_client(f"ws://127.0.0.1:{port}/ws/message?token={mint('alice')}")
        message_id = await insert(db, "alice", "via-serve", "hello")
        frame = (await client.messages_until("via-serve"))[-1]
        assert frame["id"] == message_id

        server.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(client.ws.wait_closed(), TIMEOUT)
        assert client.ws.close_code == 1012
        code = await asyncio.wait_for(server.process.wait(), TIMEOUT)
        assert code == 0, server.output()
        assert "Traceback" not in server.output()


async def test_demo_runs_embedded_postgres_delivers_printed_send_and_stops_it_on_sigint(
    open_client,
):
    """`notifyd demo`: printed URL and send line work; SIGINT exits 0 and the embedded postmaster is gone."""
    port = free_port()
    env = clean_env(NOTIFYD_LOG_LEVEL="WARNING")
    # SIGINT on the way out too, so the demo stops its embedded PostgreSQL.
    async with running_notifyd(
        "demo", "--port", str(port), env=env, stdout_pipe=True, stop_signal=signal.SIGINT
    ) as demo:
        assert demo.process.stdout is not None
        lines: dict[str, str] = {}
        deadline = time.monotonic() + 6 * TIMEOUT
        while "send" not in lines:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"demo printed no send line in time: {lines}\n{demo.output()}"
            try:
                raw = await asyncio.wait_for(demo.process.stdout.readline(), remaining)
            except TimeoutError:
                pytest.fail(f"demo printed no send line in time: {lines}\n{demo.output()}")
            assert raw, f"demo stdout closed early: {lines}\n{demo.output()}"
            line = raw.decode().strip()
            if line.startswith("token for demo-user:"):
                lines["token"] = line.split(":", 1)[1].strip()
            elif line.startswith("WebSocket URL:"):
                lines["url"] = line.split(":", 1)[1].strip()
            elif line.startswith("database DSN:"):
                lines["dsn"] = line.split(":", 1)[1].strip()
            elif " -m notifyd send " in line:
                lines["send"] = line
        assert lines.keys() == {"token", "url", "dsn", "send"}, lines
        assert lines["url"] == f"ws://127.0.0.1:{port}/ws/message?token={lines['token']}"
        pg_port = urlsplit(lines["dsn"]).port
        assert pg_port is not None and pg_port != port

        client = await open_client(lines["url"])
        sent = await run_command("bash", "-c", lines["send"], env=clean_env(), timeout=CLI_TIMEOUT)
        assert sent.code == 0, (shlex.split(lines["send"]), sent.stderr)
        frame = (await client.messages_until("Hello"))[-1]
        assert frame["id"] == sent.stdout.strip()
        assert (frame["toUser"], frame["content"]) == ("demo-user", "Your first message")

        demo.process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(demo.process.wait(), 2 * TIMEOUT)
        assert code == 0, demo.output()
        assert "Traceback" not in demo.output()
        await wait_until_refused(pg_port, TIMEOUT)


# -- error paths that once produced tracebacks or leftovers ------------------


async def test_send_without_the_table_fails_with_one_line_and_no_traceback(empty_dsn):
    """`notifyd send` on a database lacking the schema exits 1 with one stderr line naming the table."""
    result = await run_cli(
        "send", "--to", "alice", "--title", "T", env=clean_env(NOTIFYD_DSN=empty_dsn)
    )
    assert result.code == 1, result
    assert_one_line_error(result, "t_message_real_time")


async def test_check_with_a_malformed_dsn_port_reports_a_problem_line_not_a_traceback():
    """`notifyd check` with a non-numeric port in NOTIFYD_DSN exits 1 with a problem line, no traceback."""
    env = clean_env(
        NOTIFYD_DSN="postgresql://postgres@127.0.0.1:notaport/postgres", NOTIFYD_JWT_SECRET=SECRET
    )
    result = await run_cli("check", env=env)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.code == 1, result
    assert any(line.startswith("problem: ") for line in result.stdout_lines), result.stdout


@pytest.mark.parametrize(
    "sigint_ignored", [False, True], ids=["sigint_default", "sigint_ignored_by_parent"]
)
async def test_demo_interrupted_while_embedded_postgres_starts_leaves_no_postmaster(
    sigint_ignored: bool,
):
    """
    SIGINT to `notifyd demo` between initdb and pg_ctl start still leaves no
    PostgreSQL running, also when its parent started it with SIGINT ignored.
    """
    from notifyd.demo.embedded import EmbeddedPostgres

    data_dir: str | None = None
    try:
        # The log (stdout) is a pipe, read line by line: SIGINT must land right after initdb.
        async with running_notifyd(
            "demo",
            "--port",
            str(free_port()),
            env=clean_env(NOTIFYD_LOG_LEVEL="INFO"),
            stdout_pipe=True,
            stop_signal=signal.SIGKILL,
            sigint_ignored=sigint_ignored,
        ) as demo:
            process = demo.process
            assert process.stdout is not None
            deadline = time.monotonic() + 6 * TIMEOUT
            while data_dir is None:
                raw = await asyncio.wait_for(
                    process.stdout.readline(), max(0.01, deadline - time.monotonic())
                )
                assert raw, "demo exited before initialising its cluster"
                found = re.search(r"initialised PostgreSQL cluster in (\S+)", raw.decode())
                if found:
                    data_dir = found.group(1)
            # initdb is done and pg_ctl start is about to run in a worker thread.
            process.send_signal(signal.SIGINT)
            await asyncio.wait_for(process.communicate(), 2 * TIMEOUT)
            cluster = EmbeddedPostgres(data_dir=data_dir)
            assert not cluster.is_running(), f"postmaster of {data_dir} is still running"
    finally:
        if data_dir is not None:
            # Stop (by the pid in postmaster.pid) and remove what the demo left.
            leftover = EmbeddedPostgres(data_dir=data_dir)
            await asyncio.to_thread(leftover.cleanup)
            await asyncio.to_thread(shutil.rmtree, data_dir, True)


def test_event_loop_setting_picks_uvloop_when_installed_and_asyncio_on_request() -> None:
    import uvloop

    from notifyd.loop import loop_factory

    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None


def test_event_loop_uvloop_without_uvloop_installed_is_a_one_line_config_error(monkeypatch) -> None:
    import sys

    from notifyd.exceptions import ConfigError
    from notifyd.loop import loop_factory

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match=r"NOTIFYD_EVENT_LOOP=uvloop.*not installed"):
        loop_factory("uvloop")
