"""
Shared fixtures: a real PostgreSQL, a fresh database per test, in-process
notifyd daemons on port 0, and real WebSocket clients over loopback.

PostgreSQL is ``NOTIFYD_TEST_DSN`` when set (a superuser DSN: tests create
databases), otherwise a throwaway cluster started in a temporary directory.

A test that needs a system tool (Chromium, systemd-analyze) calls
:func:`missing_tool` when it is absent: a skip on a developer's machine, a
failure under CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from websockets.asyncio.client import ClientConnection, connect

from notifyd.auth import TokenVerifier
from notifyd.daemon import Daemon, Instance
from notifyd.db import DATABASE_ERRORS, schema_sql
from notifyd.demo.embedded import EmbeddedPostgres
from notifyd.settings import Settings

# One unit for every wait in the suite; raise it on a slow machine.
TIMEOUT = float(os.environ.get("NOTIFYD_TEST_TIMEOUT", "10"))
SECRET = "test-secret-" + "x" * 32
TEMPLATE = "notifyd_template"

_database_names = itertools.count(1)
_role_names = itertools.count(1)


def with_database(dsn: str, database: str) -> str:
    """
    The same DSN, pointing at another database.
    """
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def http_get(url: str) -> bytes:
    """
    The body of a plain GET, read in a thread so that an instance running
    in this test's own event loop can answer it.
    """

    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return bytes(response.read())

    return await asyncio.to_thread(get)


def missing_tool(reason: str) -> NoReturn:
    """
    Skip the calling test because a system tool it needs is missing, or
    fail it when the ``CI`` environment variable is set: CI installs every
    tool (``.ci/run``), so there a skip would hide a broken install behind a
    green run that tested nothing.
    """
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set: CI installs it, so this is a failure)", pytrace=False)
    pytest.skip(reason)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@pytest.fixture(scope="session")
def cluster() -> Iterator[EmbeddedPostgres | None]:
    """
    The embedded cluster, or None when NOTIFYD_TEST_DSN names an external one.
    """
    if os.environ.get("NOTIFYD_TEST_DSN"):
        yield None
        return
    # A run stopped with SIGTERM (a CI timeout) still tears the cluster down.
    signal.signal(signal.SIGTERM, _interrupt)
    server = EmbeddedPostgres(settings={"fsync": "off", "synchronous_commit": "off"})
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def admin_dsn(cluster: EmbeddedPostgres | None) -> str:
    """
    A superuser DSN of the test cluster.
    """
    return os.environ.get("NOTIFYD_TEST_DSN") or (cluster.dsn if cluster else "")


@pytest.fixture(scope="session")
async def template(admin_dsn: str) -> str:
    """
    A template database with notifyd's schema applied once.
    """
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        await connection.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await connection.close()
    template_connection = await asyncpg.connect(with_database(admin_dsn, TEMPLATE))
    try:
        await template_connection.execute(schema_sql())
    finally:
        await template_connection.close()
    return TEMPLATE


@contextlib.asynccontextmanager
async def _throwaway_database(
    admin_dsn: str, prefix: str, template: str | None
) -> AsyncIterator[str]:
    """
    Create a database (from ``template`` when given) and drop it after.
    """
    name = f"{prefix}_{os.getpid()}_{next(_database_names)}"
    clause = f" TEMPLATE {template}" if template else ""
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(f"CREATE DATABASE {name}{clause}")
    finally:
        await connection.close()
    try:
        yield with_database(admin_dsn, name)
    finally:
        # The cluster may just have been restarted by the test: retry.
        connection = await _connect_with_retry(admin_dsn)
        try:
            await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await connection.close()


@pytest.fixture
async def dsn(admin_dsn: str, template: str) -> AsyncIterator[str]:
    """
    A fresh database with the schema, dropped after the test.
    """
    async with _throwaway_database(admin_dsn, "notifyd_test", template) as url:
        yield url


@pytest.fixture
async def empty_dsn(admin_dsn: str) -> AsyncIterator[str]:
    """
    A fresh database without notifyd's schema.
    """
    async with _throwaway_database(admin_dsn, "notifyd_empty", None) as url:
        yield url


async def _connect_with_retry(dsn: str) -> asyncpg.Connection:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return await asyncpg.connect(dsn)
        except DATABASE_ERRORS:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """
    An application's connection to the test database.
    """
    connection = await asyncpg.connect(dsn)
    yield connection
    await connection.close()


@pytest.fixture
async def login_role(
    db: asyncpg.Connection, dsn: str
) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """
    Create login roles for the test (``CREATE ROLE ... LOGIN <grants>``);
    returns a DSN that logs in as the new role. All are dropped after it.
    """
    created: list[str] = []

    async def create(grants: str) -> str:
        name = f"notifyd_test_{os.getpid()}_{next(_role_names)}"
        await db.execute(f"CREATE ROLE {name} LOGIN {grants}")
        created.append(name)
        parts = urlsplit(dsn)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{name}@{host}"))

    yield create
    for name in created:
        await db.execute(f"DROP OWNED BY {name}")
        await db.execute(f"DROP ROLE {name}")


def make_settings(dsn: str, **overrides: Any) -> Settings:
    """
    Settings for an in-process daemon on an ephemeral port.
    """
    values: dict[str, Any] = {
        "dsn": dsn,
        "host": "127.0.0.1",
        "port": 0,
        "jwt_secret": SECRET,
        "probe_interval_s": 1.0,
        "probe_timeout_s": 2.0,
        "poll_interval_s": 0.5,
        "reconnect_max_s": 0.5,
        "shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class RunningDaemon:
    """
    An in-process daemon and what a test needs to reach it.
    """

    daemon: Instance
    verifier: TokenVerifier

    @property
    def port(self) -> int:
        return self.daemon.port

    def token(self, user: str, **kwargs: Any) -> str:
        return self.verifier.mint(user, **kwargs)

    def url(self, user: str | None = None, *, path: str = "/ws/message", **query: str) -> str:
        params = dict(query)
        if user is not None:
            params.setdefault("token", self.token(user))
        suffix = "&".join(f"{key}={value}" for key, value in params.items())
        return f"ws://127.0.0.1:{self.port}{path}" + (f"?{suffix}" if suffix else "")


@pytest.fixture
async def start_daemon(dsn: str) -> AsyncIterator[Callable[..., Awaitable[RunningDaemon]]]:
    """
    Start in-process daemons on the test database; all are stopped after.
    """
    daemons = contextlib.AsyncExitStack()

    async def start(**overrides: Any) -> RunningDaemon:
        settings = make_settings(overrides.pop("dsn", dsn), **overrides)
        verifier = TokenVerifier.from_settings(settings)
        instance = await daemons.enter_async_context(Daemon(settings, verifier))
        return RunningDaemon(instance, verifier)

    yield start
    try:
        # Each stop is bounded by its shutdown timeout; this bounds them all.
        await asyncio.wait_for(daemons.aclose(), 30)
    except TimeoutError:
        for task in asyncio.all_tasks():
            task.print_stack()
        raise


@pytest.fixture
async def daemon(start_daemon: Callable[..., Awaitable[RunningDaemon]]) -> RunningDaemon:
    """
    One daemon with test settings.
    """
    return await start_daemon()


@dataclass
class Client:
    """
    A real WebSocket client with helpers that wait on frames, not on time.
    """

    ws: ClientConnection
    frames: list[dict[str, Any]] = field(default_factory=list)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.frames.append(frame)
        return frame

    async def recv_event(self, event: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """
        The next frame, which must be of the given event type.
        """
        frame = await self.recv(timeout)
        assert frame["event"] == event, frame
        return frame

    async def messages_until(self, title: str, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """
        Message frames received up to and including the one titled ``title``.
        """
        received: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.recv(max(0.0, deadline - time.monotonic()))
            if frame["event"] == "message":
                received.append(frame)
                if frame["title"] == title:
                    return received

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def close(self) -> None:
        await self.ws.close()

    async def drop(self) -> None:
        """
        Cut the TCP connection without a closing handshake, as a lost
        network or a killed browser would.
        """
        self.ws.transport.abort()
        await self.ws.wait_closed()


@pytest.fixture
async def open_client() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """
    Open clients (hello consumed unless ``hello=False``); all closed after.
    """
    clients: list[Client] = []

    async def open_(url: str, *, hello: bool = True, **kwargs: Any) -> Client:
        ws = await connect(url, open_timeout=TIMEOUT, **kwargs)
        client = Client(ws)
        clients.append(client)
        if hello:
            await client.recv_event("hello")
        return client

    yield open_
    for client in clients:
        await client.drop()


async def insert(
    connection: asyncpg.Connection, to_user: str, title: str, content: str = "c", **columns: Any
) -> str:
    """
    Insert one message as an application would; returns its id.
    """
    names = ["to_user", "title", "content", *columns]
    values = [to_user, title, content, *columns.values()]
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    return await connection.fetchval(  # type: ignore[no-any-return]
        f"INSERT INTO t_message_real_time ({', '.join(names)}) VALUES ({placeholders}) RETURNING id",
        *values,
    )
