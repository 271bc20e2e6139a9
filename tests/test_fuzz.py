"""
Fuzzing: property-based tests of the client protocol decoder and the action
handlers, and a handshake fuzzer that sends malformed HTTP to a running
server. Afterwards the server must still serve, and hold no leaked tasks,
connections or sessions.

Hypothesis runs are bounded (and derandomised, so CI sees the same examples
on every run) to keep the suite fast.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from notifyd import client_frames, protocol
from notifyd.exceptions import ProtocolError

from .conftest import TIMEOUT, insert

BOUNDED = settings(max_examples=200, deadline=None, derandomize=True, database=None)
# Each example of the live tests costs a few round trips over loopback.
LIVE = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ACTIONS = [
    "auth",
    "refresh",
    "ping",
    "read",
    "read_all",
    "history",
    "demo_send",
    "",
    "PING",
    "nope",
]
ERROR_CODES = {"malformed", "unknown_action", "invalid", "unavailable", "busy"}
# Strings that break naive code: NUL, lone surrogates, quotes, huge numbers.
NASTY = [
    "\x00",
    "\ud800",
    "a\udfffb",
    "'",
    '"',
    "\\",
    "~1",
    "~99999999999999999999",
    "0-0",
    "%00",
    "*",
]

texts = st.one_of(st.text(max_size=40), st.sampled_from(NASTY), st.text(max_size=300))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
frames = st.fixed_dictionaries(
    {"action": st.one_of(st.sampled_from(ACTIONS), json_values)},
    optional={
        key: json_values | texts
        for key in (
            "token",
            "since",
            "ids",
            "id",
            "type",
            "before",
            "limit",
            "unread_only",
            "to",
            "title",
            "content",
            "skipUrl",
        )
    },
)
id_lists = st.lists(texts, min_size=0, max_size=8)
read_frames = st.fixed_dictionaries(
    {"action": st.just("read"), "ids": id_lists}, optional={"id": json_values}
)


def _encode(frame: Any) -> str:
    # Python's json writes NaN/Infinity and lone surrogates as escapes, as a
    # hostile client could; ensure_ascii keeps the text valid UTF-8.
    return json.dumps(frame)


def _clean(value: str) -> bool:
    return "\x00" not in value and all(not 0xD800 <= ord(char) <= 0xDFFF for char in value)


def _assert_safe(action: client_frames.ClientAction) -> None:
    """What the decoder lets through can reach Postgres and the encoder."""
    for value in vars_of(action):
        if isinstance(value, str):
            assert len(value) <= 8192 and (
                _clean(value) or isinstance(action, client_frames.Auth | client_frames.Refresh)
            )
    request_id = getattr(action, "request_id", None)
    orjson.dumps({"id": request_id})
    if isinstance(action, client_frames.Read):
        assert 1 <= len(action.ids) <= client_frames.MAX_READ_IDS
        assert all(isinstance(i, str) and _clean(i) and 0 < len(i) <= 255 for i in action.ids)
    if isinstance(action, client_frames.History):
        assert 1 <= action.limit <= client_frames.MAX_HISTORY_LIMIT
        assert action.before_seq is None or 0 <= action.before_seq < 2**63


def vars_of(action: client_frames.ClientAction) -> list[Any]:
    return [getattr(action, name) for name in getattr(action, "__slots__", ())]


def _decode(data: str | bytes) -> client_frames.ClientAction | ProtocolError:
    try:
        return client_frames.parse_client_frame(data)
    except ProtocolError as exc:
        return exc


# -- the decoder ----------------------------------------------------------------------


@BOUNDED
@given(data=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_decoder_turns_any_text_or_bytes_into_an_action_or_a_protocol_error(data):
    """No input makes parse_client_frame raise anything but ProtocolError."""
    result = _decode(data)
    if isinstance(result, ProtocolError):
        assert result.code in ERROR_CODES
    else:
        _assert_safe(result)


@BOUNDED
@given(frame=st.one_of(frames, json_values))
def test_decoder_on_arbitrary_json_gives_safe_actions_or_encodable_errors(frame):
    """Any JSON: a safe action, or an error frame that encodes (request id included)."""
    result = _decode(_encode(frame))
    if isinstance(result, ProtocolError):
        assert result.code in ERROR_CODES
        encoded = protocol.encode_error(result.code, result.message, result.request_id)
        assert json.loads(encoded)["event"] == "error"
    else:
        _assert_safe(result)


@BOUNDED
@given(frame=read_frames)
def test_read_keeps_exactly_the_clean_ids_or_refuses_the_frame(frame):
    """A read is accepted exactly when every id is a clean 1..255 string, and keeps them all."""
    result = _decode(_encode(frame))
    ids = frame["ids"]
    acceptable = bool(ids) and all(
        isinstance(i, str) and 0 < len(i) <= 255 and _clean(i) for i in ids
    )
    if acceptable:
        assert isinstance(result, client_frames.Read) and result.ids == ids
    else:
        assert isinstance(result, ProtocolError) and result.code == "invalid"


@BOUNDED
@given(
    ids=st.lists(st.text(min_size=1, max_size=5).filter(_clean), min_size=1, max_size=20),
    limit=st.integers(min_value=1, max_value=20),
)
def test_read_over_the_configured_limit_is_refused_and_names_the_limit(ids, limit):
    """More ids than max_read_ids: `invalid`, marked as the read_ids limit; otherwise a Read."""
    data = _encode({"action": "read", "ids": ids})
    try:
        action = client_frames.parse_client_frame(data, max_read_ids=limit)
    except ProtocolError as exc:
        assert len(ids) > limit and exc.limit == "read_ids"
    else:
        assert len(ids) <= limit and action.ids == ids


@BOUNDED
@given(request_id=json_values)
def test_echoed_request_ids_always_encode(request_id):
    """Whatever `id` a client sends, the answer that echoes it can be serialised."""
    result = _decode(_encode({"action": "history", "id": request_id}))
    assert isinstance(result, client_frames.History)
    protocol.encode_history(result.request_id, [], False)
    protocol.encode_refreshed(result.request_id, 1e9)


@LIVE
@given(
    token=st.one_of(
        st.from_regex(r"[0-9]{1,21}-[0-9]{1,21}(\.[0-9]{1,21}){0,3}", fullmatch=True),
        st.builds(
            lambda a, b, xs: f"{a}-{b}" + "".join(f".{x}" for x in xs),
            st.integers(0, 2**64 + 1),
            st.integers(0, 2**64 + 1),
            st.lists(st.integers(0, 2**64 + 1), max_size=3),
        ),
    )
)
async def test_every_cursor_that_decodes_is_a_snapshot_postgres_accepts(db, token):
    """What Cursor.decode lets through never makes delivery's query fail."""
    from notifyd.cursor import Cursor
    from notifyd.exceptions import CursorError

    try:
        cursor = Cursor.decode(token)
    except CursorError:
        return
    assert await db.fetchval("SELECT $1::text::pg_snapshot::text", cursor.base.to_pg()) is not None


