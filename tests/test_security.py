"""
Each defence of docs/security.md against a running daemon: the origin
allow-list, the subprotocol token, token expiry and refresh, the revocation
query, and every limit with its metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from notifyd.exceptions import ConfigError
from notifyd.settings import Settings

from .conftest import SECRET, TIMEOUT, insert
from .processes import free_port, running_notifyd, serve_env, wait_until_healthy

APP = "https://app.example.com"


async def _status_of(url: str, **kwargs) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, open_timeout=TIMEOUT, **kwargs):
            pass
    return info.value.response.status_code


async def _close_code(client) -> int:
    """The code the server closed the client's connection with."""
    await asyncio.wait_for(client.ws.wait_closed(), TIMEOUT)
    return client.ws.close_code


async def _get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    return data.decode()


async def _until(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- origin ---------------------------------------------------------------------


async def test_handshake_from_a_foreign_origin_is_refused_403_even_with_a_valid_cookie(
    start_daemon,
):
    """Cross-site WebSocket hijacking: the victim's cookie does not help evil.example."""
    daemon = await start_daemon(allowed_origins=[APP])
    cookie = {"Cookie": f"notifyd_token={daemon.token('alice')}"}
    url = f"ws://127.0.0.1:{daemon.port}/ws/message"
    assert await _status_of(url, origin="https://evil.example", additional_headers=cookie) == 403
    assert daemon.daemon.stats.auth_failures["origin not allowed"] == 1


async def test_handshake_from_a_foreign_origin_is_refused_before_first_frame_auth(start_daemon):
    """Without any credential the foreign origin is still refused before the upgrade."""
    daemon = await start_daemon(allowed_origins=[APP])
    assert (
        await _status_of(f"ws://127.0.0.1:{daemon.port}/ws/message", origin="https://evil.example")
        == 403
    )


async def test_handshake_from_an_allowed_origin_opens_a_session(start_daemon, open_client):
    """The listed origin (in any case, with its default port) gets its session."""
    daemon = await start_daemon(allowed_origins=[APP])
    client = await open_client(daemon.url("alice"), origin="https://APP.example.com:443")
    assert client.frames[0]["user"] == "alice"


async def test_handshake_without_origin_is_allowed_unless_required(start_daemon, open_client):
    """Non-browser clients send no Origin: allowed by default, 403 with require_origin."""
    lenient = await start_daemon(allowed_origins=[APP])
    assert (await open_client(lenient.url("alice"))).frames[0]["user"] == "alice"
    strict = await start_daemon(allowed_origins=[APP], require_origin=True)
    assert await _status_of(strict.url("alice")) == 403
    assert (await open_client(strict.url("alice"), origin=APP)).frames[0]["user"] == "alice"


async def test_serve_warns_at_start_on_a_public_bind_without_an_allow_list(dsn):
    """`serve` on 0.0.0.0 with no NOTIFYD_ALLOWED_ORIGINS logs one warning naming the setting."""
    port = free_port()
    env = serve_env(dsn, port, NOTIFYD_HOST="0.0.0.0", NOTIFYD_JWT_SECRET=SECRET)
    async with running_notifyd("serve", env=env, stop_signal=signal.SIGINT) as server:
        await wait_until_healthy(port, server)
        await server.wait_for_output("NOTIFYD_ALLOWED_ORIGINS is empty", timeout=TIMEOUT)


async def test_serve_does_not_warn_with_an_allow_list(dsn):
    """The same public bind with an allow-list starts without that warning."""
    port = free_port()
    env = serve_env(
        dsn, port, NOTIFYD_HOST="0.0.0.0", NOTIFYD_JWT_SECRET=SECRET, NOTIFYD_ALLOWED_ORIGINS=APP
    )
    async with running_notifyd("serve", env=env, stop_signal=signal.SIGINT) as server:
        await wait_until_healthy(port, server)
        await server.wait_for_output("listening on", timeout=TIMEOUT)
        assert "NOTIFYD_ALLOWED_ORIGINS" not in server.output()


# -- token in Sec-WebSocket-Protocol ---------------------------------------------


async def test_token_in_subprotocol_opens_a_session_and_the_server_selects_notifyd_v1(
    daemon, open_client
):
    """notifyd.v1 + bearer.<token>: the answer names notifyd.v1 and never echoes the token."""
    token = daemon.token("alice")
    client = await open_client(
        f"ws://127.0.0.1:{daemon.port}/ws/message", subprotocols=["notifyd.v1", f"bearer.{token}"]
    )
    assert client.frames[0]["user"] == "alice"
    assert client.ws.subprotocol == "notifyd.v1"
    response = client.ws.response
    assert response.headers["Sec-WebSocket-Protocol"] == "notifyd.v1"
    assert all(token not in value for _, value in response.headers.raw_items())


async def test_bearer_subprotocol_without_notifyd_v1_is_refused_400(daemon):
    """A bearer entry alone would make the browser fail the handshake: 400 says why first."""
    token = daemon.token("alice")
    assert (
        await _status_of(
            f"ws://127.0.0.1:{daemon.port}/ws/message", subprotocols=[f"bearer.{token}"]
        )
        == 400
    )


async def test_forged_token_in_subprotocol_is_refused_401(daemon):
    """The subprotocol token is verified like any other."""
    forged = daemon.token("alice")[:-4] + "AAAA"
    url = f"ws://127.0.0.1:{daemon.port}/ws/message"
    assert await _status_of(url, subprotocols=["notifyd.v1", f"bearer.{forged}"]) == 401


async def test_client_offering_only_notifyd_v1_uses_first_frame_auth(daemon, open_client):
    """notifyd.v1 without a bearer entry: upgraded, then the auth frame decides."""
    client = await open_client(
        f"ws://127.0.0.1:{daemon.port}/ws/message", subprotocols=["notifyd.v1"], hello=False
    )
    assert client.ws.subprotocol == "notifyd.v1"
    await client.send({"action": "auth", "token": daemon.token("alice")})
    assert (await client.recv_event("hello"))["user"] == "alice"


# -- token lifetime ------------------------------------------------------------------


def test_jwt_leeway_setting_reaches_the_verifier():
    """NOTIFYD_JWT_LEEWAY_S decides how long past exp a token still passes."""
    from notifyd.auth import TokenVerifier
    from notifyd.exceptions import AuthError

    strict = TokenVerifier.from_settings(Settings(jwt_secret=SECRET, jwt_leeway_s=0))
    lenient = TokenVerifier.from_settings(Settings(jwt_secret=SECRET, jwt_leeway_s=30))
    token = strict.mint("alice", ttl_s=1, now=time.time() - 10)
    with pytest.raises(AuthError, match="expired"):
        strict.verify(token)
    assert lenient.verify(token).user == "alice"


async def test_session_is_closed_with_4401_when_its_token_expires(start_daemon, open_client):
    """A 1 s token: the session ends with 4401 soon after exp, and the metric counts it."""
    daemon = await start_daemon(jwt_leeway_s=0)
    client = await open_client(daemon.url("alice", token=daemon.token("alice", ttl_s=1)))
    assert await _close_code(client) == 4401
    assert daemon.daemon.stats.expired_sessions == 1
    assert "notifyd_sessions_expired_total 1.0" in await _get(daemon.port, "/metrics")


async def test_session_authenticated_by_first_frame_also_expires(start_daemon, open_client):
    """Expiry applies whichever way the token came."""
    daemon = await start_daemon(jwt_leeway_s=0)
    client = await open_client(f"ws://127.0.0.1:{daemon.port}/ws/message", hello=False)
    await client.send({"action": "auth", "token": daemon.token("alice", ttl_s=1)})
    await client.recv_event("hello")
    assert await _close_code(client) == 4401


async def test_refresh_in_time_keeps_the_session_open_past_the_old_expiry(
    start_daemon, open_client, db
):
    """A twin session with the same short token closes with 4401; the refreshed one still works."""
    daemon = await start_daemon(jwt_leeway_s=0)
    short = daemon.token("alice", ttl_s=2)
    twin = await open_client(daemon.url("alice", token=short))
    client = await open_client(daemon.url("alice", token=short))
    await client.send({"action": "refresh", "token": daemon.token("alice", ttl_s=600), "id": "r1"})
    refreshed = await client.recv_event("refreshed")
    assert refreshed["id"] == "r1" and refreshed["expires"] > time.time() + 500
    assert await _close_code(twin) == 4401
    await insert(db, "alice", "still-here")
    assert [m["title"] for m in await client.messages_until("still-here")] == ["still-here"]


async def test_refresh_with_another_users_token_closes_4401_at_once(daemon, open_client, db):
    """Swapping identities mid-session is refused and ends the session."""
    client = await open_client(daemon.url("alice"))
    await client.send({"action": "refresh", "token": daemon.token("bob")})
    assert await _close_code(client) == 4401
    assert daemon.daemon.stats.auth_failures["refresh names another user"] == 1


@pytest.mark.parametrize("kind", ["expired", "forged", "garbage"])
async def test_refresh_with_an_invalid_token_closes_4401(daemon, open_client, kind):
    """A refresh that cannot be verified ends the session."""
    token = {
        "expired": daemon.token("alice", ttl_s=1, now=time.time() - 3600),
        "forged": daemon.token("alice")[:-4] + "AAAA",
        "garbage": "not-a-token",
    }[kind]
    client = await open_client(daemon.url("alice"))
    await client.send({"action": "refresh", "token": token})
    assert await _close_code(client) == 4401


# -- revocation ----------------------------------------------------------------------


async def _revocation_table(db) -> None:
    await db.execute(
        "CREATE TABLE app_sessions (sid text PRIMARY KEY, user_id text NOT NULL, revoked boolean NOT NULL)"
    )
    await db.execute(
        "INSERT INTO app_sessions VALUES ('s-ok', 'alice', false), ('s-revoked', 'alice', true), "
        "('s-bob', 'bob', false)"
    )


# What docs/security.md shows: the session must exist, belong to the user and be live.
_BY_SID = "SELECT NOT revoked FROM app_sessions WHERE sid = $2::jsonb->>'sid' AND user_id = $1"


async def test_revoked_session_is_closed_with_4401_at_connect(start_daemon, open_client, db):
    """The app's session table says no: 4401 right after the upgrade, before hello."""
    await _revocation_table(db)
    daemon = await start_daemon(revocation_sql=_BY_SID)
    revoked = await open_client(
        daemon.url("a", token=daemon.token("alice", extra={"sid": "s-revoked"})), hello=False
    )
    assert await _close_code(revoked) == 4401
    assert revoked.frames == []
    unknown = await open_client(
        daemon.url("a", token=daemon.token("alice", extra={"sid": "nope"})), hello=False
    )
    assert await _close_code(unknown) == 4401
    borrowed = await open_client(
        daemon.url("a", token=daemon.token("alice", extra={"sid": "s-bob"})), hello=False
    )
    assert await _close_code(borrowed) == 4401
    ok = await open_client(daemon.url("a", token=daemon.token("alice", extra={"sid": "s-ok"})))
    assert ok.frames[0]["user"] == "alice"
    assert daemon.daemon.stats.auth_failures["revoked"] == 3


async def test_revocation_query_with_only_the_user_parameter(start_daemon, open_client):
    """A query that takes $1 alone gets the user id alone; first-frame auth is checked too."""
    daemon = await start_daemon(revocation_sql="SELECT $1 <> 'mallory'")
    assert (await open_client(daemon.url("alice"))).frames[0]["user"] == "alice"
    client = await open_client(f"ws://127.0.0.1:{daemon.port}/ws/message", hello=False)
    await client.send({"action": "auth", "token": daemon.token("mallory")})
    assert await _close_code(client) == 4401


async def test_refresh_with_a_revoked_token_closes_4401(start_daemon, open_client, db):
    """A refresh is checked against the revocation query as well."""
    await _revocation_table(db)
    daemon = await start_daemon(revocation_sql=_BY_SID)
    client = await open_client(daemon.url("a", token=daemon.token("alice", extra={"sid": "s-ok"})))
    await client.send(
        {"action": "refresh", "token": daemon.token("alice", extra={"sid": "s-revoked"})}
    )
    assert await _close_code(client) == 4401


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("SELEC 1", "NOTIFYD_REVOCATION_SQL is not usable"),
        ("SELECT $1 = $2 AND $3", "takes 3 parameters"),
    ],
)
async def test_unusable_revocation_query_stops_start_naming_the_setting(
    start_daemon, query, fragment
):
    """A typo is a start-up ConfigError, not a refusal of every session later."""
    with pytest.raises(ConfigError, match=fragment):
        await start_daemon(revocation_sql=query)


