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
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import orjson

from . import protocol
from .collector import Collector
from .cursor import Cursor, Snapshot, WindowCursors
from .db import Database, Event, Row, Window
from .exceptions import CursorError
from .hub import Hub
from .session import Session
from .stats import Stats

__all__ = ["Delivery"]

logger = logging.getLogger(__name__)

_CATCH_UP_BATCH = 500

# Each later page of a window is twice the size of the one before, up to this
# many times fetch_batch: fewer round trips for a large INSERT, with the rows
# held at once still bounded.
_MAX_PAGE_GROWTH = 16


def _page_sizes(first: int) -> Iterator[int]:
    size = first
    while True:
        size = min(2 * size, _MAX_PAGE_GROWTH * first)
        yield size


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
        event_retention: float = 3600.0,
        min_interval: float = 0.0,
        retry_max: float = 5.0,
        stats: Stats | None = None,
        on_routed: Callable[[list[Row], list[bool]], None] | None = None,
        collector: Collector | None = None,
    ) -> None:
        """
        ``on_routed`` (the sinks) gets each routed page of rows and, per
        row, whether it reached a live session here; it must not block.
        """
        self._db = database
        self._collector = collector
        self._hub = hub
        self._fetch_batch = fetch_batch
        self._replay_limit = replay_limit
        self._poll_interval = poll_interval
        self._retry_max = retry_max
        self._wakeup = asyncio.Event()
        self._pending: list[_Join] = []
        self.watermark: Snapshot | None = None
        self._unfinished: tuple[Snapshot, int, _WindowAccount] | None = None
        self._prune_every = 60.0
        self._event_retention = event_retention
        self._min_interval = min_interval
        self.stats = stats if stats is not None else Stats()
        self._repairing = False
        self.listening = False
        self.ready = asyncio.Event()
        self._on_routed = on_routed
        # The next window's first page, already asked for: (its base, the
        # query). See _maybe_prefetch.
        self._prefetch: tuple[Snapshot, asyncio.Future[Window]] | None = None
        self._last_read = 0.0

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
        if listening and not self.listening and self.watermark is not None:
            # The first read after LISTEN is back repairs the outage's gap.
            self._repairing = True
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
        last_prune = self._last_read = time.monotonic()
        while True:
            joining, self._pending = self._pending, []
            try:
                if self.watermark is None:
                    self.watermark = await self._db.snapshot()
                    self.ready.set()
                counts = await self._read_new([j.session.user for j in joining])
                if counts is None:
                    # A retried window has no counts for them: next round.
                    self._requeue(joining)
                    self._wakeup.set()
                else:
                    await self._admit_all(joining, counts)
                if self._collector is not None:
                    hub = self._hub
                    self._collector.after_round(
                        admitted=bool(joining) and counts is not None,
                        sessions=hub.session_count,
                        closed_total=hub.closed_total,
                    )
                if time.monotonic() - last_prune > self._prune_every:
                    last_prune = time.monotonic()
                    await self._db.prune_events(self._event_retention)
                attempt = 0
            except asyncio.CancelledError:
                self._drop_prefetch()
                for request in joining + self._pending:
                    request.admitted.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                self._drop_prefetch()
                self._requeue(joining)
                attempt += 1
                delay = min(self._retry_max, 0.1 * 2 ** (attempt - 1))
                logger.warning(
                    "delivery read failed (%s), retrying in %.1fs", _describe(exc), delay
                )
                await asyncio.sleep(delay)
                continue
            if self._prefetch is not None:
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can
            # swallow a cancellation that races with the event being set,
            # and this loop must stop when cancelled.
            try:
                async with asyncio.timeout(None if self.listening else self._poll_interval):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            # Under load, start reads at most every ``min_interval`` seconds,
            # so one query serves the commits of that interval instead of one
            # query per commit; an isolated commit is read at once.
            delay = self._last_read + self._min_interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._last_read = time.monotonic()
            self._wakeup.clear()

    def _requeue(self, requests: list[_Join]) -> None:
        self._pending[:0] = [r for r in requests if not r.admitted.done()]

    async def _read_new(self, count_users: list[str]) -> dict[str, int] | None:
        """
        Read and route everything committed since the watermark, then
        advance it. Returns the unread counts of ``count_users`` as of the new
        watermark, or None when this call finished a window that an earlier,
        failed call had started (its counts are gone).
        """
        assert self.watermark is not None
        base = self.watermark
        # A page that failed is retried from where the window stopped, so
        # rows already routed are not routed twice.
        if self._unfinished is None:
            prefetched = self._take_prefetch(base)
            counts: dict[str, int] | None
            if prefetched is None:
                window = await self._db.window(
                    base, limit=self._fetch_batch, count_users=count_users
                )
                counts = window.counts
            else:
                window = await prefetched
                # Asked for before these sessions came: no counts for them.
                counts = None if count_users else window.counts
            if window.complete:
                self._maybe_prefetch(window.end)
            account = _WindowAccount(window.counts, window.events)
            self._route(window, base, account)
        else:
            end, after_seq, account = self._unfinished
            window = Window([], end, complete=False)
            counts = None
        if not window.complete:
            end = window.end
            after_seq = window.rows[-1]["seq"] if window.rows else after_seq
            self._unfinished = (end, after_seq, account)
            rest = self._db.window_rest(
                base, end, after_seq=after_seq, pages=_page_sizes(self._fetch_batch)
            )
            async with contextlib.aclosing(rest) as pages:
                async for window in pages:
                    self._route(window, base, account)
                    if window.rows:
                        self._unfinished = (end, window.rows[-1]["seq"], account)
        self._unfinished = None
        self._repairing = False
        self.watermark = window.end
        self._settle(account, base)
        return counts

    def _maybe_prefetch(self, end: Snapshot) -> None:
        """
        Under load, ask for the next window (from ``end``) before routing
        this one, so the query's round trip overlaps the routing and the
        writes instead of adding to them.

        Only when more commits were announced, no session is waiting to
        join (a prefetched window has no unread counts for them) and the
        listener is up; at most one read starts per ``min_interval``.
        """
        now = time.monotonic()
        if (
            not self._wakeup.is_set()
            or not self.listening
            or self._pending
            or now - self._last_read < self._min_interval
        ):
            return
        self._wakeup.clear()
        self._last_read = now
        self._prefetch = (
            end,
            asyncio.ensure_future(self._db.window(end, limit=self._fetch_batch)),
        )

    def _take_prefetch(self, base: Snapshot) -> asyncio.Future[Window] | None:
        """
        The prefetched read of the window starting at ``base``, if any.
        """
        if self._prefetch is not None and self._prefetch[0] == base:
            future = self._prefetch[1]
            self._prefetch = None
            return future
        self._drop_prefetch()
        return None

    def _drop_prefetch(self) -> None:
        """
        Abandon a prefetched read (its rows are read again from the
        watermark, so nothing is lost).
        """
        if self._prefetch is not None:
            future = self._prefetch[1]
            self._prefetch = None
            future.cancel()
            future.add_done_callback(_consume)

    def _route(self, window: Window, base: Snapshot, account: _WindowAccount) -> None:
        """
        Queue a window's rows for their users' sessions, in seq order, and
        note what they do to unread counts.
        """
        hub = self._hub
        rows = window.rows
        last_seq: dict[str, int] = {}
        if window.complete:
            for row in rows:
                last_seq[row["to_user"]] = row["seq"]
        # Past an announcement, no user's own row is their last in the window.
        star_seq = last_seq.get("*", -1)
        final_seq = rows[-1]["seq"] if window.complete and rows else None
        cursors = WindowCursors(base, window.end)
        stats = self.stats
        now = time.time()
        online: list[bool] | None = [] if self._on_routed is not None else None
        for row in rows:
            user = row["to_user"]
            seq = row["seq"]
            if user == "*":
                sessions: Iterable[Session] = list(hub)
                account.new_announcements += 1
                is_last = seq == final_seq
            else:
                own = hub.sessions_of(user)
                if not own:
                    if online is not None:
                        online.append(False)
                    continue
                sessions = own
                if row["is_read"] == "0":
                    account.new_unread[user] = account.new_unread.get(user, 0) + 1
                is_last = last_seq.get(user) == seq and seq > star_seq
            cursor = cursors.at_end(seq) if is_last else cursors.within(seq)
            fields = protocol.message_frame(row, cursor)
            if fields["skipUrl"] is None and row["skip_url"] is not None:
                stats.unsafe_skip_urls += 1
            sent_at = row["send_time"]
            if sent_at.tzinfo is not None:
                stats.latency.observe(now - sent_at.timestamp())
            if self._repairing:
                stats.repair_rows += 1
            payload = orjson.dumps(fields)
            frame = payload.decode()
            wire = protocol.text_frame(payload)
            count = 0
            unflushed = account.unflushed.add
            for session in sessions:
                if session.push(frame, cursor, flush=False, wire=wire):
                    unflushed(session)
                count += 1
            stats.delivered += count
            if online is not None:
                online.append(count > 0)
        if not window.complete:
            # Later pages follow; the last one is flushed with the window's
            # events and unread counts, in one write per session.
            account.flush()
        if online is not None and self._on_routed is not None:
            self._on_routed(rows, online)

    def _settle(self, account: _WindowAccount, base: Snapshot) -> None:
        """
        After a whole window: push its read/delete events, then every unread
        count it changed.
        """
        hub = self._hub
        for event in account.events:
            if event.kind == "deleted":
                frame = protocol.encode_deleted(event.ids or [])
            else:
                frame = protocol.encode_read(event.ids, event.type, read=event.kind == "read")
            wire = protocol.text_frame(frame.encode())
            targets = list(hub) if event.user == "*" else hub.sessions_of(event.user) or ()
            for session in targets:
                if session.push(frame, flush=False, wire=wire):
                    account.unflushed.add(session)
        # Announcements deleted in this window that had been counted before it.
        counted_deletes = [
            set(event.readers or ())
            for event in account.events
            if event.user == "*"
            and event.kind == "deleted"
            and event.inserted is not None
            and base.visible(event.inserted)
        ]
        everyone = account.new_announcements or counted_deletes
        users = (
            list(hub.unread)
            if everyone
            else [u for u in {*account.recounted, *account.new_unread} if u in hub.unread]
        )
        # Many users share a count (after an announcement, most of them):
        # each count is encoded and framed once.
        frames: dict[int, tuple[str, bytes]] = {}
        # Run once per user (per session, after an announcement): no
        # attribute lookups or generators in the loop that can be avoided.
        unread, recounted = hub.unread, account.recounted
        new_unread, announced = account.new_unread.get, account.new_announcements
        unflushed = account.unflushed.add
        for user in users:
            old = unread[user]
            if user in recounted:
                new = recounted[user]
            else:
                new = old + new_unread(user, 0) + announced
                if counted_deletes:
                    new -= sum(1 for readers in counted_deletes if user not in readers)
            if new != old:
                unread[user] = new
                encoded = frames.get(new)
                if encoded is None:
                    text = protocol.encode_unread(new)
                    encoded = frames[new] = (text, protocol.text_frame(text.encode()))
                for session in hub.sessions_of(user) or ():
                    if session.push(encoded[0], flush=False, wire=encoded[1]):
                        unflushed(session)
        account.flush()

    async def _admit_all(self, requests: list[_Join], counts: dict[str, int]) -> None:
        assert self.watermark is not None
        end = self.watermark
        resumes: list[tuple[_Join, Cursor]] = []
        for request in requests:
            unread = counts.get(request.session.user, 0)
            if request.since is None:
                hello = protocol.encode_hello(
                    request.session.user, Cursor(end).encode(), None, unread
                )
                self._admit(request, hello, unread)
                continue
            try:
                cursor = Cursor.decode(request.since)
                if not end.covers(cursor.end or cursor.base):
                    raise CursorError("cursor is ahead of this database")
            except CursorError as exc:
                logger.debug("session %s: unusable cursor (%s)", request.session.id, exc)
                self._admit_unrecoverable(request, end, unread)
                continue
            resumes.append((request, cursor))
        for start in range(0, len(resumes), _CATCH_UP_BATCH):
            chunk = resumes[start : start + _CATCH_UP_BATCH]
            results = await self._db.catch_up(
                [(request.session.user, cursor) for request, cursor in chunk],
                end,
                limit=self._replay_limit + 1,
            )
            for (request, cursor), rows in zip(chunk, results, strict=True):
                unread = counts.get(request.session.user, 0)
                self._admit_resumed(request, cursor, rows, end, unread)

    def _admit(
        self,
        request: _Join,
        hello: str,
        unread: int,
        replay: Sequence[tuple[str, str]] = (),
    ) -> None:
        session = request.session
        if not session.closing:
            session.push(hello, flush=False)
            for frame, cursor in replay:
                session.push(frame, cursor, flush=False)
            session.flush()
            self._hub.add(session)
            self._hub.unread[session.user] = unread
        if not request.admitted.done():
            request.admitted.set_result(None)

    def _admit_unrecoverable(self, request: _Join, end: Snapshot, unread: int) -> None:
        self.stats.resyncs += 1
        position = Cursor(end).encode()
        self._admit(
            request,
            protocol.encode_hello(request.session.user, position, False, unread),
            unread,
            [(protocol.encode_resync(position), position)],
        )

    def _admit_resumed(
        self, request: _Join, since: Cursor, newest_first: list[Row], end: Snapshot, unread: int
    ) -> None:
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
            replay = [
                (protocol.encode_message(row, f"{since_text}~{row['seq']}"), since_text)
                for row in kept
            ]
            position = Cursor(end).encode()
            replay.append((protocol.encode_resync(position), position))
            self.stats.resyncs += 1
            self._admit(
                request, protocol.encode_hello(user, since_text, False, unread), unread, replay
            )
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
        for row, cursor in zip(ordered, cursors, strict=True):
            text = cursor.encode(at_seq=row["seq"])
            replay.append((protocol.encode_message(row, text), text))
        hello = protocol.encode_hello(user, hello_cursor, True, unread)
        self._admit(request, hello, unread, replay)


@dataclass(eq=False)
class _WindowAccount:
    """
    What one window (all its pages) does to unread counts.

    ``recounted`` are exact counts taken at the window's end snapshot (users
    with read/delete events, and joining users); for everyone else the
    window's new rows are added to the count they had.
    """

    recounted: dict[str, int]
    events: list[Event]
    new_unread: dict[str, int] = field(default_factory=dict)
    new_announcements: int = 0
    unflushed: set[Session] = field(default_factory=set)

    def flush(self) -> None:
        """
        One write per session for what a page (or the settling) queued.
        """
        for session in self.unflushed:
            session.flush()
        self.unflushed.clear()


def _consume(future: asyncio.Future[Window]) -> None:
    if not future.cancelled():
        future.exception()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
