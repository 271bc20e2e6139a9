"""
A receiving WebSocket session that costs the client process little, and the
latencies it notes for every message frame.

The held sessions do not use the websockets library's client: at tens of
thousands of frames per second its per-frame work (a parser generator, a
message queue, a task wake-up per frame) made the client processes, which
share the machine's two cores with the server and Postgres, the bottleneck
of the measurement. :class:`RawSession` speaks just enough RFC 6455 for a
receiving client: the opening handshake (checked), unmasked server frames
parsed in place, pings answered, the closing handshake.

Writers put ``"<tag>:<time.time_ns() before commit>"`` in ``content``; a frame
is parsed only that far, to keep the client cheap.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from typing import cast
from urllib.parse import urlsplit

__all__ = ["RawSession", "Tally", "open_raw"]

_CONTENT_BYTES = b'"content":'
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
        # create_connection hands a protocol a stream transport.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

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


async def open_raw(
    url: str, tally: Tally, want_hello: bool, timeout: float, source: str | None = None
) -> RawSession:
    """
    Open one :class:`RawSession` to ``url`` (``ws://host:port/path?query``),
    from the local address ``source`` when given (a loopback alias such as
    127.0.0.2: one source address has only so many ephemeral ports).
    """
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    if host is None or port is None:
        raise ValueError(f"{url}: no host or port")
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
            lambda: RawSession(tally, request, key, want_hello),
            host,
            port,
            local_addr=None if source is None else (source, 0),
        )
        try:
            await session.opened
        except BaseException:
            if session.transport is not None:
                session.transport.abort()
            raise
    return session