async def test_revocation_check_that_cannot_run_refuses_with_1011(start_daemon, open_client, db):
    """When the query fails at run time the session is not waved through."""
    await db.execute("CREATE TABLE app_sessions (sid text PRIMARY KEY, revoked boolean NOT NULL)")
    daemon = await start_daemon(
        revocation_sql="SELECT NOT revoked FROM app_sessions WHERE sid = $1"
    )
    # Bounded: checking the query at start must leave no lock on the app's table.
    await asyncio.wait_for(db.execute("DROP TABLE app_sessions"), TIMEOUT)
    client = await open_client(daemon.url("alice"), hello=False)
    assert await _close_code(client) == 1011


# -- limits ------------------------------------------------------------------------------


async def test_connections_per_address_over_the_limit_get_429_until_one_closes(
    start_daemon, open_client
):
    """Two per address: the third handshake is refused; after one closes, it gets in."""
    daemon = await start_daemon(max_connections_per_address=2)
    first = await open_client(daemon.url("alice"))
    await open_client(daemon.url("bob"))
    assert await _status_of(daemon.url("carol")) == 429
    assert daemon.daemon.stats.limit_trips["connections_per_address"] == 1
    await first.close()
    await _until(
        lambda: daemon.daemon.server.admission.per_address.count("127.0.0.1") == 1,
        "the slot to free",
    )
    assert (await open_client(daemon.url("carol"))).frames[0]["user"] == "carol"


