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
is parsed only that far, to keep the client cheap. The soak's clients
(``bench/soak/clients.py``) hand every text frame to their own callback
instead, and read how the server refused or closed the session.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

__all__ = ["RawSession", "Refused", "Tally", "open_raw"]

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
    arrived; it fails with the reason otherwise. Every text frame (the
    ``hello`` too) goes to ``on_text`` with its arrival time. A refused
    handshake leaves its status and ``Retry-After`` in ``refused_status`` and
    ``retry_after``; a close frame from the server, its code and reason in
    ``close_code`` and ``close_reason``.
    """

    def __init__(
        self,
        on_text: Callable[[bytes, int], None],
        request: bytes,
        key: bytes,
        want_hello: bool,
    ) -> None:
        self.on_text = on_text
        self.request = request
        self.accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.want_hello = want_hello
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.refused_status: int | None = None
        self.retry_after: str | None = None
        self.close_code: int | None = None
        self.close_reason = ""

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
                self._refused(head)
                self._fail(f"handshake refused: {buffer[:80]!r}")
                return
            self.upgraded = True
            if not self.want_hello:
                self.opened.set_result(None)
            buffer = buffer[head_end + 4 :]
        pos, size = 0, len(buffer)
        record = self.on_text
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
                record(payload, now_ns)
            elif opcode == 0x9:
                assert self.transport is not None
                self.transport.write(_masked(0xA, payload))
            elif opcode == 0x8:
                assert self.transport is not None
                if len(payload) >= 2:
                    self.close_code = int.from_bytes(payload[:2], "big")
                    self.close_reason = payload[2:].decode(errors="replace")
                if not self.transport.is_closing():
                    self.transport.write(_masked(0x8, payload[:2]))
                    self.transport.close()
                return
        self.buffer = buffer[pos:]

    def _refused(self, head: bytes) -> None:
        """
        Note a refused handshake's status and Retry-After (``head`` lowered).
        """
        lines = head.split(b"\r\n")
        parts = lines[0].split()
        if len(parts) >= 2 and parts[1].isdigit():
            self.refused_status = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip() == b"retry-after":
                self.retry_after = value.strip().decode()

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


class Refused(ConnectionError):
    """
    The server answered the opening with something other than a session: an
    HTTP status (``status``, with its ``retry_after``), or a close frame
    before the ``hello`` (``close_code``, ``close_reason``).
    """

    def __init__(self, session: RawSession, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.status = session.refused_status
        self.retry_after = session.retry_after
        self.close_code = session.close_code
        self.close_reason = session.close_reason


async def open_raw(
    url: str,
    on_text: Callable[[bytes, int], None],
    want_hello: bool,
    timeout: float,
    source: str | None = None,
) -> RawSession:
    """
    Open one :class:`RawSession` to ``url`` (``ws://host:port/path?query``)
    whose text frames go to ``on_text`` (a :meth:`Tally.record_bytes`, say),
    from the local address ``source`` when given (a loopback alias such as
    127.0.0.2: one source address has only so many ephemeral ports);
    :class:`Refused` when the server answered with a status or a close.
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
            lambda: RawSession(on_text, request, key, want_hello),
            host,
            port,
            local_addr=None if source is None else (source, 0),
        )
        try:
            await session.opened
        except BaseException as exc:
            if session.transport is not None:
                session.transport.abort()
            if isinstance(exc, Exception) and (
                session.refused_status is not None or session.close_code is not None
            ):
                raise Refused(session, exc) from exc
            raise
    return session
