"""
Hostile clients: wrong origins, expired, foreign and forged tokens, other
users' ids, floods, malformed frames and hostile strings in every field a
client controls. No data of another user may reach a client, nothing may
change that the client does not own, and the server must stay healthy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from notifyd.auth import TokenVerifier
from notifyd.daemon import Daemon
from notifyd.db import role_sql

from .conftest import SECRET, TIMEOUT, insert, make_settings

_roles = itertools.count(1)

HOSTILE = [
    "'; DROP TABLE t_message_real_time; --",
    "' OR '1'='1",
    "bob' --",
    "bob",
    "*",
    "%",
    "_",
    "\\",
    '"',
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff\ud800",
    "%00",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "${jndi:ldap://example.invalid/a}",
    "\r\nX-Injected: yes",
    "\u202eevil",
    "😀" * 300,
    "a" * 70_000,
    "NULL",
    "~1",
    "~-1",
    "~99999999999999999999999",
    "0-0",
    "1-2.3,4",
    "$1",
    "\\x27",
]


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def _health(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    return int(data.split(b" ", 2)[1])


async def _drain_until_pong(ws: Any) -> list[dict[str, Any]]:
    """Everything the server sent before answering a ping."""
    await ws.send('{"action":"ping"}')
    frames = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        if frame["event"] == "pong":
            return frames
        frames.append(frame)


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]


async def _bob_state(db: Any) -> list[tuple[str, str, str]]:
    rows = await db.fetch(
        "SELECT id::text, title, is_read FROM t_message_real_time WHERE to_user = 'bob' ORDER BY seq"
    )
    return [tuple(row) for row in rows]


@pytest.fixture(params=["owner", "notifyd_daemon"])
async def daemon_dsn(request, db, dsn) -> AsyncIterator[str]:
    """
    The daemon's DSN: the schema owner's, and a login role with only
    role.sql's rights (least privilege, as deployed).
    """
    if request.param == "owner":
        yield dsn
        return
    await db.execute(role_sql())
    name = f"notifyd_hostile_{os.getpid()}_{next(_roles)}"
    await db.execute(f"CREATE ROLE {name} LOGIN IN ROLE notifyd_daemon")
    parts = urlsplit(dsn)
    yield urlunsplit(parts._replace(netloc=f"{name}@{parts.netloc.rpartition('@')[2]}"))
    await db.execute(f"DROP OWNED BY {name}")
    await db.execute(f"DROP ROLE {name}")


async def test_hostile_strings_in_every_frame_field_change_nothing_of_another_user(
    daemon_dsn, start_daemon, db, caplog
):
    """
    Every action, every field, every hostile string, as the schema owner and
    as the least-privilege role: alice gets only errors or her own data,
    bob's rows stay exactly as they were, the table survives, and alice's
    session still answers.
    """
    caplog.set_level(logging.INFO)
    daemon = await start_daemon(dsn=daemon_dsn, client_frames_per_s=0, max_frame_bytes=1024 * 1024)
    bob_id = await insert(db, "bob", "bob-secret", "for bob only")
    await insert(db, "alice", "alice-own")
    before = await _bob_state(db)
    async with connect(daemon.url("alice"), open_timeout=TIMEOUT, max_size=None) as ws:
        assert json.loads(await ws.recv())["event"] == "hello"
        for text in [*HOSTILE, bob_id, bob_id.upper(), f" {bob_id}"]:
            requests = [
                {"action": "read", "ids": [text], "id": text},
                {"action": "read", "ids": [bob_id, text]},
                {"action": "read_all", "type": text, "id": text},
                {"action": "history", "before": text, "id": text},
                {"action": "history", "type": text, "unread_only": True},
                {"action": "history", "limit": text},
                {
                    "action": "demo_send",
                    "to": text,
                    "title": text,
                    "content": text,
                    "skipUrl": text,
                },
                {"action": "auth", "token": text, "since": text},
                {"action": text},
                {"action": "ping", "id": text},
            ]
            for request in requests:
                await ws.send(json.dumps(request))
            for frame in await _drain_until_pong(ws):
                assert frame["event"] in {"error", "history", "read", "unread"}, frame
                assert "bob-secret" not in json.dumps(frame) and "for bob only" not in json.dumps(
                    frame
                )
                if frame["event"] == "read":
                    assert bob_id not in frame.get("ids", []), frame
        # Events still on their way would otherwise fill the client's queue
        # and hold back its close.
        reader = asyncio.create_task(_read_all(ws))
        await ws.close()
        await reader
    assert await _bob_state(db) == before
    assert await db.fetchval("SELECT count(*) FROM t_message_real_time") == 2
    assert await _health(daemon.port) == 200
    _no_errors_logged(caplog)


async def test_refresh_with_hostile_tokens_ends_only_that_session(daemon, open_client, caplog):
    """A hostile refresh token is a 4401 for its own session; a bystander is untouched."""
    caplog.set_level(logging.INFO)
    bystander = await open_client(daemon.url("bob"))
    for text in HOSTILE:
        client = await open_client(daemon.url("alice"))
        await client.send({"action": "refresh", "token": text})
        with pytest.raises(ConnectionClosed):
            await client.recv()
        # Over NOTIFYD_MAX_FRAME_BYTES the frame itself is refused first.
        assert client.ws.close_code == (1009 if len(text) > 64 * 1024 else 4401), text[:40]
    assert await _drain_until_pong(bystander.ws) == []
    _no_errors_logged(caplog)


async def test_hostile_strings_in_demo_send_insert_them_as_plain_data(dsn, db):
    """In the demo, whatever a client types is stored verbatim (or refused), never run as SQL."""
    settings = make_settings(dsn, client_frames_per_s=0, max_frame_bytes=1024 * 1024)
    verifier = TokenVerifier.from_settings(settings)
    users = {"alice": verifier.mint("alice"), "bob": verifier.mint("bob")}
    async with Daemon(settings, verifier, demo_users=users) as demo:
        async with connect(f"ws://127.0.0.1:{demo.port}/ws/message?token={users['alice']}") as ws:
            assert json.loads(await ws.recv())["event"] == "hello"
            for text in HOSTILE[:20]:
                await ws.send(
                    json.dumps(
                        {"action": "demo_send", "to": "bob", "title": text[:255], "content": text}
                    )
                )
            await _drain_until_pong(ws)
        stored = await db.fetch(
            "SELECT title, content, send_user FROM t_message_real_time WHERE to_user = 'bob'"
        )
        storable = [
            t for t in HOSTILE[:20] if "\x00" not in t and "\ud800" not in t and "\udfff" not in t
        ]
        assert sorted(row["content"] for row in stored) == sorted(storable)
        assert {row["send_user"] for row in stored} == {"alice"}


async def _probe(port: int, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, object]:
    """
    A raw upgrade request with exactly these bytes. Returns the status (0 if
    none) and, after a 101, what a ping frame gets: the close code when the
    server still waits for auth, or the first event when a session opened.
    """
    lines = [
        b"GET " + path.encode("latin-1", "replace") + b" HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
        *(name + b": " + value for name, value in headers),
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            return status, None
        ping = b'{"action":"ping"}'
        # A masked text frame with an all-zero mask: the payload goes as is.
        writer.write(bytes([0x81, 0x80 | len(ping)]) + b"\0\0\0\0" + ping)
        first = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
        length = first[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        payload = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        if first[0] & 0x0F == 0x8:
            return status, int.from_bytes(payload[:2], "big")
        return status, json.loads(payload)["event"]
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0, None
    finally:
        writer.close()


def _header_safe(text: str) -> bytes:
    # What can travel in a header at all: latin-1, CR/LF kept to test injection.
    return text.encode("latin-1", "replace")[:10_000]


async def test_hostile_strings_in_every_handshake_field_are_refused_or_ignored(
    start_daemon, open_client, db, caplog
):
    """
    Token (query, header, cookie, subprotocol), since, path user and Origin:
    each hostile value gets 400/401/403/404/431 or an upgrade that still
    needs a real token; none opens a session, bob keeps receiving.
    """
    caplog.set_level(logging.INFO)
    daemon = await start_daemon(allowed_origins=["https://app.example.com"])
    bystander = await open_client(daemon.url("bob"))
    for text in HOSTILE:
        raw = _header_safe(text)
        # Percent-encoded bytes, lone surrogates included (as invalid UTF-8).
        encoded = quote(text.encode("utf-8", "surrogatepass"), safe="")
        cases = [
            (f"/ws/message?token={encoded}", []),
            (f"/ws/message?since={encoded}&token={daemon.token('alice')}", []),
            (f"/ws/message/{encoded}?token={daemon.token('alice')}", []),
            ("/ws/message", [(b"Authorization", b"Bearer " + raw)]),
            ("/ws/message", [(b"Cookie", b"notifyd_token=" + raw)]),
            ("/ws/message", [(b"Sec-WebSocket-Protocol", b"notifyd.v1, bearer." + raw)]),
            (f"/ws/message?token={daemon.token('alice')}", [(b"Origin", raw)]),
        ]
        for path, headers in cases:
            status, after = await _probe(daemon.port, path, headers)
            case = (text[:40], path[:60], [value[:60] for _, value in headers], status, after)
            if "since=" in path:
                # alice's own valid token with a hostile cursor: her session, or a 400.
                assert (status, after) in {(101, "hello"), (400, None), (414, None), (0, None)}, (
                    case
                )
            elif status == 101:
                # No usable credential in the handshake: still waiting for auth.
                assert after == 4401, case
            else:
                assert status in {0, 400, 401, 403, 404, 414, 431}, case
    await insert(db, "bob", "still-bob")
    assert [m["title"] for m in await bystander.messages_until("still-bob")] == ["still-bob"]
    _no_errors_logged(caplog)


async def test_forged_and_foreign_tokens_never_open_another_users_session(daemon, open_client):
    """alg none, another key, bob's path with alice's token, expired: all refused."""
    now = int(time.time())
    forged = [
        _b64({"alg": "none", "typ": "JWT"}) + "." + _b64({"sub": "bob", "exp": now + 60}) + ".",
        jwt.encode({"sub": "bob", "exp": now + 60}, "not-" + SECRET, "HS256"),
        jwt.encode({"sub": "bob", "exp": now - 60}, SECRET, "HS256"),
        daemon.token("alice")[:-2] + "xx",
        daemon.token("alice").replace(".", ".e30.", 1),
    ]
    for token in forged:
        with pytest.raises(InvalidStatus) as info:
            async with connect(daemon.url(token=token), open_timeout=TIMEOUT):
                pass
        assert info.value.response.status_code == 401
        client = await open_client(daemon.url(), hello=False)
        await client.send({"action": "auth", "token": token})
        with pytest.raises(ConnectionClosed):
            await client.recv()
        assert client.ws.close_code == 4401
    with pytest.raises(InvalidStatus) as info:
        async with connect(daemon.url("alice", path="/ws/message/bob"), open_timeout=TIMEOUT):
            pass
    assert info.value.response.status_code == 403


async def test_another_users_ids_and_cursors_reveal_and_change_nothing(daemon, open_client, db):
    """alice reads bob's id and pages history from bob's position: bob's row and view are unchanged."""
    bob = await open_client(daemon.url("bob"))
    bob_id = await insert(db, "bob", "bob-private")
    bob_seq = await db.fetchval("SELECT seq FROM t_message_real_time WHERE id::text = $1", bob_id)
    await insert(db, "alice", "alice-first")
    alice = await open_client(daemon.url("alice"))
    await alice.send({"action": "read", "ids": [bob_id]})
    await alice.send({"action": "history", "before": f"~{bob_seq + 1}", "id": "h"})
    frames = await _drain_until_pong(alice.ws)
    assert [f["event"] for f in frames] == ["history"]
    assert [m["toUser"] for m in frames[0]["messages"]] == []
    assert (
        await db.fetchval("SELECT is_read FROM t_message_real_time WHERE id::text = $1", bob_id)
        == "0"
    )
    bob_frames = await _drain_until_pong(bob.ws)
    assert {f["event"] for f in bob_frames} == {"message", "unread"}, bob_frames
    assert bob_frames[-1] == {"event": "unread", "count": 1, "byType": {"": 1}}


