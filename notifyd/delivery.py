"""
Delivery: from committed rows to sessions, each row once, nothing skipped.

One task does all of it, in order:

1. it keeps a *watermark*, the snapshot up to which every committed row has
   been routed to the sessions that were live at the time;
2. on every wake-up (a NOTIFY, a probe, a joining session, or a poll while
   the LISTEN connection is down) it reads the rows of transactions the
   watermark did not see, in ``seq`` order and in pages, routes them, and
   advances the watermark to the snapshot it read them with;
3. then it admits joining sessions: their replay runs from the client's
   cursor up to the same watermark, and they are registered before the next
   read, so the replay and the live stream meet with no gap and no overlap.

Correctness does not depend on notifications: a lost or late NOTIFY only
delays delivery until the next wake-up, and a listener outage is repaired by
the first read after it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import protocol
from .cursor import Cursor, Snapshot
from .db import Database, Row, Window
from .exceptions import CursorError
from .hub import Hub
from .session import Session

__all__ = ["Delivery"]

logger = logging.getLogger(__name__)

_CATCH_UP_BATCH = 500


@dataclass(eq=False)
class _Join:
    session: Session
    since: str | None
    admitted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Delivery:
    """
    The single task that routes committed rows to sessions.
    """

    def __init__(
        self,
        database: Database,
        hub: Hub,
        *,
        fetch_batch: int,
        replay_limit: int,
        poll_interval: float,
        retry_max: float = 5.0,
    ) -> None:
        self._db = database
        self._hub = hub
        self._fetch_batch = fetch_batch
        self._replay_limit = replay_limit
        self._poll_interval = poll_interval
        self._retry_max = retry_max
        self._wakeup = asyncio.Event()
        self._pending: list[_Join] = []
        self.watermark: Snapshot | None = None
        self._unfinished: tuple[Snapshot, int] | None = None
        self.listening = False
        self.ready = asyncio.Event()
        self.delivered = 0

    def wake(self) -> None:
        """
        Ask for a read of newly committed rows. Must not await: it is called
        from asyncpg's notification callback.
        """
        self._wakeup.set()

    def set_listening(self, listening: bool) -> None:
        """
        Tell delivery whether NOTIFY wake-ups are arriving; while they are
        not, it polls every ``poll_interval`` seconds.
        """
        self.listening = listening
        self._wakeup.set()

    async def join(self, session: Session, since: str | None) -> None:
        """
        Admit a session: its hello and replay are queued and it is registered
        for live rows. Returns once that is done.
        """
        request = _Join(session, since)
        self._pending.append(request)
        self._wakeup.set()
        await request.admitted

    async def run(self) -> None:
        """
        Deliver until cancelled. Database errors are logged and retried;
        nothing is skipped while retrying.
        """
        attempt = 0
        while True:
            try:
                if self.watermark is None:
                    self.watermark = await self._db.snapshot()
                    self.ready.set()
                await self._read_new()
                await self._admit_pending()
                attempt = 0
            except asyncio.CancelledError:
                self._cancel_pending()
                raise
            except Exception as exc:
                attempt += 1
                delay = min(self._retry_max, 0.1 * 2 ** (attempt - 1))
                logger.warning("delivery read failed (%s), retrying in %.1fs", _describe(exc), delay)
                await asyncio.sleep(delay)
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can
            # swallow a cancellation that races with the event being set,
            # and this loop must stop when cancelled.
            try:
                async with asyncio.timeout(None if self.listening else self._poll_interval):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()

    def _cancel_pending(self) -> None:
        for request in self._pending:
            request.admitted.cancel()
        self._pending.clear()

    async def _read_new(self) -> None:
        assert self.watermark is not None
        base = self.watermark
        # A page that failed is retried from where the window stopped, so
        # rows already routed are not routed twice.
        if self._unfinished is None:
            window = await self._db.window(base, limit=self._fetch_batch)
            self._route(window, base)
        else:
            end, after_seq = self._unfinished
            window = Window([], end, complete=False)
        while not window.complete:
            after_seq = window.rows[-1]["seq"] if window.rows else after_seq
            self._unfinished = (window.end, after_seq)
            window = await self._db.window(
                base, limit=self._fetch_batch, end=window.end, after_seq=after_seq
            )
            self._route(window, base)
        self._unfinished = None
        self.watermark = window.end

    def _route(self, window: Window, base: Snapshot) -> None:
        """
        Queue a window's rows for their users' sessions, in seq order.
        """
        hub = self._hub
        last_seq: dict[str, int] = {}
        end_cursor = ""
        if window.complete:
            for row in window.rows:
                last_seq[row["to_user"]] = row["seq"]
            end_cursor = Cursor(window.end).encode()
        for row in window.rows:
            sessions = hub.sessions_of(row["to_user"])
            if not sessions:
                continue
            if window.complete and last_seq[row["to_user"]] == row["seq"]:
                cursor = end_cursor
            else:
                cursor = Cursor(base, window.end, row["seq"]).encode()
            frame = protocol.encode_message(row, cursor)
            for session in sessions:
                session.push(frame, cursor)
            self.delivered += len(sessions)

    async def _admit_pending(self) -> None:
        assert self.watermark is not None
        end = self.watermark
        requests, self._pending = self._pending, []
        resumes: list[tuple[_Join, Cursor]] = []
        for request in requests:
            if request.since is None:
                self._admit(request, protocol.encode_hello(request.session.user, Cursor(end).encode(), None))
                continue
            try:
                cursor = Cursor.decode(request.since)
                if not end.covers(cursor.end or cursor.base):
                    raise CursorError("cursor is ahead of this database")
            except CursorError as exc:
                logger.debug("session %s: unusable cursor (%s)", request.session.id, exc)
                self._admit_unrecoverable(request, end)
                continue
            resumes.append((request, cursor))
        for start in range(0, len(resumes), _CATCH_UP_BATCH):
            chunk = resumes[start : start + _CATCH_UP_BATCH]
            results = await self._db.catch_up(
                [(request.session.user, cursor) for request, cursor in chunk],
                end,
                limit=self._replay_limit + 1,
            )
            for (request, cursor), rows in zip(chunk, results):
                self._admit_resumed(request, cursor, rows, end)

    def _admit(self, request: _Join, hello: str, replay: Sequence[tuple[str, str]] = ()) -> None:
        session = request.session
        if not session.closing:
            session.push(hello)
            for frame, cursor in replay:
                session.push(frame, cursor)
            self._hub.add(session)
        if not request.admitted.done():
            request.admitted.set_result(None)

    def _admit_unrecoverable(self, request: _Join, end: Snapshot) -> None:
        position = Cursor(end).encode()
        self._admit(
            request,
            protocol.encode_hello(request.session.user, position, False),
            [(protocol.encode_resync(position), position)],
        )

    def _admit_resumed(self, request: _Join, since: Cursor, newest_first: list[Row], end: Snapshot) -> None:
        """
        Queue hello and the replay from ``since`` up to ``end``.

        Cursors are chosen so that a client cut off anywhere in the replay
        resumes without a gap or a duplicate: first the rest of the batch the
        client was in the middle of (rows ``since.end`` saw), then the rows
        after it, each in seq order.
        """
        user = request.session.user
        since_text = since.encode()
        if len(newest_first) > self._replay_limit:
            # Too much to replay: the newest part, with no claim of progress,
            # then resync to make the client reload from history.
            kept = newest_first[: self._replay_limit][::-1]
            replay = [(protocol.encode_message(row, since_text), since_text) for row in kept]
            position = Cursor(end).encode()
            replay.append((protocol.encode_resync(position), position))
            self._admit(request, protocol.encode_hello(user, since_text, False), replay)
            return
        rows = newest_first[::-1]
        if since.end is not None:
            rest_of_batch = [row for row in rows if since.end.visible(row["xact_id"])]
            after = [row for row in rows if not since.end.visible(row["xact_id"])]
            after_base = since.end
        else:
            rest_of_batch, after, after_base = [], rows, since.base
        cursors = [Cursor(since.base, since.end, row["seq"]) for row in rest_of_batch]
        cursors += [Cursor(after_base, end, row["seq"]) for row in after]
        ordered = rest_of_batch + after
        if ordered:
            cursors[-1] = Cursor(end)
            hello_cursor = since_text
        else:
            hello_cursor = Cursor(end).encode()
        replay = []
        for row, cursor in zip(ordered, cursors):
            text = cursor.encode()
            replay.append((protocol.encode_message(row, text), text))
        self._admit(request, protocol.encode_hello(user, hello_cursor, True), replay)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
