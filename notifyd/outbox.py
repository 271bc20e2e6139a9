"""
A session's bounded outbound queue, without I/O.

Delivery must never wait for a client, so frames are put here synchronously.
When a client falls so far behind that the queue would pass its bounds
(messages or bytes), the queued messages are dropped and replaced by a single
``resync`` frame carrying the newest dropped message's cursor: the client is
told to reload instead of silently missing messages, and the server's memory
stays bounded.
"""

from __future__ import annotations

from collections import deque

from . import protocol

__all__ = ["Outbox"]


class Outbox:
    """
    FIFO of encoded frames with a message and a byte bound.
    """

    __slots__ = ("_chars", "_frames", "_newest_cursor", "max_bytes", "max_messages", "overflows")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        # Created on first use: most sessions never queue anything, and an
        # empty deque costs over half a kilobyte.
        self._frames: deque[str] | None = None
        self._chars = 0
        self._newest_cursor: str | None = None
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.overflows = 0

    def __len__(self) -> int:
        return 0 if self._frames is None else len(self._frames)

    @property
    def queued_chars(self) -> int:
        """
        Characters queued (frames are mostly ASCII JSON, so about bytes).
        """
        return self._chars

    def put(self, frame: str, cursor: str | None = None) -> bool:
        """
        Queue ``frame``; returns False when this put overflowed the queue.

        ``cursor`` is the delivery cursor of a message frame (None for control
        frames). On overflow, every queued frame is replaced by one ``resync``
        at the newest message cursor seen; a message frame that overflowed is
        dropped with them (the resync covers it), a control frame is kept.
        """
        if cursor is not None:
            self._newest_cursor = cursor
        size = len(frame)
        if len(self) < self.max_messages and self._chars + size <= self.max_bytes:
            self._append(frame)
            return True
        self.overflows += 1
        self._frames = None
        self._chars = 0
        if self._newest_cursor is not None:
            self._append(protocol.encode_resync(self._newest_cursor))
        if cursor is None:
            self._append(frame)
        return False

    def get(self) -> str | None:
        """
        The oldest queued frame, or None when empty.
        """
        if not self._frames:
            return None
        frame = self._frames.popleft()
        self._chars -= len(frame)
        return frame

    def _append(self, frame: str) -> None:
        if self._frames is None:
            self._frames = deque()
        self._frames.append(frame)
        self._chars += len(frame)