# -- the action handlers, live ----------------------------------------------------------------


class _Alice:
    """One session of alice, reopened when a frame legitimately ended it."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.ws: Any = None

    async def session(self) -> Any:
        if self.ws is None or self.ws.close_code is not None:
            self.ws = await connect(self.daemon.url("alice"), open_timeout=TIMEOUT)
            assert json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))["event"] == "hello"
        return self.ws


@pytest.fixture
async def alice(start_daemon, db) -> Any:
    # No frame-rate limit here: the examples arrive faster than a person.
    daemon = await start_daemon(client_frames_per_s=0)
    await insert(db, "bob", "bob-only", "secret")
    await insert(db, "alice", "alice-own", "hers")
    holder = _Alice(daemon)
    yield holder
    if holder.ws is not None:
        await holder.ws.close()


@LIVE
@given(
    batch=st.lists(
        st.one_of(frames.map(_encode), json_values.map(_encode), st.text(max_size=50)),
        min_size=1,
        max_size=4,
    )
)
async def test_action_handlers_answer_arbitrary_frames_with_documented_outcomes(alice, batch):
    """
    Any frames: only documented events come back, history shows only alice's
    messages, and the session stays open unless a refresh ended it with 4401.
    """
    ws = await alice.session()
    for data in batch:
        await ws.send(data)
    await ws.send('{"action":"ping","id":"end"}')
    try:
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            event = frame["event"]
            if event == "pong":
                break
            assert event in {"error", "history", "read", "unread", "refreshed"}, frame
            if event == "error":
                assert frame["code"] in ERROR_CODES, frame
            if event == "history":
                assert {m["toUser"] for m in frame["messages"]} <= {"alice", "*"}, frame
    except ConnectionClosed:
        assert ws.close_code == 4401 and any('"refresh"' in data for data in batch), (
            ws.close_code,
            batch,
        )


# -- the handshake fuzzer -------------------------------------------------------------------------


def _upgrade(
    path: str = "/ws/message",
    *,
    version: str | None = "13",
    key: str | None = "dGhlIHNhbXBsZSBub25jZQ==",
    upgrade: str | None = "websocket",
    http: str = "HTTP/1.1",
    extra: bytes = b"",
) -> bytes:
    lines = [f"GET {path} {http}", "Host: 127.0.0.1"]
    if upgrade is not None:
        lines += [f"Upgrade: {upgrade}", "Connection: Upgrade"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    return "\r\n".join(lines).encode() + b"\r\n" + extra + b"\r\n"


MALFORMED: list[bytes] = [
    b"",
    b"\r\n\r\n",
    b"garbage\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    _upgrade(http="HTTP/1.0"),
    _upgrade(http="HTTP/9.9"),
    _upgrade(http="HTTX/1.1"),
    _upgrade(version="12"),
    _upgrade(version="13, 8"),
    _upgrade(version=None),
    _upgrade(key="short"),
    _upgrade(key="!!!!not-base64!!!!"),
    _upgrade(key=None),
    _upgrade(upgrade=None),
    _upgrade(upgrade="h2c"),
    _upgrade(extra=b"X-Big: " + b"a" * 100_000 + b"\r\n"),
    _upgrade(extra=b"".join(b"X-%d: y\r\n" % i for i in range(500))),
    _upgrade(extra=b"No colon here\r\n"),
    _upgrade(extra=b"X-Bytes: \xff\xfe\x00\x80\r\n"),
    _upgrade(extra=b" folded: continuation\r\n"),
    _upgrade(extra=b"Content-Length: 5\r\n\r\nhello"),
    _upgrade(extra=b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"),
    _upgrade(extra=b"Origin: https://a.example\r\nOrigin: https://b.example\r\n"),
    _upgrade(extra=b"Sec-WebSocket-Protocol: ,,,;;;\r\n"),
    _upgrade(extra=b"Sec-WebSocket-Protocol: bearer.\xff\r\n"),
    _upgrade(extra=b"Authorization: Bearer\r\n"),
    _upgrade(extra=b"Authorization: Bearer a b c\r\n"),
    _upgrade(extra=b'Cookie: notifyd_token="\r\n'),
    _upgrade(extra=b"Cookie: " + b";" * 10_000 + b"\r\n"),
    _upgrade("/ws/message/%ff%fe"),
    _upgrade("/ws/message/%00"),
    _upgrade("/ws/message?token=%0d%0aX-Injected:%20yes"),
    _upgrade("/ws/message?since=" + "~" * 4000),
    _upgrade("/ws/message/" + "a" * 8000),
    _upgrade("/" + "a" * 100_000),
    b"POST /ws/message HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"CONNECT 127.0.0.1:5432 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ws/message HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",  # never finished
    # Valid upgrades followed by broken WebSocket frames.
    _upgrade() + b"\x81\x05hello",  # unmasked client frame
    _upgrade() + b"\x81\xff" + b"\x7f" * 8 + b"mask",  # 2**63 length
    _upgrade() + b"\x8f\x80mask",  # reserved opcode
    _upgrade() + b"\x80\x80mask",  # continuation without a start
    _upgrade() + b"\x88\x82mask\x03\xe8"[:5],  # truncated close frame
    _upgrade() + b"\x89\x80mask" * 1000,  # a ping flood before auth
    _upgrade() + bytes(range(256)) * 4,
]


async def _send_raw(port: int, data: bytes) -> bytes:
    """
    Send ``data`` then end our side, and read whatever comes back until the
    server closes: the half-close makes every case end promptly.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def _settled(daemon: Any, sessions: int, tasks: int) -> None:
    """
    Wait until only the expected sessions remain and no more tasks than
    ``tasks`` (fewer is fine: delivery's read-ahead may have been in flight
    when the baseline was counted); fail with the leftovers.
    """
    server = daemon.daemon.server
    deadline = time.monotonic() + TIMEOUT
    while True:
        state = (
            len(server._server.all_connections),
            len(server._sessions),
            daemon.daemon.hub.session_count,
            len(server.access._expiries),
            len(asyncio.all_tasks()),
        )
        if state[:4] == (sessions,) * 4 and state[4] <= tasks:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"leaked (connections, sessions, hub, timers, tasks): {state}, want {sessions}/{tasks}"
            )
        await asyncio.sleep(0.05)


