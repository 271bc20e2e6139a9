"""
A client process: holds many WebSocket sessions to one server and notes, for
every message frame, when it arrived.

``python -m bench.clients '<config json>'`` with config
``{"kind": "notifyd"|"naive", "url": "ws://127.0.0.1:PORT", "secret": "..."}``.
Requests are JSON lines on stdin, one JSON reply line each on stdout:

* ``{"cmd": "open", "users": [...], "concurrency": 50, "timeout": 60}``: open
  one session per user (notifyd: ``?token=``, then wait for ``hello``;
  naive: ``/ws/message/{user}``);
* ``{"cmd": "count", "tags": [...]}``: messages received per tag so far;
* ``{"cmd": "take", "tag": "..."}``: their latencies (µs) and last receipt
  time, forgotten afterwards;
* ``{"cmd": "hello_times", "user": "...", "n": 20}``: sequential
  connect (+ hello) times in ms;
* ``{"cmd": "close"}``, ``{"cmd": "quit"}`` (EOF on stdin also quits).

Writers put ``"<tag>:<time.time_ns() before commit>"`` in ``content``; a frame
is parsed only that far, to keep the client cheap.

The held sessions do not use the websockets library's client: at tens of
thousands of frames per second its per-frame work (a parser generator, a
message queue, a task wake-up per frame) made the client processes, which
share the machine's two cores with the server and Postgres, the bottleneck
of the measurement. :class:`RawSession` speaks just enough RFC 6455 for a
receiving client: the opening handshake (checked), unmasked server frames
parsed in place, pings answered, the closing handshake. Timed session opens
(``hello_times``) still use websockets, as an application would.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import os
import sys
import time
from typing import Any
from urllib.parse import quote, urlsplit

from websockets.asyncio.client import ClientConnection, connect

from notifyd.auth import TokenVerifier
from notifyd.settings import Settings

from .control import serve_commands

_CONTENT_BYTES = b'"content":'
_OPEN_TIMEOUT = 60.0
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Tally:
    """
    Latencies per tag, as frames arrive.
    """

    def __init__(self) -> None:
        self.latencies: dict[str, list[int]] = {}
        self.last_ns: dict[str, int] = {}

    def record_bytes(self, data: bytes, now_ns: int) -> None:
        """
        Note a text frame's UTF-8 payload that arrived at ``now_ns``.
        """
        start = data.find(_CONTENT_BYTES)
        if start < 0:
            return
        start += len(_CONTENT_BYTES)
        if data.startswith(b" ", start):
            start += 1
        if not data.startswith(b'"', start):
            return
        end = data.find(b'"', start + 1)
        tag, sep, sent = data[start + 1 : end].partition(b":")
        if not sep or not sent.isdigit():
            return
        key = tag.decode()
        bucket = self.latencies.get(key)
        if bucket is None:
            bucket = self.latencies[key] = []
        bucket.append((now_ns - int(sent)) // 1000)
        if now_ns > self.last_ns.get(key, 0):
            self.last_ns[key] = now_ns


def _masked(opcode: int, payload: bytes) -> bytes:
    """
    A client control frame (payload <= 125 bytes), masked as RFC 6455 requires.
    """
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


class RawSession(asyncio.Protocol):
    """
    One receiving WebSocket session, frames parsed in place.

    ``opened`` resolves once the handshake succeeded and, with
    ``want_hello``, the first frame (which must be notifyd's ``hello``)
    arrived; it fails with the reason otherwise.
    """

    def __init__(self, tally: Tally, request: bytes, key: bytes, want_hello: bool) -> None:
        self.tally = tally
        self.request = request
        self.accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.want_hello = want_hello
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost during opening: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(RuntimeError(reason))
        assert self.transport is not None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        now_ns = time.time_ns()
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                self.buffer = buffer
                return
            head = buffer[:head_end].lower()
            if (
                not head.startswith(b"http/1.1 101")
                or b"sec-websocket-accept: " + self.accept.lower() not in head
            ):
                self._fail(f"handshake refused: {buffer[:80]!r}")
                return
            self.upgraded = True
            if not self.want_hello:
                self.opened.set_result(None)
            buffer = buffer[head_end + 4 :]
        pos, size = 0, len(buffer)
        record = self.tally.record_bytes
        while size - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            opcode = first & 0x0F
            payload = buffer[start:end]
            pos = end
            if second & 0x80:
                self._fail("masked frame from the server")
                return
            if opcode == 0x1:
                if not self.opened.done():
                    if b'"event":"hello"' in payload:
                        self.opened.set_result(None)
                    else:
                        self._fail(f"first frame is not hello: {payload[:100]!r}")
                        return
                else:
                    record(payload, now_ns)
            elif opcode == 0x9:
                assert self.transport is not None
                self.transport.write(_masked(0xA, payload))
            elif opcode == 0x8:
                assert self.transport is not None
                if not self.transport.is_closing():
                    self.transport.write(_masked(0x8, payload[:2]))
                    self.transport.close()
                return
        self.buffer = buffer[pos:]

    async def close(self) -> None:
        """
        The closing handshake: send close 1000, wait (bounded) for the server
        to close the connection.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(_masked(0x8, (1000).to_bytes(2, "big")))
        try:
            async with asyncio.timeout(5):
                await asyncio.shield(self.closed)
        except TimeoutError:
            transport.abort()


async def open_raw(url: str, tally: Tally, want_hello: bool, timeout: float) -> RawSession:
    """
    Open one :class:`RawSession` to ``url`` (``ws://host:port/path?query``).
    """
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, session = await loop.create_connection(
            lambda: RawSession(tally, request, key, want_hello), parts.hostname, parts.port
        )
        try:
            await session.opened
        except BaseException:
            if session.transport is not None:
                session.transport.abort()
            raise
    return session


class GcWatch:
    """
    Collector pauses of this process (the instrument must not stall).
    """

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif info.get("generation") == 2 or time.perf_counter() - self._started > 0.005:
            self.pauses_ms.append((time.perf_counter() - self._started) * 1000)

    def take(self) -> dict[str, float]:
        pauses, self.pauses_ms = self.pauses_ms, []
        return {"count": len(pauses), "max_ms": max(pauses, default=0.0), "total_ms": sum(pauses)}


class Clients:
    """
    The sessions of this process.
    """

    def __init__(self, kind: str, url: str, secret: str) -> None:
        self.kind = kind
        self.url = url
        self.verifier = (
            TokenVerifier.from_settings(Settings(jwt_secret=secret)) if kind == "notifyd" else None
        )
        self.tally = Tally()
        self.gc = GcWatch()
        self.sessions: list[RawSession] = []

    def url_for(self, user: str) -> str:
        if self.verifier is not None:
            return f"{self.url}/ws/message?token={self.verifier.mint(user, ttl_s=86400)}"
        return f"{self.url}/ws/message/{quote(user, safe='')}"

    async def _connect(self, user: str, timeout: float) -> ClientConnection:
        """
        One session, ready for live messages (notifyd: after its hello).
        """
        ws = await connect(
            self.url_for(user),
            compression=None,
            open_timeout=timeout,
            ping_interval=None,  # the server pings
            close_timeout=5,
            max_size=1 << 20,
        )
        if self.kind == "notifyd":
            try:
                async with asyncio.timeout(timeout):
                    first = await ws.recv()
            except BaseException:
                await ws.close()
                raise
            if not isinstance(first, str) or '"event":"hello"' not in first:
                await ws.close()
                raise RuntimeError(f"first frame is not hello: {first[:100]!r}")
        return ws

    async def open(self, users: list[str], concurrency: int, timeout: float) -> dict[str, Any]:
        semaphore = asyncio.Semaphore(concurrency)
        errors: list[str] = []
        started = time.perf_counter()

        async def one(user: str) -> None:
            async with semaphore:
                try:
                    session = await open_raw(
                        self.url_for(user), self.tally, self.kind == "notifyd", timeout
                    )
                except Exception as exc:
                    errors.append(f"{user}: {exc!r}")
                    return
            self.sessions.append(session)

        await asyncio.gather(*(one(user) for user in users))
        # The sessions live until the end: keep the collector from walking
        # them again and again (the instrument must not stall).
        gc.collect()
        gc.freeze()
        return {
            "opened": len(users) - len(errors),
            "failed": len(errors),
            "errors": errors[:3],
            "seconds": time.perf_counter() - started,
        }

    async def hello_times(self, user: str, n: int, timeout: float) -> dict[str, Any]:
        times: list[float] = []
        for _ in range(n):
            started = time.perf_counter()
            ws = await self._connect(user, timeout)
            times.append((time.perf_counter() - started) * 1000)
            await ws.close()
        return {"ms": times}

    async def close(self) -> dict[str, Any]:
        sessions, self.sessions = self.sessions, []
        semaphore = asyncio.Semaphore(200)

        async def one(session: RawSession) -> None:
            async with semaphore:
                await session.close()

        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)
        except TimeoutError:
            for session in sessions:
                if session.transport is not None:
                    session.transport.abort()
        return {"closed": len(sessions)}

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["cmd"]
        if command == "open":
            return await self.open(
                request["users"],
                request.get("concurrency", 50),
                request.get("timeout", _OPEN_TIMEOUT),
            )
        if command == "count":
            return {
                "counts": {tag: len(self.tally.latencies.get(tag, ())) for tag in request["tags"]}
            }
        if command == "take":
            tag = request["tag"]
            return {
                "latencies_us": self.tally.latencies.pop(tag, []),
                "last_ns": self.tally.last_ns.pop(tag, 0),
                "gc": self.gc.take(),
            }
        if command == "hello_times":
            return await self.hello_times(
                request["user"], request["n"], request.get("timeout", _OPEN_TIMEOUT)
            )
        if command == "close":
            return await self.close()
        if command == "quit":
            return {"bye": True}
        raise ValueError(f"unknown command {command!r}")


async def _main(config: dict[str, Any]) -> None:
    clients = Clients(config["kind"], config["url"], config.get("secret", ""))
    try:
        await serve_commands(clients.handle)
    finally:
        await clients.close()


if __name__ == "__main__":
    from .control import raise_nofile

    raise_nofile()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(json.loads(sys.argv[1])))
    else:
        # The instrument should cost as little as it can.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_main(json.loads(sys.argv[1])))
