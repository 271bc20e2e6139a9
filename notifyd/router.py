"""
Routing: committed rows and read/delete events to the sessions of their
users, and the unread counts they move.

The router is the one owner of who is registered (the :class:`Hub`) and of
their unread counts (the :class:`UnreadLedger`): a session is registered
here when delivery admits it, with its greeting queued first, and
unregistered here when it ends. Nothing here awaits: a window's rows are
queued for every session, then each session's frames are written in one
system call (:meth:`WindowAccount.flush`).

A session that opted in (``?counts=inline``) gets the unread counts a
window's new messages leave on the last of those messages' frames, instead
of a separate ``unread`` event: one frame per message. That is done only
where those counts are the ones the ``unread`` event would carry and the
frame cannot be dropped or overtaken: the user's counts only grew by the
window's own rows (no read, delete or unread-again event of theirs, no
announcement, no recount), the frame is the user's last in the window and
goes straight to the socket (not into a slow session's outbox, whose
overflow would drop it for a ``resync``), and the ledger settles to the
same counts. Otherwise the ``unread`` event is sent as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import orjson

from . import protocol
from .ahead import AheadLog
from .cursor import MAX_CLAIMS, Cursor, Snapshot, WindowCursors, claims_token
from .db import Event, Row, Window
from .hub import Hub
from .ledger import ByType, UnreadLedger
from .protocol import CloseCode, MessageRow
from .replay import Greeting
from .session import Session
from .stats import Stats

__all__ = ["Router", "WindowAccount"]


@dataclass(eq=False)
class WindowAccount:
    """
    What one window (all its pages) does to unread counts, and the sessions
    with frames waiting for the window's last write.

    ``recounted`` are exact counts taken at the window's end snapshot (users
    with read/delete events, and joining users); for everyone else the
    window's new rows are added to the count they had.
    """

    recounted: dict[str, ByType]
    events: list[Event]
    # user -> category -> the window's new unread rows.
    new_unread: dict[str, dict[str, int]] = field(default_factory=dict)
    # The category of each announcement the window inserted.
    new_announcements: list[str] = field(default_factory=list)
    unflushed: set[Session] = field(default_factory=set)
    # Users whose counts the window's events move (recounted, or everyone's
    # after an announcement's event): their counts never travel inline.
    moved_by_events: set[str] = field(default_factory=set)
    everyone_moved: bool = False
    # user -> the counts their last message carried, and the sessions it
    # carried them to (which then get no unread event for them).
    inlined: dict[str, tuple[ByType, list[Session]]] = field(default_factory=dict)

    def flush(self) -> None:
        """
        One write per session for what a page (or the settling) queued.
        """
        for session in self.unflushed:
            session.flush()
        self.unflushed.clear()


class Router:
    """
    Queues rows, events and counts for the sessions they concern.
    """

    def __init__(
        self,
        hub: Hub[Session],
        stats: Stats,
        on_routed: Callable[[list[Row], list[bool]], None] | None = None,
    ) -> None:
        """
        ``on_routed`` (the sinks) gets each routed page of rows and, per
        row, whether it reached a live session here; it must not block.
        """
        self._hub = hub
        self.unread = UnreadLedger()
        self._stats = stats
        self._on_routed = on_routed
        # Set while the first read after a LISTEN outage is routed.
        self.repairing = False
        # Rows pushed ahead of their window (notifyd.ahead): what decides the
        # next push, the sessions holding claims, and per user the counts
        # the last row pushed ahead carried, the sessions it carried them to
        # and its transaction, until the window that routes it has settled.
        self.ahead = AheadLog()
        self._claimants: set[Session] = set()
        self._carried: dict[str, tuple[ByType, list[Session], int]] = {}

    def register(self, session: Session, greeting: Greeting, unread: Mapping[str, int]) -> None:
        """
        Queue the session's hello and replay, write them, and register it
        for live rows with its unread count. A session that closed while
        waiting to join is left out. The user's oldest sessions beyond the
        per-user limit are closed with 4409 (replaced).
        """
        if session.closing:
            return
        session.push(greeting.hello, flush=False)
        for frame, cursor in greeting.replay:
            session.push(frame, cursor, flush=False)
        session.flush()
        if greeting.claims:
            session.ahead = dict(greeting.claims)
            self._claimants.add(session)
        for evicted in self._hub.add(session):
            self._stats.limit_trips["sessions_per_user"] += 1
            evicted.close(CloseCode.REPLACED)
        self.unread.set(session.user, unread)

    def unregister(self, session: Session) -> None:
        """
        A session ended; idempotent. The user's count is forgotten with
        their last session.
        """
        self._claimants.discard(session)
        if self._hub.discard(session):
            self.unread.forget(session.user)

    def push_ahead(self, xact: int, rows: Sequence[MessageRow], base: Snapshot) -> bool:
        """
        Push the rows a NOTIFY carried for transaction ``xact`` to the
        sessions of their users now, ahead of the window that will read
        them; ``base`` is the watermark, up to which every registered
        session has been routed everything. Must not be called while a
        window is being routed. See :mod:`notifyd.ahead`.

        Returns whether every row reached every session of its user, so
        that its window only has to confirm them.
        """
        log = self.ahead
        if base.visible(xact):
            # Its window came first: nothing of it is pushed ahead.
            return True
        everywhere = True
        hub = self._hub
        stats = self._stats
        observe = stats.latency.observe
        now = time.time()
        for row in rows:
            if log.blocked(xact):
                return False
            user = row["to_user"]
            seq = row["seq"]
            if user == "*" or row["expire_at"] is not None:
                # Announcements and expiring rows wait for their window, and
                # the rest of the transaction with them.
                log.block(xact)
                return False
            sessions = hub.sessions_of(user) or ()
            targets = [
                session
                for session in sessions
                if not session.closing
                and log.may_push(xact, user, session.ahead.get(xact) if session.ahead else None)
                # A cursor holds at most MAX_CLAIMS: past that, the window.
                and (not session.ahead or len(session.ahead) < MAX_CLAIMS or xact in session.ahead)
            ]
            everywhere = everywhere and len(targets) == len(sessions)
            unread = (row["type"] or "") if targets and row["is_read"] == "0" else None
            log.carried(xact, user, seq, unread)
            if not targets:
                continue
            self._push_ahead_to(targets, row, xact, base)
            stats.delivered += len(targets)
            stats.pushed_ahead += 1
            sent_at = row["send_time"]
            if sent_at is not None and sent_at.tzinfo is not None:
                observe(now - sent_at.timestamp())
        return everywhere

    def _push_ahead_to(
        self, targets: list[Session], row: MessageRow, xact: int, base: Snapshot
    ) -> None:
        """
        Send a row pushed ahead to ``targets``, with the user's counts after
        it: on the message frame for sessions that asked for that
        (``?counts=inline``), in an ``unread`` event right after it for the
        others, as a window's round would. The next window then sends no
        counts to any of them unless its own differ.
        """
        user = row["to_user"]
        seq = row["seq"]
        counts = self.unread.after_adding(user, self.ahead.adds(user) or {})
        unread_event: tuple[bytes, bytes] | None = None
        if counts is not None:
            encoded = protocol.encode_unread(counts).encode()
            unread_event = (encoded, protocol.text_frame(encoded))
        # Sessions of one user nearly always hold the same claims: the frame
        # is encoded once per set of claims.
        frames: dict[
            tuple[tuple[int, int], ...], tuple[bytes, bytes, str, tuple[bytes, bytes] | None]
        ] = {}
        shown: list[Session] = []
        for session in targets:
            claims = dict(session.ahead) if session.ahead else {}
            claims[xact] = seq
            key = tuple(sorted(claims.items()))
            frame = frames.get(key)
            if frame is None:
                cursor = Cursor(base, ahead=key).encode(at_seq=seq)
                fields = protocol.message_frame(row, cursor)
                if fields["skipUrl"] is None and row["skip_url"] is not None:
                    self._stats.unsafe_skip_urls += 1
                payload = orjson.dumps(fields)
                with_counts = None
                if counts is not None:
                    encoded = protocol.with_counts(payload, counts)
                    with_counts = (encoded, protocol.text_frame(encoded))
                frame = frames[key] = (payload, protocol.text_frame(payload), cursor, with_counts)
            payload, wire, cursor, with_counts = frame
            if (
                session.inline_counts
                and with_counts is not None
                and session.push_direct(*with_counts)
            ):
                self._stats.inline_counts += 1
            else:
                session.push_encoded(payload, wire, cursor)
                if unread_event is not None:
                    session.push_encoded(*unread_event)
            session.flush()
            if not session.closing:
                if session.ahead is None:
                    session.ahead = {}
                    self._claimants.add(session)
                session.ahead[xact] = seq
                shown.append(session)
        if counts is not None and shown:
            self._carried[user] = (counts, shown, xact)
        else:
            self._carried.pop(user, None)

    def open_window(self, window: Window) -> WindowAccount:
        """
        The account of a window whose first page is ``window``.
        """
        account = WindowAccount(window.counts, window.events)
        if window.events or window.counts:
            account.moved_by_events = {*window.counts, *(event.user for event in window.events)}
            account.everyone_moved = "*" in account.moved_by_events
        return account

    def route(self, window: Window, base: Snapshot, account: WindowAccount) -> None:
        """
        Queue a page's rows for their users' sessions, in seq order, and
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
        # Whether a user's last row in the window (only the last page has
        # one) may carry their counts: not when an announcement's event
        # moves everyone's, nor after an announcement row (checked per row).
        inline = not account.everyone_moved
        moved_by_events = account.moved_by_events
        new_announcements = account.new_announcements
        cursors = WindowCursors(base, window.end)
        stats = self._stats
        observe = stats.latency.observe
        new_unread = account.new_unread
        unflushed = account.unflushed.add
        message_frame, text_frame, dumps = protocol.message_frame, protocol.text_frame, orjson.dumps
        now = time.time()
        online: list[bool] | None = [] if self._on_routed is not None else None
        delivered = routed = 0
        claimants = self._claimants
        routed_ahead = self.ahead.routed if self.ahead.counting else None
        # For sessions holding claims, a user's last row in the window that
        # they are actually sent (the rows after it they have already).
        last_sent = self._last_sent(rows) if claimants and window.complete else {}
        for row in rows:
            user = row["to_user"]
            seq = row["seq"]
            if routed_ahead is not None:
                routed_ahead(seq)
            if user == "*":
                sessions: list[Session] = list(hub)
                new_announcements.append(row["type"] or "")
                is_last = seq == final_seq
            else:
                own = hub.sessions_of(user)
                if not own:
                    if online is not None:
                        online.append(False)
                    continue
                sessions = own
                if row["is_read"] == "0":
                    added = new_unread.get(user)
                    if added is None:
                        added = new_unread[user] = {}
                    category = row["type"] or ""
                    added[category] = added.get(category, 0) + 1
                is_last = last_seq.get(user) == seq and seq > star_seq
            counts_inline = (
                is_last and inline and not new_announcements and user not in moved_by_events
            )
            if claimants:
                last_for_them = (
                    is_last if user == "*" else last_sent.get(user) == seq and seq > star_seq
                )
                sessions, reached = self._route_to_claimants(
                    row,
                    sessions,
                    cursors,
                    last_for_them,
                    last_for_them
                    and inline
                    and not new_announcements
                    and user not in moved_by_events,
                    account,
                )
                delivered += reached
                if not sessions:
                    # Every session had it, pushed ahead, or got it above.
                    if online is not None:
                        online.append(True)
                    continue
            cursor = cursors.at_end(seq) if is_last else cursors.within(seq)
            fields = message_frame(row, cursor)
            if fields["skipUrl"] is None and row["skip_url"] is not None:
                stats.unsafe_skip_urls += 1
            sent_at = row["send_time"]
            if sent_at.tzinfo is not None:
                observe(now - sent_at.timestamp())
            routed += 1
            # Encoded and framed once, whatever the number of sessions.
            payload = dumps(fields)
            wire = text_frame(payload)
            count = 0
            if counts_inline:
                plain = self._push_with_counts(user, sessions, payload, account)
                count = len(sessions) - len(plain)
                sessions = plain
            for session in sessions:
                if session.push_encoded(payload, wire, cursor):
                    unflushed(session)
                count += 1
            delivered += count
            if online is not None:
                online.append(count > 0)
        stats.delivered += delivered
        if self.repairing:
            stats.repair_rows += routed
        if not window.complete:
            # Later pages follow; the last one is flushed with the window's
            # events and unread counts, in one write per session.
            account.flush()
        if online is not None and self._on_routed is not None:
            self._on_routed(rows, online)

    def _last_sent(self, rows: Sequence[Row]) -> dict[str, int]:
        """
        Per user, the seq of their last row in a window that some session
        of theirs does not already have (pushed ahead).
        """
        last: dict[str, int] = {}
        sessions_of = self._hub.sessions_of
        for row in rows:
            user = row["to_user"]
            for session in sessions_of(user) or ():
                claims = session.ahead
                claim = claims.get(row["xact_id"]) if claims else None
                if claim is None or row["seq"] > claim:
                    last[user] = row["seq"]
                    break
        return last

    def _route_to_claimants(
        self,
        row: Row,
        sessions: list[Session],
        cursors: WindowCursors,
        is_last: bool,
        counts_inline: bool,
        account: WindowAccount,
    ) -> tuple[list[Session], int]:
        """
        Route a row to the sessions holding claims on rows pushed ahead:
        not at all where a claim covers it, otherwise with the claims in
        its cursor (and the user's counts where :meth:`route` would put
        them). Returns the sessions without claims, still to be sent the
        row, and how many were sent it here.
        """
        xact = row["xact_id"]
        seq = row["seq"]
        rest: list[Session] = []
        # Sessions of one user nearly always hold the same claims.
        by_claims: dict[str, list[Session]] = {}
        for session in sessions:
            claims = session.ahead
            if not claims:
                rest.append(session)
                continue
            claim = claims.get(xact)
            if claim is None or seq > claim:
                by_claims.setdefault(claims_token(claims), []).append(session)
        unflushed = account.unflushed.add
        sent = 0
        for token, group in by_claims.items():
            cursor = cursors.at_end(seq, token) if is_last else cursors.within(seq, token)
            payload = orjson.dumps(protocol.message_frame(row, cursor))
            plain = group
            if counts_inline:
                plain = self._push_with_counts(row["to_user"], group, payload, account)
            wire = protocol.text_frame(payload)
            for session in plain:
                if session.push_encoded(payload, wire, cursor):
                    unflushed(session)
            sent += len(group)
        return rest, sent

    def _with_counts_shown_ahead(
        self, changed: list[tuple[str, ByType]]
    ) -> list[tuple[str, ByType]]:
        """
        ``changed`` and the users whose sessions were shown counts by a row
        pushed ahead that are not theirs any more, though the ledger did not
        move: the window that routed the row also recounted them (a read of
        it in the same round), from where the ledger stood before the row.
        """
        moved = {user for user, _ in changed}
        extra = []
        for user, (shown, _, _) in list(self._carried.items()):
            if user in moved:
                continue
            settled = self.unread.get(user)
            pending = self.ahead.adds(user)
            if settled is None or (_plus(settled, pending) if pending else settled) != shown:
                del self._carried[user]
                if settled is not None:
                    extra.append((user, dict(settled)))
        return [*changed, *extra] if extra else changed

    def claimed(self, watermark: Snapshot) -> Snapshot:
        """
        ``watermark`` with every transaction that rows were pushed ahead
        from, or that a session claims, visible too: what the clients of
        this instance may take for routed, for the repair after a failover.
        """
        xacts = self.ahead.carried_xacts()
        for session in self._claimants:
            xacts.update(session.ahead or ())
        if not xacts:
            return watermark
        return watermark.with_visible(xacts) or watermark

    def _forget_ahead(self, end: Snapshot) -> None:
        """
        A window up to ``end`` routed the transactions it sees whole: claims
        on them are no longer needed, nor what decided their pushes ahead.
        """
        visible = end.visible
        self.ahead.forget(visible)
        for session in list(self._claimants):
            claims = session.ahead or {}
            left = {xact: seq for xact, seq in claims.items() if not visible(xact)}
            if left:
                session.ahead = left
            else:
                session.ahead = None
                self._claimants.discard(session)

    def _push_with_counts(
        self, user: str, sessions: list[Session], payload: bytes, account: WindowAccount
    ) -> list[Session]:
        """
        Send the user's last message of the window, with the counts it
        leaves, to their sessions that asked for that and take it straight
        away; returns the sessions still to be sent the plain frame.
        """
        adds = account.new_unread.get(user)
        if not adds:
            return sessions
        for session in sessions:
            if session.inline_counts:
                break
        else:
            return sessions
        pending = self.ahead.adds(user)
        if pending:
            # Rows pushed ahead that a later window counts are already shown.
            adds = _plus(adds, pending)
        counts = self.unread.after_adding(user, adds)
        if counts is None:
            return sessions
        encoded = protocol.with_counts(payload, counts)
        wire = protocol.text_frame(encoded)
        carried: list[Session] = []
        plain: list[Session] = []
        unflushed = account.unflushed.add
        for session in sessions:
            if session.inline_counts and session.push_direct(encoded, wire):
                unflushed(session)
                carried.append(session)
            else:
                plain.append(session)
        if carried:
            earlier = account.inlined.get(user)
            if earlier is not None and earlier[0] == counts:
                # Another part of the user's sessions, sent the same counts.
                carried = earlier[1] + carried
            account.inlined[user] = (counts, carried)
            self._stats.inline_counts += len(carried)
        return plain

    def settle(self, account: WindowAccount, base: Snapshot, end: Snapshot) -> None:
        """
        After a whole window from ``base`` to ``end``: push its read/delete
        events, then every unread count it changed, and write each
        session's frames.
        """
        if self.ahead or self._claimants:
            self._forget_ahead(end)
        hub = self._hub
        for event in account.events:
            if event.kind == "deleted":
                frame = protocol.encode_deleted(event.ids or [])
            else:
                frame = protocol.encode_read(event.ids, event.type, read=event.kind == "read")
            payload = frame.encode()
            wire = protocol.text_frame(payload)
            targets: Sequence[Session] = (
                list(hub) if event.user == "*" else hub.sessions_of(event.user) or ()
            )
            for session in targets:
                if session.push_encoded(payload, wire):
                    account.unflushed.add(session)
        # Announcements deleted in this window that had been counted before it.
        counted_deletes = [
            (event.type or "", set(event.readers or ()))
            for event in account.events
            if event.user == "*"
            and event.kind == "deleted"
            and event.inserted is not None
            and base.visible(event.inserted)
        ]
        changed = self.unread.settle(
            recounted=account.recounted,
            new_unread=account.new_unread,
            announcements=account.new_announcements,
            deleted_announcements=counted_deletes,
        )
        if self._carried:
            changed = self._with_counts_shown_ahead(changed)
        # After an announcement every user's counts change and many share
        # them: each distinct set of counts is then encoded and framed once.
        # Otherwise the users whose counts changed rarely share them.
        frames: dict[tuple[tuple[str, int], ...], tuple[bytes, bytes]] | None = (
            {} if account.new_announcements or counted_deletes else None
        )
        unflushed = account.unflushed.add
        sessions_of = hub.sessions_of
        inlined = account.inlined
        pushed_ahead = self._carried
        pending_adds = self.ahead.adds
        for user, by_type in changed:
            targets = sessions_of(user) or ()
            pending = pending_adds(user)
            if pending:
                # Rows pushed ahead past this window's end: the client was
                # shown their counts already, and keeps them.
                by_type = _plus(by_type, pending)
            carried = inlined.get(user) if inlined else None
            if pushed_ahead:
                # What the user's last row pushed ahead carried stays what
                # its sessions show until other counts are sent them.
                ahead = pushed_ahead.get(user)
                if carried is None and ahead is not None and ahead[0] == by_type:
                    carried = ahead[:2]
                else:
                    pushed_ahead.pop(user, None)
            if carried is not None:
                if carried[0] == by_type:
                    # Their last message carried these counts already.
                    if len(carried[1]) == len(targets):
                        continue
                    targets = [s for s in targets if s not in carried[1]]
                else:
                    # Not what the ledger settled to: the event corrects it.
                    self._stats.inline_count_mismatches += 1
            if not targets:
                continue
            encoded = None
            if frames is not None:
                key = tuple(sorted(by_type.items()))
                encoded = frames.get(key)
            if encoded is None:
                payload = protocol.encode_unread(by_type).encode()
                encoded = (payload, protocol.text_frame(payload))
                if frames is not None:
                    frames[key] = encoded
            for session in targets:
                if session.push_encoded(*encoded):
                    unflushed(session)
        if self._carried:
            self._forget_carried(end)
        account.flush()

    def _forget_carried(self, end: Snapshot) -> None:
        """
        The counts of rows pushed ahead that a window up to ``end`` routed
        have been settled: kept longer, every later window would look at
        them again, for every user ever pushed to.
        """
        visible = end.visible
        for user in [user for user, (_, _, xact) in self._carried.items() if visible(xact)]:
            del self._carried[user]

    @property
    def carried_users(self) -> int:
        """
        Users whose last row pushed ahead still waits for the window that
        routes it (for tests: what settling keeps).
        """
        return len(self._carried)


def _plus(counts: Mapping[str, int], adds: Mapping[str, int]) -> dict[str, int]:
    return {
        category: counts.get(category, 0) + adds.get(category, 0) for category in {*counts, *adds}
    }
