"""
TCP proxies in front of PostgreSQL that misbehave in one defined way:

- one forwards everything except notifications: what a LISTEN connection
  sees through a transaction-mode pooler, where its NOTIFYs are delivered to
  some other server connection;
- one cuts the first connection whose replies pass a number of bytes: a
  connection lost in the middle of a long read;
- one forwards everything: closing it is a server that vanishes;
- one holds back the end of a stream the server closed, after its last
  bytes: a terminated connection, seen between its FATAL and its end;
- one holds back every reply on demand: a statement sent to a server that
  has already ended the session;
- one moves to another server on demand: a name or address that now leads
  to a different cluster.

Every proxy, when closed, cuts the connections it carries and stops
listening, as a server that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# Backend message type of NotificationResponse (PostgreSQL protocol 3.0).
_NOTIFICATION = b"A"


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _forward_dropping_notifications(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    # Backend messages are framed (type byte, int32 length including itself)
    # from the first byte on, because clients here never ask for SSL.
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while True:
            header = await reader.readexactly(5)
            (length,) = struct.unpack("!i", header[1:])
            body = await reader.readexactly(length - 4)
            if header[:1] != _NOTIFICATION:
                writer.write(header + body)
                await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def notification_dropping_proxy(dsn: str, *, drop: bool = True) -> AsyncIterator[str]:
    """
    Serve a proxy to ``dsn``'s server on 127.0.0.1; yield a DSN through it
    (with ``sslmode=disable``, so the stream is plain protocol messages).
    With ``drop=False`` it forwards notifications too (the control case).
    """
    async with _proxy(dsn, _forward_dropping_notifications if drop else _forward) as url:
        yield url


@contextlib.asynccontextmanager
async def forwarding_proxy(dsn: str) -> AsyncIterator[str]:
    """
    Serve a proxy to ``dsn``'s server that forwards everything; yield a DSN
    through it. Once closed, its connections are cut and its port refuses
    new ones: what a client sees of a PostgreSQL that went away.
    """
    async with _proxy(dsn, _forward) as url:
        yield url


@contextlib.asynccontextmanager
async def connection_cutting_proxy(
    dsn: str, *, after_bytes: int
) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """
    Serve a proxy to ``dsn``'s server; yield a DSN through it and an event
    set once the first connection whose server replies passed
    ``after_bytes`` was cut there (both directions closed). Later
    connections are forwarded untouched.
    """
    cut = asyncio.Event()

    async def forward_then_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        passed = 0
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                passed += len(data)
                if passed > after_bytes and not cut.is_set():
                    cut.set()
                    break
                writer.write(data)
                await writer.drain()
        # Aborting the client's side also ends the client-to-server pump,
        # which then closes the server's side.
        writer.transport.abort()

    async with _proxy(dsn, forward_then_cut) as url:
        yield url, cut


@contextlib.asynccontextmanager
async def close_holding_proxy(dsn: str) -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    """
    Serve a proxy to ``dsn``'s server that forwards everything but holds
    back the end of a server's stream; yield a DSN through it, an event set
    when a server closed a connection (its last bytes forwarded), and one
    the test sets to let that close through to the client. Between the two
    the client has the server's last words (a FATAL error) but not the end
    of the stream: what a client sees of a terminated connection for a
    moment (a loop iteration locally, longer over a network).
    """
    closed = asyncio.Event()
    let_close = asyncio.Event()

    async def forward_then_hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        closed.set()
        await let_close.wait()
        writer.close()

    async with _proxy(dsn, forward_then_hold) as url:
        yield url, closed, let_close


class HeldReplies:
    """
    The controls of :func:`reply_holding_proxy`.
    """

    def __init__(self) -> None:
        self.holding = False
        self.released = asyncio.Event()
        # Set once, while holding, a server has closed its end / a client
        # has sent bytes.
        self.server_closed = asyncio.Event()
        self.client_spoke = asyncio.Event()

    def hold(self) -> None:
        self.holding = True
        self.released.clear()

    def release(self) -> None:
        self.holding = False
        self.released.set()


@contextlib.asynccontextmanager
async def reply_holding_proxy(dsn: str) -> AsyncIterator[tuple[str, HeldReplies]]:
    """
    Serve a proxy to ``dsn``'s server whose replies (server to client) can
    be held back, end of stream included, and let through later; yield a DSN
    through it and its controls. A client then sends a statement to a
    server that has already ended the session, and learns it only after.
    """
    controls = HeldReplies()

    async def hold_replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: list[bytes] = []
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                held.append(data)
                if not controls.holding:
                    writer.write(b"".join(held))
                    held.clear()
                    await writer.drain()
            if controls.holding:
                controls.server_closed.set()
                await controls.released.wait()
            writer.write(b"".join(held))
            await writer.drain()
        writer.close()

    async def note_requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if controls.holding:
                    controls.client_spoke.set()
                writer.write(data)
                await writer.drain()
        writer.close()

    async with _proxy(dsn, hold_replies, client_pump=note_requests) as url:
        yield url, controls


@contextlib.asynccontextmanager
async def _proxy(
    dsn: str,
    server_pump: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]],
    client_pump: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]
    ] = _forward,
    switch: Switch | None = None,
) -> AsyncIterator[str]:
    """
    A proxy to ``dsn``'s server on 127.0.0.1 (or to ``switch``'s target of
    the moment) whose server-to-client stream goes through ``server_pump``;
    yields the DSN through it.
    """
    target = urlsplit(dsn)
    host, port = target.hostname or "127.0.0.1", target.port or 5432
    pumps: set[asyncio.Task[None]] = set()
    sockets: set[asyncio.StreamWriter] = switch.streams if switch is not None else set()

    async def accept(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        sockets.add(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection(
                *(switch.target if switch is not None else (host, port))
            )
        except OSError:
            client_writer.transport.abort()
            return
        sockets.add(server_writer)
        for pump in (
            client_pump(client_reader, server_writer),
            server_pump(server_reader, client_writer),
        ):
            task = asyncio.create_task(pump)
            pumps.add(task)
            task.add_done_callback(pumps.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    proxy_port = server.sockets[0].getsockname()[1]
    query = "&".join(part for part in (target.query, "sslmode=disable") if part)
    userinfo, _, _ = target.netloc.rpartition("@")
    netloc = f"{userinfo}@127.0.0.1:{proxy_port}" if userinfo else f"127.0.0.1:{proxy_port}"
    try:
        yield urlunsplit(target._replace(netloc=netloc, query=query))
    finally:
        server.close()
        for task in list(pumps):
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        # Cut, not closed: the clients see a reset, as from a server gone.
        for stream in sockets:
            stream.transport.abort()
        await server.wait_closed()


class Switch:
    """
    The control of :func:`switching_proxy`.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.streams: set[asyncio.StreamWriter] = set()

    def to(self, dsn: str) -> None:
        """
        From now on connect to ``dsn``'s server, and cut every connection
        carried so far, as a server that went away.
        """
        parts = urlsplit(dsn)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        for stream in list(self.streams):
            stream.transport.abort()
        self.streams.clear()


@contextlib.asynccontextmanager
async def switching_proxy(dsn: str) -> AsyncIterator[tuple[str, Switch]]:
    """
    Serve a proxy whose server can be changed (a DNS name or a virtual IP
    moved to another machine); yield a DSN through it and its control.
    """
    parts = urlsplit(dsn)
    switch = Switch(parts.hostname or "127.0.0.1", parts.port or 5432)
    async with _proxy(dsn, _forward, switch=switch) as url:
        yield url, switch
