"""
Delivery: from committed rows to sessions, each row once, nothing skipped.

One task does all of it, in order:

1. it keeps a *watermark*, the snapshot up to which every committed row has
   been routed to the sessions that were live at the time;
2. on every wake-up (a NOTIFY, a probe, a joining session, or a poll while
   the LISTEN connection is down) it reads the rows of transactions the
   watermark did not see (:mod:`notifyd.window`), routes them
   (:mod:`notifyd.router`), and advances the watermark to the snapshot it
   read them with;
3. then it admits joining sessions: their replay (:mod:`notifyd.replay`)
   runs from the client's cursor up to the same watermark, and they are
   registered before the next read, so the replay and the live stream meet
   with no gap and no overlap.

Correctness does not depend on notifications: a lost or late NOTIFY only
delays delivery until the next wake-up, and a listener outage is repaired by
the first read after it.

Expiring messages follow the same rule with a clock beside the watermark:
delivery keeps the *sweep time*, the database clock of its last window, up
to which every expiry of a row it routed has been withdrawn. Each window
withdraws (as ``deleted`` events, with recounted counts, in the same
statement) the rows the watermark saw whose ``expire_at`` lies between the
sweep time and the window's own clock, and leaves out new rows already past
it; the sweep time then moves to that clock. A timer wakes delivery at the
next known ``expire_at`` (which each window reads) and at least every
``_SWEEP_EVERY_S`` seconds, so a withdrawal follows its ``expire_at`` by one
read.

Under load the wake-ups come from delivery's own clock instead: its
:class:`~notifyd.pacing.Pacer` says when to read next and when to renew the
polling lease that turns the triggers' NOTIFYs off (docs/deployment.md,
"Wake-ups under load").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from . import failover, replay
from .ahead import CARRIED_ROWS_MAX, parse_payload
from .backoff import backoff_delay
from .collector import Collector
from .cursor import Cursor, Snapshot
from .db import Database, Row, Window
from .exceptions import CursorError, DatabaseError, LineageChanged, describe
from .hub import Hub
from .ledger import ByType
from .pacing import LEASE_S, Lease, Mode, Pacer, ReadBudget, Renewal
from .queries import POLL_PAYLOAD
from .recall import Recall, event_fingerprint, fingerprint
from .router import Router, WindowAccount
from .session import Session
from .stats import Stats
from .window import WindowReader

__all__ = ["Delivery"]

# Notifications after which commits may come that no NOTIFY announces (a
# lease), or that announce a change of an unknown transaction (an older
# schema's constant wake-ups): nothing is pushed ahead until a window is read.
_HOLDING_PAYLOADS = frozenset({POLL_PAYLOAD, "m", "e"})
# How soon a window read follows rows that were all pushed ahead: it only
# confirms them (their cursors, the sinks, the watermark), so one read serves
# the commits of this long instead of one read each.
_CONFIRM_AFTER_S = 0.05

logger = logging.getLogger(__name__)

_CATCH_UP_BATCH = 500

# A read at least this often while rows may expire, should the next known
# expire_at ever be stale; and this much past an expiry on the local clock,
# so that the database's clock has surely reached it when the read starts.
_SWEEP_EVERY_S = 5.0
_EXPIRY_MARGIN_S = 0.005

# The shortest wait between two reads while polling: a read every
# millisecond already serves every commit of that millisecond.
_MIN_POLL_INTERVAL = 0.001


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
        hub: Hub[Session],
        *,
        fetch_batch: int,
        replay_limit: int,
        poll_interval: float,
        event_retention: float = 3600.0,
        min_interval: float = 0.0,
        poll_above: float | None = None,
        contention: bool = False,
        retry_max: float = 5.0,
        stats: Stats | None = None,
        on_routed: Callable[[list[Row], list[bool]], None] | None = None,
        collector: Collector | None = None,
        push_ahead: bool = True,
    ) -> None:
        """
        ``on_routed`` (the sinks) gets each routed page of rows and, per
        row, whether it reached a live session here; it must not block.
        ``contention``: this instance takes the polling lease when the
        application's commits queue for the NOTIFY lock; ``poll_above``:
        also above that many writing transactions a second. With neither it
        never takes it (leases of other instances are obeyed all the same).
        """
        self._db = database
        self._collector = collector
        self._hub = hub
        self.stats = stats if stats is not None else Stats()
        self._reader = WindowReader(database, fetch_batch=fetch_batch)
        self._router = Router(hub, self.stats, on_routed)
        self._replay_limit = replay_limit
        self._poll_interval = poll_interval
        self._retry_max = retry_max
        self._wakeup = asyncio.Event()
        # Set when LISTEN comes back: the database answers again, so a read
        # failure's back-off ends early instead of running its course.
        self._database_back = asyncio.Event()
        self._pending: list[_Join] = []
        self.watermark: Snapshot | None = None
        # What was routed under each transaction id lately: what a failover
        # that lost transactions is repaired with (notifyd.failover).
        self._recall = Recall()
        # The database clock up to which expiries were withdrawn (moves with
        # the watermark), and when (time.monotonic()) the next known
        # expire_at comes.
        self._swept_to: datetime | None = None
        self._expiry_due: float | None = None
        # The account of a window whose reading failed part-way, and its
        # first page's clock and next expire_at (as of when it was read).
        self._account: WindowAccount | None = None
        self._opened: tuple[datetime | None, datetime | None, float] | None = None
        self._prune_every = 60.0
        self._event_retention = event_retention
        self._min_interval = min_interval
        self.listening = False
        self.ready = asyncio.Event()
        self._last_read = 0.0
        self._budget = ReadBudget(min_interval)
        self._pacer = Pacer(
            poll_above, max(min_interval, _MIN_POLL_INTERVAL), contention=contention
        )
        self._renewal_failing = False
        self._push_ahead = push_ahead
        # Notifications arrived and not yet taken (see notified()), and the
        # timer of the read that confirms rows pushed ahead.
        self._notifications: list[str] = []
        self._confirming: asyncio.TimerHandle | None = None
        # Set after a read when the pacer wants a look at the NOTIFY lock.
        self._sample_wanted = asyncio.Event()
        # run()'s helpers, and the renewal of the lease in flight.
        self._tasks: asyncio.TaskGroup | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._announcing: asyncio.Task[None] | None = None
        self._pruning: asyncio.Task[None] | None = None

    @property
    def read_budget(self) -> ReadBudget:
        """
        The reads a NOTIFY may start at once (read only: for tests).
        """
        return self._budget

    @property
    def router(self) -> Router:
        """
        Where rows and counts go to sessions (read only: for tests).
        """
        return self._router

    @property
    def pacer(self) -> Pacer:
        """
        The wake-up mode and the lease as this instance sees them (read
        only: for vitals and tests).
        """
        return self._pacer

    def wake(self) -> None:
        """
        Ask for a read of newly committed rows. Must not await: it is called
        from asyncpg's notification callback.
        """
        self._wakeup.set()

    def notified(self, payload: str) -> None:
        """
        A notification (not a probe) arrived: ask for a read, and push the
        rows it carries, if it may. Must not await: it is called from
        asyncpg's notification callback.

        asyncpg schedules the callbacks of every notification one read from
        the socket brought before any of them runs: they are taken together,
        after the last, so that a transaction's later notifications (its
        read/delete events, rows it did not carry) are known before its
        first is pushed ahead.
        """
        self._notifications.append(payload)
        if len(self._notifications) == 1:
            asyncio.get_running_loop().call_soon(self._take_notifications)

    def _take_notifications(self) -> None:
        if self._account is not None:
            # A window is being routed, so sessions are not all at the
            # watermark: these wait for it to settle (see _read_new).
            return
        batch, self._notifications = self._notifications, []
        ahead = self._router.ahead
        said = [parse_payload(payload) for payload in batch]
        # Transactions that also sent what waits for a window: none of their
        # rows goes ahead of the rest of them.
        waiting = {carried.xact for carried in said if carried is not None and carried.rows is None}
        # Whether a read is needed now, or only to confirm rows pushed ahead.
        needed = False
        for payload, carried in zip(batch, said, strict=True):
            if carried is None:
                needed = True
                if payload in _HOLDING_PAYLOADS:
                    ahead.hold()
            elif carried.rows is None or carried.xact in waiting:
                # Its rows come with its window, and every later commit's
                # after them.
                ahead.block(carried.xact)
                needed = True
            elif self._may_push_ahead() and self.watermark is not None:
                needed |= not self._router.push_ahead(carried.xact, carried.rows, self.watermark)
                # Claimed from now on: remembered for a failover's repair.
                self._recall.note_ahead(
                    time.monotonic(),
                    self.watermark,
                    carried.xact,
                    [(carried.xact, fingerprint(row["id"], row["seq"])) for row in carried.rows],
                )
            else:
                ahead.block(carried.xact)
                needed = True
        if needed:
            self._wakeup.set()
        elif self._confirming is None:
            # One window confirms what was pushed ahead meanwhile.
            self._confirming = asyncio.get_running_loop().call_later(
                _CONFIRM_AFTER_S, self._confirm
            )

    def _confirm(self) -> None:
        self._confirming = None
        self._wakeup.set()

    def _reading(self) -> None:
        """
        A read starts: it serves every wake-up so far, and confirms every
        row pushed ahead so far.
        """
        self._wakeup.clear()
        if self._confirming is not None:
            self._confirming.cancel()
            self._confirming = None

    def _may_push_ahead(self) -> bool:
        """
        Whether a NOTIFY's rows may go out before their window: only while
        every commit sends one and every earlier commit is routed or pushed
        ahead too, so that none is overtaken.
        """
        return (
            self._push_ahead
            and self.listening
            and self._pacer.mode is Mode.NOTIFY
            and not self._router.repairing
            and not self._router.ahead.holding_back
            and self._db.lineage.changed is None
        )

    def set_listening(self, listening: bool) -> None:
        """
        Tell delivery whether NOTIFY wake-ups are arriving; while they are
        not, it polls every ``poll_interval`` seconds.
        """
        if listening and not self.listening:
            self._database_back.set()
            if self.watermark is not None:
                # The first read after LISTEN is back repairs the outage's gap.
                self._router.repairing = True
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

    def leave(self, session: Session) -> None:
        """
        A session ended: no more rows for it. Idempotent.
        """
        self._router.unregister(session)

    async def run(self) -> None:
        """
        Deliver until cancelled. Database errors are logged and retried;
        nothing is skipped while retrying.
        """
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            tasks.create_task(self._sample_notify_lock(), name="notify-lock-sampler")
            await self._deliver()

    async def _sample_notify_lock(self) -> None:
        """
        Look at the NOTIFY lock whenever the pacer asks (see
        :meth:`Pacer.next_sample_in`), at most every ``Pacer.sample_interval``, beside
        the reads rather than between them so that no read waits for it.
        """
        while True:
            await self._sample_wanted.wait()
            self._sample_wanted.clear()
            # On its own clock while the pacer wants looks: writers stuck in
            # the queue send no NOTIFY, so no read would ask for the next.
            while True:
                now = time.monotonic()
                due = self._pacer.next_sample_in(now)
                if due is None:
                    break
                if due > 0:
                    await asyncio.sleep(due)
                    continue
                try:
                    waiting = await self._db.notify_lock_queue()
                except DatabaseError as exc:
                    logger.debug("looking at the NOTIFY lock failed (%s)", describe(exc))
                    await asyncio.sleep(self._pacer.sample_interval)
                    continue
                self.stats.notify_lock_samples += 1
                self.stats.notify_lock_waiting_samples += waiting > 0
                self._pacer.sampled(time.monotonic(), waiting)
                if self._pacer.contended(time.monotonic()):
                    # A read follows, and after it the renewal.
                    self._wakeup.set()

    async def _deliver(self) -> None:
        attempt = 0
        last_prune = self._last_read = time.monotonic()
        while True:
            joining, self._pending = self._pending, []
            try:
                if self._db.lineage.changed is not None:
                    await self._repair_history()
                if self.watermark is None:
                    self.watermark, self._swept_to = await self._db.snapshot_and_clock()
                    self.ready.set()
                counts = await self._read_new([j.session.user for j in joining])
                if counts is None:
                    # A retried window has no counts for them: next round.
                    self._requeue(joining)
                    self._wakeup.set()
                else:
                    await self._admit_all(joining, counts)
                self._maybe_renew_lease()
                await self._take_horizon()
                if self._pacer.next_sample_in(time.monotonic()) is not None:
                    self._sample_wanted.set()
                if self._collector is not None:
                    hub = self._hub
                    self._collector.after_round(
                        admitted=bool(joining) and counts is not None,
                        sessions=hub.session_count,
                        closed_total=hub.closed_total,
                    )
                if time.monotonic() - last_prune > self._prune_every:
                    last_prune = time.monotonic()
                    self._start_prune()
                if attempt:
                    logger.info("delivery reads again after %d failed attempts", attempt)
                attempt = 0
            except asyncio.CancelledError:
                self._reader.drop_prefetch()
                for request in joining + self._pending:
                    request.admitted.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                self._reader.drop_prefetch()
                if not self._reader.resuming:
                    # Only a window cut part-way is carried on; any other
                    # failed read starts its window again, with a new account.
                    self._account = None
                    self._opened = None
                self._requeue(joining)
                if isinstance(exc, LineageChanged):
                    # Repaired at the top of the next round, before any read.
                    continue
                attempt += 1
                self.stats.read_failures += 1
                delay = backoff_delay(attempt, initial=0.1, maximum=self._retry_max, jitter=0)
                logger.warning("delivery read failed (%s), retrying in %.1fs", describe(exc), delay)
                self._database_back.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._database_back.wait()
                continue
            if self._reader.prefetching:
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can
            # swallow a cancellation that races with the event being set,
            # and this loop must stop when cancelled.
            timeout = self._wait_limit()
            if timeout > 0:
                try:
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
            # Under load, one query serves the commits of ``min_interval``
            # instead of one query per commit: while polling, reads are that
            # far apart; while waiting for NOTIFYs, a read starts at once as
            # long as the budget of reads lasts, so a commit is not held back
            # for its predecessor's sake.
            if self._pacer.mode is Mode.POLLING:
                delay = self._last_read + self._min_interval - time.monotonic()
            else:
                delay = self._budget.wait(time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)
            self._last_read = time.monotonic()
            self._budget.spend(self._last_read)
            self._reading()

    def _wait_limit(self) -> float:
        """
        How long to wait for a wake-up: until the next known expire_at, at
        most ``_SWEEP_EVERY_S`` (and ``poll_interval`` while not listening),
        and while a lease is in force or draining, the pacer's interval from
        the last read.
        """
        limit = _SWEEP_EVERY_S if self.listening else min(_SWEEP_EVERY_S, self._poll_interval)
        if self._expiry_due is not None:
            limit = min(limit, max(0.0, self._expiry_due - time.monotonic()))
        paced = self._pacer.next_read_in()
        if paced is not None:
            limit = min(limit, self._last_read + paced - time.monotonic())
        return limit

    def _maybe_renew_lease(self) -> None:
        """
        Start or extend the polling lease when the pacer asks for it, beside
        the reads, which must never wait for it.
        """
        if self._tasks is None or (self._renewing is not None and not self._renewing.done()):
            return
        renewal = self._pacer.renewal(time.monotonic())
        if renewal is not None:
            self._renewing = self._tasks.create_task(self._renew_lease(renewal))

    async def _renew_lease(self, renewal: Renewal) -> None:
        """
        Start or extend the polling lease, then announce it. A failure is
        logged once and otherwise changes nothing: the triggers keep
        notifying, and delivery keeps waking up on their NOTIFYs.
        """
        try:
            lease = await self._db.set_lease(round(LEASE_S * 1000))
        except DatabaseError as exc:
            self._pacer.renewal_failed(time.monotonic())
            if not self._renewal_failing:
                self._renewal_failing = True
                logger.warning(
                    "renewing the polling lease failed (%s); the triggers keep notifying",
                    describe(exc),
                )
            return
        if self._renewal_failing:
            self._renewal_failing = False
            logger.info("the polling lease is renewed again")
        if renewal is Renewal.START:
            self.stats.polling_leases += 1
            logger.debug(
                "polling lease started; kept above %s writing transactions/s",
                self._pacer.keep_above,
            )
        self._pace(lambda pacer: pacer.renewed(time.monotonic(), lease))
        # The announcement queues for the NOTIFY lock, behind commits that
        # may be stuck holding it (one waiting for a synchronous standby):
        # on its own task, so that renewals go on meanwhile. One in flight
        # is enough: every instance it reaches reads and sees the lease.
        if self._announcing is None or self._announcing.done():
            assert self._tasks is not None  # set before any renewal starts
            self._announcing = self._tasks.create_task(self._announce_lease())

    async def _announce_lease(self) -> None:
        try:
            await self._db.announce_lease()
        except DatabaseError as exc:
            # Instances waiting for NOTIFYs hear of the lease from the next
            # renewal's announcement, or their probe.
            logger.debug("announcing the polling lease failed (%s)", describe(exc))

    def _start_prune(self) -> None:
        """
        Delete events past their retention, beside the reads: a large
        DELETE must not hold back the next one.
        """
        if self._tasks is None or (self._pruning is not None and not self._pruning.done()):
            return
        self._pruning = self._tasks.create_task(self._prune())

    async def _prune(self) -> None:
        try:
            await self._db.prune_events(self._event_retention)
        except DatabaseError as exc:
            # Tried again a minute later; the events only wait longer.
            logger.debug("pruning old events failed (%s)", describe(exc))

    async def _take_horizon(self) -> None:
        """
        Give a draining pacer the transaction id it waits for. A failure
        only leaves it draining (reading on its own clock) until the next
        try, after the next read.
        """
        if not self._pacer.horizon_needed:
            return
        try:
            horizon = await self._db.next_xact_id()
        except DatabaseError as exc:
            logger.debug("taking a transaction id failed (%s); still draining", describe(exc))
            return
        self._pace(lambda pacer: pacer.horizon(horizon))

    def _pace(self, update: Callable[[Pacer], None]) -> None:
        """
        Apply ``update`` to the pacer and log a change of mode.
        """
        before = self._pacer.mode
        update(self._pacer)
        if self._pacer.mode is not before:
            logger.debug("wake-ups: %s -> %s", before, self._pacer.mode)

    def _requeue(self, requests: list[_Join]) -> None:
        self._pending[:0] = [r for r in requests if not r.admitted.done()]

    async def _read_new(self, count_users: list[str]) -> dict[str, ByType] | None:
        """
        Read and route everything committed since the watermark, then
        advance it. Returns the unread counts (by category) of ``count_users`` as of the new
        watermark, or None when there are none for them: this call finished
        a window that an earlier, failed call had started, or its first page
        was asked for before they came.
        """
        base = self.watermark
        assert base is not None  # run() takes the first snapshot before reading
        router = self._router
        counts: dict[str, ByType] | None = None
        last: Window | None = None
        lease: Lease | None = None
        # Distinct writing transactions of the window, for the pacer's rate.
        transactions: set[int] = set()
        swept_to = self._swept_to
        reading = self._reader.pages(base, count_users, swept_to)
        async with contextlib.aclosing(reading) as pages:
            async for window in pages:
                self.stats.rows_read += len(window.rows)
                transactions.update(row["xact_id"] for row in window.rows)
                transactions.update(event.xact_id for event in window.events)
                if window.lease is not None:
                    lease = window.lease
                if self._account is None:
                    # The first page of a new window.
                    self._opened = (window.clock, window.next_expiry, time.monotonic())
                    if window.complete:
                        self._maybe_prefetch(window.end, _later(swept_to, window.clock))
                    self._account = router.open_window(window)
                    if not (self._reader.first_prefetched and count_users):
                        counts = window.counts
                router.route(window, base, self._account)
                self._remember(base, window)
                last = window
        assert last is not None and self._account is not None  # pages() yields at least one
        self.stats.window_reads += 1
        assert self._opened is not None  # set with the account
        account, self._account = self._account, None
        (clock, next_expiry, read_at), self._opened = self._opened, None
        router.repairing = False
        self.watermark = last.end
        self._swept_to = _later(swept_to, clock)
        self._expiry_due = _due(clock, next_expiry, read_at)
        router.settle(account, base, last.end)
        if self._notifications:
            # Those that came while the window was routed, pushed now from
            # its end.
            self._take_notifications()
        if lease is not None:
            # The lease and last.end come from the same statement (a
            # window's pages all share its first page's end snapshot).
            seen, end = lease, last.end
            self._pace(lambda pacer: pacer.observed(time.monotonic(), seen, end, len(transactions)))
        return counts

    def _remember(self, base: Snapshot, window: Window) -> None:
        """
        Note a routed page's rows and events by transaction, for the repair
        after a failover.
        """
        prints = [(row["xact_id"], fingerprint(row["id"], row["seq"])) for row in window.rows]
        prints += [
            (event.xact_id, event_fingerprint(event.user, event.kind, event.ids, event.type))
            for event in window.events
        ]
        self._recall.note(time.monotonic(), base, window.end, prints)

    async def _repair_history(self) -> None:
        """
        The database's history changed since the last window (a standby
        promoted): repair what that may hide, then let the pools connect to
        it. A failure raises, and the next round tries again.
        """
        lineage = self._db.lineage
        change = lineage.describe()
        if self.watermark is None:
            lineage.accept()
            return
        if lineage.another_cluster:
            # Not a failover: nothing of the old cluster's ids means anything
            # here, and its rows are not notifyd's to move.
            lineage.accept()
            self.watermark = None
            self._recall = Recall()
            self.stats.history_repairs += 1
            logger.error(
                "the database is another cluster now (%s): delivery starts again from "
                "what it holds now; clients' cursors from before do not apply there, so "
                "clients should start again without them",
                change,
            )
            return
        started = time.monotonic()
        # What clients were pushed ahead counts as read: its ids must not be
        # reused unseen either.
        repaired = await failover.repair(
            self._db, self._recall, self._router.claimed(self.watermark)
        )
        took_ms = 1000 * (time.monotonic() - started)
        lineage.accept()
        self.stats.history_repairs += 1
        self.stats.restamped += repaired.moved
        if repaired.behind:
            # The next read moves the watermark onto the new history, so only
            # what was committed before it under ids the old snapshots call
            # finished is passed over (and by old cursors, anything).
            logger.error(
                "the database's history changed (%s) and its next transaction id is %d "
                "below the snapshots read before: not the history notifyd was reading "
                "(a restore from an older backup?); rows committed there before now may "
                "not be pushed, and clients should start again without their cursors",
                change,
                repaired.behind,
            )
            return
        logger.log(
            logging.WARNING if repaired.reused else logging.INFO,
            "the database's history changed (%s): %d transaction ids taken to pass every "
            "earlier snapshot; %d transactions found under ids the old primary had used "
            "and lost, their %d rows and events moved to a fresh id; %d recognised; "
            "repaired in %.0f ms",
            change,
            repaired.advanced,
            repaired.reused,
            repaired.moved,
            repaired.recognised,
            took_ms,
        )
        if repaired.still_open:
            logger.warning(
                "%d transactions under reused ids were still open after %.0fs: their rows "
                "are pushed, but a client resuming from a cursor made before the failover "
                "may miss them",
                repaired.still_open,
                failover.OPEN_WAIT_S,
            )
        if repaired.past_memory:
            logger.warning(
                "none of the transactions delivery routed %.0fs before the failover survived "
                "it: rows committed under ids reused from before then may not be pushed",
                self._recall.span_s,
            )

    def _maybe_prefetch(self, end: Snapshot, swept_to: datetime | None) -> None:
        """
        Under load, ask for the next window (from ``end``) before routing
        this one, so the query's round trip overlaps the routing and the
        writes instead of adding to them.

        Only when more commits were announced, no session is waiting to
        join (a prefetched window has no unread counts for them) and the
        listener is up; at most one read starts per ``min_interval``.
        """
        now = time.monotonic()
        # While a lease is in force no NOTIFY announces commits: the next
        # poll being due counts as the announcement.
        interval = self._pacer.next_read_in()
        poll_due = (
            self._pacer.mode is Mode.POLLING
            and interval is not None
            and now - self._last_read >= interval
        )
        if (
            not (self._wakeup.is_set() or poll_due)
            or not self.listening
            or self._pending
            or now - self._last_read < self._min_interval
            or (self._pacer.mode is not Mode.POLLING and self._budget.wait(now) > 0)
        ):
            return
        self._reading()
        self._last_read = now
        self._budget.spend(now)
        self._reader.prefetch(end, swept_to)

    async def _admit_all(self, requests: list[_Join], counts: dict[str, ByType]) -> None:
        end = self.watermark
        assert end is not None  # set by the read that produced ``counts``
        resumes: list[tuple[_Join, Cursor]] = []
        for request in requests:
            user = request.session.user
            unread = counts.get(user, {})
            if request.since is None:
                self._admit(request, replay.plan_fresh(user, end, unread), unread)
                continue
            try:
                cursor = replay.usable_cursor(request.since, end)
            except CursorError as exc:
                logger.debug("session %s: unusable cursor (%s)", request.session.id, exc)
                self._admit(request, replay.plan_unusable(user, end, unread), unread)
                continue
            resumes.append((request, cursor))
        for start in range(0, len(resumes), _CATCH_UP_BATCH):
            chunk = resumes[start : start + _CATCH_UP_BATCH]
            # Rows a cursor claims ahead are read too, then left out.
            claimed = CARRIED_ROWS_MAX * max(len(cursor.ahead) for _, cursor in chunk)
            results = await self._db.catch_up(
                [(request.session.user, cursor) for request, cursor in chunk],
                end,
                limit=self._replay_limit + 1 + claimed,
                clock=self._swept_to,
            )
            for (request, cursor), rows in zip(chunk, results, strict=True):
                user = request.session.user
                unread = counts.get(user, {})
                greeting = replay.plan_resume(
                    user, cursor, rows, end, unread, replay_limit=self._replay_limit
                )
                self._admit(request, greeting, unread)

    def _admit(self, request: _Join, greeting: replay.Greeting, unread: ByType) -> None:
        if greeting.resync:
            self.stats.resyncs += 1
        self._router.register(request.session, greeting, unread)
        if not request.admitted.done():
            request.admitted.set_result(None)


def _later(swept_to: datetime | None, clock: datetime | None) -> datetime | None:
    """
    The sweep time after a window read at ``clock``: it never moves back,
    should the database's clock step back.
    """
    if swept_to is None or clock is None:
        return clock if swept_to is None else swept_to
    return max(swept_to, clock)


def _due(clock: datetime | None, next_expiry: datetime | None, read_at: float) -> float | None:
    """
    When (``time.monotonic()``) the next known expiry comes: its distance
    from the read's database clock, from when the read was made here, so
    that the two hosts' clocks never need to agree.
    """
    if clock is None or next_expiry is None:
        return None
    return read_at + (next_expiry - clock).total_seconds() + _EXPIRY_MARGIN_S
