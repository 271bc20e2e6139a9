"""
One authenticated WebSocket session: its outbox and the task that drains it.

Delivery puts frames with :meth:`Session.push`, which never awaits; only the
session's own writer task waits for the client. A client that does not take
a frame within ``send_timeout`` is closed with 4429 and resumes later.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from .outbox import Outbox
from .protocol import CloseCode, close_reason, text_frame
from .stats import Stats

__all__ = ["Session"]

logger = logging.getLogger(__name__)

_ids = itertools.count(1)

# Frames are written straight to the socket while less than this is
# waiting in the transport's buffer; past it they queue in the outbox.
_DIRECT_WRITE_LIMIT = 64 * 1024


class Session:
    """
    A user's connection as delivery sees it.
    """

    __slots__ = (
        "_pending", "_pending_bytes", "_stats", "_writer", "ahead", "close_code", "close_reason",
        "connection", "expiry_second", "id", "inline_counts", "outbox", "send_timeout", "user",
    )  # fmt: skip

    def __init__(
        self,
        connection: ServerConnection,
        user: str,
        outbox: Outbox,
        *,
        send_timeout: float,
        stats: Stats | None = None,
        inline_counts: bool = False,
    ) -> None:
        """
        ``inline_counts``: the client opted in to a new message's unread
        counts on its ``message`` frame (see :mod:`notifyd.router`).
        """
        self.id = next(_ids)
        self.connection = connection
        self.user = user
        self.outbox = outbox
        self.send_timeout = send_timeout
        self.inline_counts = inline_counts
        self.close_code: CloseCode | None = None
        self.close_reason: str | None = None
        self._stats = stats if stats is not None else Stats()
        # Started only while frames are queued or a close is pending: an
        # idle session costs no task.
        self._writer: asyncio.Task[None] | None = None
        # Direct frames not yet written (see push and flush).
        self._pending: list[bytes] | None = None
        self._pending_bytes = 0
        # Kept by the server's ExpiryClock: the second its token expires.
        self.expiry_second: int | None = None
        # Kept by the router: the rows this client has ahead of the windows
        # routed so far, as {xact: seq} (notifyd.ahead); None for none.
        self.ahead: dict[int, int] | None = None

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user!r}>"

    @property
    def closing(self) -> bool:
        """
        Whether the session was asked to close or its connection is gone.
        """
        return self.close_code is not None

    def push(
        self,
        frame: str,
        cursor: str | None = None,
        *,
        flush: bool = True,
        wire: bytes | None = None,
    ) -> bool:
        """
        Send a frame to the client, or queue it. Never awaits, never raises.

        While nothing is queued and the connection's write buffer is below
        ``_DIRECT_WRITE_LIMIT``, the frame is handed to the connection at
        once, like ``websockets.broadcast``: no task switch per message.
        Otherwise it waits in the bounded outbox for the writer task, which
        is what makes a slow client visible (resync, then 4429).

        With ``flush=False`` a direct frame waits in the session until
        :meth:`flush`, which writes everything a batch left in one system
        call. Returns whether the frame went the direct way (and so may need
        a flush). ``wire`` is ``frame`` already framed by
        :func:`protocol.text_frame`, so a frame fanned out to many sessions is
        encoded once; it is used only on connections without extensions.
        """
        payload = frame.encode()
        if self.push_direct(payload, wire if wire is not None else text_frame(payload)):
            if flush:
                self.flush()
            return True
        return self._queue(frame, cursor)

    def push_encoded(self, payload: bytes, wire: bytes, cursor: str | None = None) -> bool:
        """
        :meth:`push` with ``flush=False`` of a frame encoded once for every
        session it goes to: ``payload`` (its UTF-8 JSON) and ``wire`` (framed
        by :func:`protocol.text_frame`). Only a frame that has to wait in
        the outbox is decoded again.
        """
        if self.push_direct(payload, wire):
            return True
        return self._queue(payload.decode(), cursor)

    def _queue(self, frame: str, cursor: str | None) -> bool:
        if self.close_code is not None:
            return False
        if not self.outbox.put(frame, cursor):
            self._stats.resyncs += 1
        self._start_writer()
        return False

    def push_direct(self, payload: bytes, wire: bytes) -> bool:
        """
        Send a frame the direct way of :meth:`push` (pending until
        :meth:`flush`), or do nothing: never queues it. ``payload`` is the
        frame's UTF-8 JSON, ``wire`` the same framed. Returns whether it
        was sent.

        For a frame that must not wait in the outbox, where an overflow
        would drop it for a ``resync``: a message frame carrying unread
        counts is sent this way, or not at all (the counts then travel in
        an ``unread`` event, which an overflow keeps).
        """
        if self.close_code is not None or self.outbox:
            return False
        connection = self.connection
        transport = connection.transport
        protocol = connection.protocol
        pending = self._pending
        if (
            transport is None
            # Frames already pending this round passed the state check, and
            # nothing was awaited since: fan-out skips it from the second
            # frame on.
            or (pending is None and protocol.state is not State.OPEN)
            or transport.get_write_buffer_size() + self._pending_bytes >= _DIRECT_WRITE_LIMIT
        ):
            return False
        if protocol.extensions:
            # Compression: websockets frames it, per connection.
            try:
                protocol.send_text(payload)
            except Exception:  # a broken connection: its handler cleans up
                logger.debug("session %s: direct write failed", self.id, exc_info=True)
                self.close(CloseCode.NORMAL)
                return False
            chunks = protocol.data_to_send()
            if pending is None:
                self._pending = chunks
            else:
                pending += chunks
            self._pending_bytes += sum(map(len, chunks))
        else:
            if pending is None:
                self._pending = [wire]
            else:
                pending.append(wire)
            self._pending_bytes += len(wire)
        return True

    def flush(self) -> None:
        """
        Write what direct pushes left pending, in one system call. Never
        raises.

        Frames are written straight to the transport, bypassing websockets'
        own framing, which would write each frame separately; only whole
        frames are ever written, so they interleave safely with the
        connection's pings. Once the connection is closing they are dropped:
        no data may follow a close frame, and the client resumes from its
        cursor.
        """
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._pending_bytes = 0
        connection = self.connection
        transport = connection.transport
        if connection.protocol.state is not State.OPEN or transport is None:
            return
        try:
            transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        except Exception:
            logger.debug("session %s: flush failed", self.id, exc_info=True)
            self.close(CloseCode.NORMAL)

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """
        Ask the writer to close the connection with ``code`` once what is
        queued is sent; idempotent (the first code wins).
        """
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self._start_writer()

    def close_at_once(self, code: CloseCode, reason: str | None = None) -> None:
        """
        Send the close frame and end the connection without waiting for the
        client's answer; never awaits, never raises. For a stopping server:
        waiting for thousands of answers, each a round trip through a busy
        client, outlasted the shutdown timeout. Frames still in the outbox
        are not sent: the client resumes from its cursor. A session already
        closing (its writer owns the close) is left to it.
        """
        if self.close_code is not None:
            return
        self.flush()
        self.close_code = code
        self.close_reason = reason
        connection = self.connection
        transport = connection.transport
        protocol = connection.protocol
        if transport is None or protocol.state is not State.OPEN:
            return
        try:
            protocol.send_close(code, reason or close_reason(code))
            for chunk in protocol.data_to_send():
                if chunk:
                    transport.write(chunk)
        except Exception:  # a broken connection: its handler cleans up
            logger.debug("session %s: close frame not written", self.id, exc_info=True)
        # Flushes what is buffered, then FIN.
        transport.close()

    async def finished(self) -> None:
        """
        Wait until the writer is done (queued frames sent, close performed).
        """
        while self._writer is not None:
            await asyncio.shield(self._writer)

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._drain(), name=f"session-{self.id}"
            )

    async def _drain(self) -> None:
        """
        Send queued frames, then close if asked; exits when there is nothing
        left to do. Never raises ConnectionClosed.
        """
        connection = self.connection
        # Direct frames pushed before the queued ones go first.
        self.flush()
        try:
            while (frame := self.outbox.get()) is not None:
                try:
                    async with asyncio.timeout(self.send_timeout):
                        await connection.send(frame)
                except TimeoutError:
                    logger.info("session %s too slow, closing", self.id)
                    self._stats.slow_client_closes += 1
                    self.close_code = self.close_code or CloseCode.TOO_SLOW
                    break
            if self.close_code is not None:
                code = self.close_code
                await connection.close(code, self.close_reason or close_reason(code))
        except ConnectionClosed:
            self.close_code = self.close_code or CloseCode.NORMAL
        finally:
            self._writer = None
