"""
Who may open a session: tokens in the handshake, first-frame auth, paths.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import SECRET, TIMEOUT, insert


async def _status_of(url: str, **kwargs) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, open_timeout=TIMEOUT, **kwargs):
            pass
    return info.value.response.status_code


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "case",
    ["expired", "bad-signature", "alg-none", "garbage", "no-exp", "wrong-claim-type"],
)
async def test_invalid_token_in_handshake_is_refused_with_401(daemon, case):
    """Every kind of bad token is answered 401 before the upgrade."""
    now = int(time.time())
    token = {
        "expired": jwt.encode({"sub": "alice", "exp": now - 3600}, SECRET, "HS256"),
        "bad-signature": jwt.encode(
            {"sub": "alice", "exp": now + 3600}, "other-" + SECRET, "HS256"
        ),
        "alg-none": _b64({"alg": "none", "typ": "JWT"})
        + "."
        + _b64({"sub": "alice", "exp": now + 3600})
        + ".",
        "garbage": "not.a.token",
        "no-exp": jwt.encode({"sub": "alice"}, SECRET, "HS256"),
        "wrong-claim-type": jwt.encode({"sub": ["alice"], "exp": now + 3600}, SECRET, "HS256"),
    }[case]
    assert await _status_of(f"ws://127.0.0.1:{daemon.port}/ws/message?token={token}") == 401


async def test_unauthorized_response_reveals_nothing_about_the_reason(daemon):
    """The 401 body is the same for an expired and a forged token."""
    bodies = set()
    for token in (
        jwt.encode({"sub": "a", "exp": int(time.time()) - 10}, SECRET, "HS256"),
        jwt.encode({"sub": "a", "exp": int(time.time()) + 99}, "forged-" + SECRET, "HS256"),
    ):
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"ws://127.0.0.1:{daemon.port}/ws/message?token={token}"):
                pass
        bodies.add(bytes(info.value.response.body))
    assert len(bodies) == 1


async def test_path_naming_another_user_is_refused_with_403(daemon):
    """/ws/message/{userId} must name the token's user."""
    url = f"ws://127.0.0.1:{daemon.port}/ws/message/bob?token={daemon.token('alice')}"
    assert await _status_of(url) == 403


async def test_path_naming_the_token_user_is_accepted(daemon, open_client, db):
    """/ws/message/alice with alice's token works like /ws/message."""
    client = await open_client(daemon.url("alice", path="/ws/message/alice"))
    await insert(db, "alice", "hello")
    assert [m["title"] for m in await client.messages_until("hello")] == ["hello"]


async def test_unknown_path_is_404(daemon):
    """Only the message endpoints upgrade."""
    assert (
        await _status_of(f"ws://127.0.0.1:{daemon.port}/ws/other?token={daemon.token('a')}") == 404
    )


async def test_token_in_authorization_header_is_accepted(daemon, open_client):
    """Authorization: Bearer authenticates the handshake."""
    client = await open_client(
        f"ws://127.0.0.1:{daemon.port}/ws/message",
        additional_headers={"Authorization": f"Bearer {daemon.token('alice')}"},
    )
    assert client.frames[0]["user"] == "alice"


async def test_token_in_cookie_is_accepted(daemon, open_client):
    """The configured cookie authenticates the handshake."""
    client = await open_client(
        f"ws://127.0.0.1:{daemon.port}/ws/message",
        additional_headers={"Cookie": f"theme=dark; notifyd_token={daemon.token('alice')}"},
    )
    assert client.frames[0]["user"] == "alice"


async def test_first_frame_auth_opens_the_session(daemon, open_client, db):
    """With no credential in the handshake, an auth frame authenticates."""
    client = await open_client(f"ws://127.0.0.1:{daemon.port}/ws/message", hello=False)
    await client.send({"action": "auth", "token": daemon.token("alice")})
    hello = await client.recv_event("hello")
    assert hello["user"] == "alice"
    await insert(db, "alice", "after-auth")
    assert [m["title"] for m in await client.messages_until("after-auth")] == ["after-auth"]


async def test_server_sends_nothing_before_first_frame_auth(daemon, open_client, db):
    """An unauthenticated connection receives nothing, even for a message addressed to anyone."""
    client = await open_client(f"ws://127.0.0.1:{daemon.port}/ws/message", hello=False)
    await insert(db, "alice", "not-for-you")
    await client.send({"action": "auth", "token": daemon.token("bob")})
    assert (await client.recv())["event"] == "hello"
    await insert(db, "bob", "bob-sentinel")
    assert [m["title"] for m in await client.messages_until("bob-sentinel")] == ["bob-sentinel"]


@pytest.mark.parametrize(
    "frame",
    [
        {"action": "auth", "token": "forged"},
        {"action": "ping"},
        "not json",
    ],
)
async def test_bad_first_frame_closes_with_4401(daemon, open_client, frame):
    """A bad token or any other first frame closes the session with 4401."""
    client = await open_client(f"ws://127.0.0.1:{daemon.port}/ws/message", hello=False)
    await client.ws.send(frame if isinstance(frame, str) else json.dumps(frame))
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.ws.close_code == 4401