async def _assert_still_serves(daemon: Any, bystander: Any, db: Any, title: str) -> None:
    await insert(db, "bob", title)
    assert [m["title"] for m in await bystander.messages_until(title)] == [title]
    async with connect(daemon.url("carol"), open_timeout=TIMEOUT) as fresh:
        assert json.loads(await asyncio.wait_for(fresh.recv(), TIMEOUT))["user"] == "carol"


async def test_malformed_handshakes_are_refused_and_leave_nothing_behind(
    daemon, open_client, db, caplog
):
    """
    Bad request lines, headers, versions, keys, huge headers, broken frames:
    each is refused or dropped; a bystander session keeps receiving, a new
    session opens, and no connection, session, timer or task is left over.
    """
    caplog.set_level(logging.INFO)
    bystander = await open_client(daemon.url("bob"))
    await _settled(daemon, 1, tasks := len(asyncio.all_tasks()))
    for data in MALFORMED:
        answer = await _send_raw(daemon.port, data)
        if data.startswith(_upgrade()):
            # Frames sent before the 101 (which RFC 6455 forbids) may get
            # answers ahead of the response; what matters is what follows.
            continue
        status = answer.split(b"\r\n", 1)[0]
        assert status == b"" or status.startswith(b"HTTP/1.1 "), (data[:80], answer[:200])
        assert not status.startswith(b"HTTP/1.1 101"), data[:80]
    await _settled(daemon, 1, tasks)
    await _assert_still_serves(daemon, bystander, db, "after-fuzz")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mutation=st.tuples(
        st.integers(min_value=0, max_value=len(_upgrade()) - 1),
        st.integers(min_value=0, max_value=40),
        st.binary(max_size=40),
    )
)
async def test_randomly_mutated_handshakes_never_break_the_server(fuzz_target, mutation):
    """A valid upgrade with a random slice replaced by random bytes: refused or served, never a crash."""
    daemon, _ = fuzz_target
    at, cut, insert_bytes = mutation
    valid = _upgrade()
    data = valid[:at] + insert_bytes + valid[at + cut :]
    answer = await _send_raw(daemon.port, data)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 "), (data, answer[:200])


@pytest.fixture
async def fuzz_target(daemon, open_client, db, caplog) -> Any:
    """A daemon with a bystander; after the mutations it must still serve and hold nothing."""
    caplog.set_level(logging.INFO)
    bystander = await open_client(daemon.url("bob"))
    await _settled(daemon, 1, tasks := len(asyncio.all_tasks()))
    yield daemon, bystander
    await _settled(daemon, 1, tasks)
    await _assert_still_serves(daemon, bystander, db, "after-mutations")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]