async def test_floods_from_several_clients_do_not_stop_delivery_to_others(
    start_daemon, open_client, db
):
    """Five flooders (frames) and fifty half-open handshakes: all flooders get 1008, bob gets his message."""
    daemon = await start_daemon(client_frames_per_s=20)
    bob = await open_client(daemon.url("bob"))
    flooders = [await open_client(daemon.url(f"f{i}")) for i in range(5)]

    async def flood(ws: Any) -> int | None:
        reader = asyncio.create_task(_read_all(ws))
        with contextlib.suppress(ConnectionClosed):
            for _ in range(1000):
                await ws.send('{"action":"history","limit":100}')
        await asyncio.wait_for(reader, TIMEOUT)
        return ws.close_code

    half_open = []
    for _ in range(50):
        _reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"GET /ws/message HTTP/1.1\r\nHost: x\r\n")
        half_open.append(writer)
    codes = await asyncio.gather(*(flood(client.ws) for client in flooders))
    assert codes == [1008] * 5
    await insert(db, "bob", "through-the-flood")
    assert [m["title"] for m in await bob.messages_until("through-the-flood")] == [
        "through-the-flood"
    ]
    for writer in half_open:
        writer.close()
    assert await _health(daemon.port) == 200


async def _read_all(ws: Any) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00\x01binary", 4401),
        ("not json", 4401),
        ('{"action":"auth","token":' + "[" * 10_000 + "]" * 10_000 + "}", 4401),
        ('{"action":"auth","token":"\\ud800"}', 4401),
        ('{"action":"auth","token":' + json.dumps("a" * 9000) + "}", 4401),
    ],
)
async def test_malformed_first_frames_close_with_a_defined_code(
    daemon, open_client, frame, code, caplog
):
    """Binary, non-JSON, deeply nested, lone surrogate, oversized token: 4401, no traceback."""
    caplog.set_level(logging.INFO)
    client = await open_client(daemon.url(), hello=False)
    await client.ws.send(frame)
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.ws.close_code == code
    _no_errors_logged(caplog)


async def test_invalid_utf8_text_frame_closes_1007_and_the_server_goes_on(
    daemon, open_client, caplog
):
    """A text frame that is not UTF-8 is a protocol error (1007), handled by the WebSocket layer."""
    caplog.set_level(logging.INFO)
    client = await open_client(daemon.url("alice"))
    client.ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))
    client.ws.send_data()
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.ws.close_code == 1007
    assert (await open_client(daemon.url("bob"))).frames[0]["user"] == "bob"
    _no_errors_logged(caplog)


@pytest.mark.parametrize(
    "since", ["0-0", "0-5.1", "1-99999999999999999999", "18446744073709551616-18446744073709551617"]
)
async def test_cursor_postgres_would_refuse_is_unusable_not_a_stall_for_everyone(
    daemon, open_client, db, since
):
    """
    A cursor that parses but is no valid pg_snapshot gets recovered=false for
    its own session; delivery to everyone else goes on.
    """
    bob = await open_client(daemon.url("bob"))
    alice = await open_client(daemon.url("alice", since=since), hello=False)
    hello = await alice.recv_event("hello")
    assert hello["recovered"] is False
    await insert(db, "bob", "not-stalled")
    assert [m["title"] for m in await bob.messages_until("not-stalled")] == ["not-stalled"]
