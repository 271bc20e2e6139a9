"""
Operations: wss:// served directly, and one-line structured logs.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from notifyd.exceptions import ConfigError

from .certificates import self_signed
from .conftest import SECRET, TIMEOUT, insert
from .processes import free_port, mint, running_notifyd, serve_env, wait_until_healthy


async def test_wss_is_served_directly_with_a_configured_certificate(tmp_path, start_daemon, db):
    """With a certificate and key, clients connect over wss:// and get their messages."""
    cert_file, key_file = self_signed(tmp_path)
    daemon = await start_daemon(tls_cert_file=cert_file, tls_key_file=key_file)
    client_context = ssl.create_default_context(cafile=str(cert_file))
    url = f"wss://localhost:{daemon.port}/ws/message?token={daemon.token('alice')}"
    async with connect(url, ssl=client_context, open_timeout=TIMEOUT) as ws:
        assert json.loads(await ws.recv())["event"] == "hello"
        await insert(db, "alice", "over tls")
        while True:
            frame = json.loads(await ws.recv())
            if frame["event"] == "message":
                assert frame["title"] == "over tls"
                break


async def test_a_certificate_without_its_key_is_a_config_error(tmp_path, start_daemon):
    """Only one of the two TLS settings, or a key that does not match, stops the start."""
    cert_file, _ = self_signed(tmp_path)
    with pytest.raises(ConfigError, match="NOTIFYD_TLS_CERT_FILE"):
        await start_daemon(tls_cert_file=cert_file)
    other = tmp_path / "other"
    other.mkdir()
    _, mismatched = self_signed(other)
    with pytest.raises(ConfigError, match="cannot be used"):
        await start_daemon(tls_cert_file=cert_file, tls_key_file=mismatched)


async def test_json_logs_are_one_event_per_line_and_never_show_the_token(dsn):
    """NOTIFYD_LOG_FORMAT=json: every log line is a JSON event; auth failures name the reason and peer, not the token."""
    port = free_port()
    env = serve_env(
        dsn, port, NOTIFYD_JWT_SECRET=SECRET, NOTIFYD_LOG_FORMAT="json", NOTIFYD_LOG_LEVEL="INFO"
    )
    forged = mint("alice", secret="another-secret-" + "z" * 32)
    async with running_notifyd("serve", env=env) as server:
        await wait_until_healthy(port, server)
        with pytest.raises(InvalidStatus):
            async with connect(f"ws://127.0.0.1:{port}/ws/message?token={forged}"):
                pass
        line = await server.wait_for_output("auth failed", timeout=TIMEOUT)
        logs = server.output()
    events = [json.loads(raw) for raw in logs.splitlines() if raw.strip()]
    assert all({"level", "logger", "msg"} <= set(event) for event in events)
    assert any("LISTEN connection established" in event["msg"] for event in events)
    failure = json.loads(line)
    assert "reason=bad signature" in failure["msg"]
    assert failure["remote"].startswith("127.0.0.1:"), failure
    assert forged not in logs and forged.split(".")[2] not in logs


async def test_serve_logs_to_stdout_with_session_lines_naming_user_peer_and_close_code(dsn):
    """`serve` logs on stdout (stderr stays empty); a session's open and close lines carry its user, peer and close code."""
    port = free_port()
    env = serve_env(dsn, port, NOTIFYD_JWT_SECRET=SECRET, NOTIFYD_LOG_LEVEL="INFO")
    async with running_notifyd("serve", env=env, stdout_pipe=True) as server:
        assert server.process.stdout is not None
        await wait_until_healthy(port, server)
        async with connect(f"ws://127.0.0.1:{port}/ws/message?token={mint('alice')}") as ws:
            assert json.loads(await ws.recv())["event"] == "hello"
            local_port = ws.local_address[1]
        lines: list[str] = []
        while not any("closed" in line for line in lines):
            raw = await asyncio.wait_for(server.process.stdout.readline(), TIMEOUT)
            assert raw, f"stdout closed early: {lines}"
            lines.append(raw.decode())
        code = await server.stop()
        assert code == 0
        assert server.output() == "", server.output()
    peer = f"remote=127.0.0.1:{local_port}"
    opened = [line for line in lines if "opened: user=alice" in line]
    closed = [line for line in lines if "closed: user=alice code=1000" in line]
    assert len(opened) == 1 and peer in opened[0], lines
    assert len(closed) == 1 and peer in closed[0], lines
    # websockets' own bare "connection open" line is replaced, not doubled.
    assert not any('msg="connection open"' in line for line in lines), lines