async def test_failed_or_dropped_connections_give_their_slot_back(start_daemon, open_client):
    """A 4401 after the upgrade and an aborted TCP connection each release their count."""
    daemon = await start_daemon(max_connections_per_address=1)
    for _ in range(3):
        failing = await open_client(f"ws://127.0.0.1:{daemon.port}/ws/message", hello=False)
        await failing.send({"action": "auth", "token": "forged"})
        assert await _close_code(failing) == 4401
        await _until(
            lambda: daemon.daemon.server.admission.per_address.count("127.0.0.1") == 0,
            "the slot to free",
        )
        dropped = await open_client(daemon.url("alice"))
        await dropped.drop()
        await _until(
            lambda: daemon.daemon.server.admission.per_address.count("127.0.0.1") == 0,
            "the slot to free",
        )
    assert (await open_client(daemon.url("alice"))).frames[0]["user"] == "alice"


async def test_handshakes_per_second_over_the_limit_get_429(start_daemon, open_client):
    """At 0.25/s the bucket holds one handshake: the next one at once is refused."""
    daemon = await start_daemon(handshakes_per_s_per_address=0.25)
    await open_client(daemon.url("alice"))
    assert await _status_of(daemon.url("alice")) == 429
    assert daemon.daemon.stats.limit_trips["handshake_rate"] == 1
    health = await _get(daemon.port, "/healthz")
    assert health.startswith("HTTP/1.1 200"), "health checks are not handshakes"