async def test_first_frame_auth_for_another_users_path_closes_with_4401(daemon, open_client):
    """The path's user must match a first-frame token too."""
    client = await open_client(f"ws://127.0.0.1:{daemon.port}/ws/message/bob", hello=False)
    await client.send({"action": "auth", "token": daemon.token("alice")})
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.ws.close_code == 4401


async def test_no_auth_within_the_deadline_closes_with_4408(start_daemon, open_client):
    """A connection that never authenticates is closed with 4408."""
    daemon = await start_daemon(auth_timeout_s=0.3)
    client = await open_client(f"ws://127.0.0.1:{daemon.port}/ws/message", hello=False)
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.ws.close_code == 4408


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Message
    body: bytes


async def _get(url: str, method: str = "GET") -> _Answer:
    """
    One plain HTTP request, answered whatever its status; the connection
    is closed before returning.
    """

    def fetch() -> _Answer:
        request = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return _Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as refused:
            with refused:
                return _Answer(refused.code, refused.headers, refused.read())

    return await asyncio.to_thread(fetch)


async def test_readyz_reports_ok_once_the_listen_path_is_proven(daemon):
    """GET /readyz answers 200 with the listener's figures once a probe returned."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        response = await _get(f"http://127.0.0.1:{daemon.port}/readyz")
        if response.status == 200:
            break
        assert response.status == 503
        assert time.monotonic() < deadline, "health never became ok"
        await asyncio.sleep(0.05)
    body = json.loads(response.body)
    assert body["status"] == "ok" and body["listener"]["connected"] is True
    assert body["listener"]["probe_rtt_ms"] is not None


async def test_readyz_is_503_and_healthz_200_while_listen_is_down(daemon, db):
    """Liveness stays up while the LISTEN path is down; readiness does not."""
    # The daemon is up once delivery is; its LISTEN connection may still be
    # opening, and a terminate before its LISTEN would end nothing.
    deadline = time.monotonic() + TIMEOUT
    while (await _get(f"http://127.0.0.1:{daemon.port}/readyz")).status != 200:
        assert time.monotonic() < deadline, "readyz never went 200"
        await asyncio.sleep(0.05)
    daemon.daemon.listener._dsn = "postgresql://nobody@127.0.0.1:1/none"  # cannot reconnect
    ended = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
    )
    assert ended == 1
    deadline = time.monotonic() + TIMEOUT
    while True:
        response = await _get(f"http://127.0.0.1:{daemon.port}/readyz")
        if response.status != 200:
            assert response.status == 503
            break
        assert time.monotonic() < deadline, "readyz never went 503"
        await asyncio.sleep(0.05)
    response = await _get(f"http://127.0.0.1:{daemon.port}/healthz")
    assert response.status == 200 and json.loads(response.body)["alive"] is True


async def test_metrics_exposes_sessions_deliveries_latency_and_auth_failures(
    daemon, open_client, db
):
    """GET /metrics is Prometheus text with the daemon's figures."""
    client = await open_client(daemon.url("alice"))
    await insert(db, "alice", "counted")
    await client.messages_until("counted")
    with pytest.raises(InvalidStatus):
        async with connect(f"ws://127.0.0.1:{daemon.port}/ws/message?token=forged"):
            pass
    response = await _get(f"http://127.0.0.1:{daemon.port}/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.body.decode()
    assert "notifyd_sessions 1.0" in text
    assert "notifyd_messages_delivered_total 1.0" in text
    assert 'notifyd_delivery_latency_seconds_bucket{le="+Inf"} 1.0' in text
    assert 'notifyd_auth_failures_total{reason="malformed"} 1.0' in text
    assert "notifyd_listen_connected 1.0" in text


async def test_metrics_can_be_restricted_to_loopback(start_daemon):
    """metrics_loopback_only still answers 127.0.0.1 (the only address tests can use)."""
    daemon = await start_daemon(metrics_loopback_only=True)
    response = await _get(f"http://127.0.0.1:{daemon.port}/metrics")
    assert response.status == 200


@pytest.mark.parametrize(
    "address, loopback",
    [
        (("127.0.0.1", 5000), True),
        (("::1", 5000, 0, 0), True),
        (("10.1.2.3", 5000), False),
        (("2001:db8::1", 5000, 0, 0), False),
        (None, False),
        (("not an address", 1), False),
    ],
)
def test_metrics_restriction_tells_loopback_peers_from_others(address, loopback):
    """The /metrics loopback check refuses every address not on this machine."""
    from notifyd.routes import is_loopback_address

    assert is_loopback_address(address) is loopback


@pytest.mark.parametrize("path", ["/ws/message", "/healthz", "/metrics"])
async def test_non_get_requests_are_refused_with_405_before_any_token_check(daemon, path):
    """POST and friends never reach token verification or the health data."""
    token = daemon.token("alice")
    response = await _get(f"http://127.0.0.1:{daemon.port}{path}?token={token}", method="POST")
    assert response.status == 405