async def test_frame_flood_closes_the_session_with_1008_and_others_keep_receiving(
    start_daemon, open_client, db
):
    """200 pings at 5/s allowed: the flooder is closed with 1008; bob still gets his message."""
    daemon = await start_daemon(client_frames_per_s=5)
    bob = await open_client(daemon.url("bob"))
    flooder = await open_client(daemon.url("alice"))

    async def drain() -> None:
        # A client that reads what it is sent, so it sees the close frame.
        with contextlib.suppress(ConnectionClosed):
            async for _ in flooder.ws:
                pass

    reader = asyncio.create_task(drain())
    for _ in range(200):
        try:
            await flooder.ws.send('{"action":"ping"}')
        except ConnectionClosed:
            break
    await asyncio.wait_for(reader, TIMEOUT)
    assert await _close_code(flooder) == 1008
    assert daemon.daemon.stats.limit_trips["frame_rate"] == 1
    await insert(db, "bob", "unaffected")
    assert [m["title"] for m in await bob.messages_until("unaffected")] == ["unaffected"]
    metrics = await _get(daemon.port, "/metrics")
    assert 'notifyd_limit_trips_total{limit="frame_rate"} 1.0' in metrics


async def test_frame_over_max_frame_bytes_closes_1009_and_counts(start_daemon, open_client):
    """Too big, before and after auth: 1009, counted as frame_size."""
    daemon = await start_daemon(max_frame_bytes=1024)
    client = await open_client(daemon.url("alice"))
    await client.ws.send(json.dumps({"action": "ping", "pad": "x" * 2000}))
    assert await _close_code(client) == 1009
    unauthenticated = await open_client(f"ws://127.0.0.1:{daemon.port}/ws/message", hello=False)
    await unauthenticated.ws.send("x" * 2000)
    assert await _close_code(unauthenticated) == 1009
    assert daemon.daemon.stats.limit_trips["frame_size"] == 2


async def test_too_many_ids_in_one_read_is_an_error_and_counts(start_daemon, open_client):
    """max_read_ids=3: four ids get `invalid` with the request id; the session stays."""
    daemon = await start_daemon(max_read_ids=3)
    client = await open_client(daemon.url("alice"))
    await client.send({"action": "read", "ids": ["1", "2", "3", "4"], "id": 9})
    error = await client.recv_event("error")
    assert (error["code"], error["id"]) == ("invalid", 9)
    assert daemon.daemon.stats.limit_trips["read_ids"] == 1
    await client.send({"action": "ping"})
    await client.recv_event("pong")


async def test_history_beyond_the_concurrency_limit_is_answered_busy(
    start_daemon, open_client, admin_dsn, dsn, monkeypatch
):
    """
    One slot, held by a query blocked on a table lock: the other request
    gets `busy`, and the one holding the slot is answered once the lock goes.
    """
    import asyncpg

    import notifyd.db

    # The slot must stay held while the other request waits for it, however
    # slow this machine: the client actions' lock and time bounds (1 s, 3 s,
    # 5 s) are what tests/test_locked_database.py proves, not this test.
    monkeypatch.setattr(notifyd.db, "CLIENT_LOCK_TIMEOUT_MS", 60_000)
    monkeypatch.setattr(notifyd.db, "CLIENT_STATEMENT_TIMEOUT_MS", 60_000)
    monkeypatch.setattr(notifyd.db, "CLIENT_BUDGET_S", 60.0)
    daemon = await start_daemon(max_concurrent_history=1)
    clients = {
        "h1": await open_client(daemon.url("alice")),
        "h2": await open_client(daemon.url("bob")),
    }
    locker = await asyncpg.connect(dsn)
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("LOCK TABLE t_message_real_time IN ACCESS EXCLUSIVE MODE")
        # Whichever request the server takes first holds the slot (its query
        # then waits for the lock); the other finds none and is answered
        # first, while the lock is still held.
        for request_id, client in clients.items():
            await client.send({"action": "history", "id": request_id})
        answers = {
            asyncio.create_task(_first_of(client, ("error", "history"))): request_id
            for request_id, client in clients.items()
        }
        done, waiting = await asyncio.wait(answers, return_when=asyncio.FIRST_COMPLETED)
        (first,) = done
        busy = first.result()
        assert (busy["event"], busy["code"], busy["id"]) == ("error", "busy", answers[first])
        await transaction.rollback()
    finally:
        await locker.close()
    (holder,) = waiting
    answered = await holder
    assert (answered["event"], answered["id"]) == ("history", answers[holder])
    assert daemon.daemon.stats.limit_trips["history_concurrency"] == 1


async def _first_of(client, events: tuple[str, ...]) -> dict:
    """
    The client's first frame among ``events``.
    """
    while True:
        frame = await client.recv()
        if frame["event"] in events:
            return frame


async def test_sessions_per_user_over_the_limit_replace_the_oldest_and_count(
    start_daemon, open_client
):
    """The existing per-user limit (4409) shows in notifyd_limit_trips too."""
    daemon = await start_daemon(max_sessions_per_user=1)
    old = await open_client(daemon.url("alice"))
    await open_client(daemon.url("alice"))
    assert await _close_code(old) == 4409
    assert 'notifyd_limit_trips_total{limit="sessions_per_user"} 1.0' in await _get(
        daemon.port, "/metrics"
    )


def test_per_address_limits_are_off_by_default():
    """Behind a load balancer everyone shares one address: no per-address limit unless set."""
    settings = Settings()
    assert settings.max_connections_per_address == 0
    assert settings.handshakes_per_s_per_address == 0


async def test_defaults_admit_a_hundred_concurrent_handshakes_from_one_address(daemon):
    """The benchmark's pattern (100 handshakes at once from 127.0.0.1) connects with defaults."""
    clients = await asyncio.gather(
        *(connect(daemon.url(f"user{i}"), open_timeout=3 * TIMEOUT) for i in range(100))
    )
    try:
        hellos = await asyncio.gather(*(asyncio.wait_for(ws.recv(), TIMEOUT) for ws in clients))
        assert all(json.loads(hello)["event"] == "hello" for hello in hellos)
        assert sum(daemon.daemon.stats.limit_trips.values()) == 0
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))
