"""
Pushing rows ahead of their window: the first delivery of a small insert
straight from its NOTIFY's payload, without a query.

The insert trigger (``schema.sql``) carries the rows of a transaction's first
inserting statement in its NOTIFY, as ``r<xact>:<json>``, when there are at
most a few and they fit; otherwise, and for every later inserting statement
of that transaction, it sends ``m<xact>``. So the rows a payload carries are
always all the rows that transaction had inserted up to then (in the order
the statement inserted them; :func:`parse_payload` puts them in ``seq``
order). Postgres delivers a transaction's notifications only once it has
committed, all together, in the order they were sent.

A row pushed ahead reaches the sessions of its user at once, with a cursor
that claims it (``Cursor.ahead``: the rows of transaction ``xact`` up to
``seq``); the window reads stay the source of truth: they skip, for each
session, the rows its claims cover, carry its claims in the cursors of what
they do send, and deliver everything else as before. A claim is only ever
made for rows a session has: a session is pushed a transaction's row only if
it was pushed every earlier row of that transaction to its user
(:meth:`AheadLog.may_push`), and a transaction that had a row not pushed
ahead (an announcement, a row with an expiry, one that came while a window
was being routed) pushes nothing more ahead (:meth:`AheadLog.block`).

What the payload says is what the row was when its statement ended. A later
statement of the same transaction that deletes the row, marks it read or
moves its expiry is written to ``t_message_event`` by the triggers and
reaches the sessions in the next window, as the same change committed a
moment later would.

Everything here is pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import orjson

__all__ = ["CARRIED_ROWS_MAX", "AheadLog", "Carried", "parse_payload"]

# The most rows one payload carries (the trigger's limit in schema.sql): a
# claim on a transaction covers at most this many of a user's rows.
CARRIED_ROWS_MAX = 8

# The payload's columns, in the trigger's order (json_build_array).
_COLUMNS = (
    "id",
    "title",
    "send_user",
    "to_user",
    "type",
    "content",
    "send_time",
    "skip_url",
    "is_read",
    "seq",
    "expire_at",
)


@dataclass(frozen=True, slots=True)
class Carried:
    """
    What a notification says of one transaction: ``rows`` it carries (as
    the window read would return them, ``xact_id`` included), or None when
    that transaction inserted rows it does not carry (``m<xact>``), or a
    payload that cannot be read.
    """

    xact: int
    rows: list[dict[str, Any]] | None


def parse_payload(payload: str) -> Carried | None:
    """
    The transaction and rows of a trigger's notification (``r<xact>:<json>``,
    ``m<xact>``, and ``e<xact>`` for read/delete events, which carry no
    rows); None for any other notification (a probe, a poll, the constant
    ``m`` and ``e`` of an older schema).
    """
    kind = payload[:1]
    if kind in ("m", "e"):
        # Rows not carried, or read/delete events: they come with a window.
        xact = _xact(payload[1:])
        return None if xact is None else Carried(xact, None)
    if kind != "r":
        return None
    head, colon, body = payload[1:].partition(":")
    xact = _xact(head)
    if xact is None or not colon:
        return None
    try:
        rows = [_row(values, xact) for values in orjson.loads(body)]
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return Carried(xact, None)
    # The trigger sends them in the order its statement inserted them.
    rows.sort(key=itemgetter("seq"))
    return Carried(xact, rows)


def _xact(text: str) -> int | None:
    if not text.isdigit() or not text.isascii() or len(text) > 20:
        return None
    return int(text)


def _row(values: list[Any], xact: int) -> dict[str, Any]:
    if len(values) != len(_COLUMNS):
        raise ValueError("a carried row of the wrong shape")
    row = dict(zip(_COLUMNS, values, strict=True))
    if not isinstance(row["to_user"], str) or not isinstance(row["seq"], int):
        raise ValueError("a carried row without its user or seq")
    row["send_time"] = _timestamp(row["send_time"])
    row["expire_at"] = _timestamp(row["expire_at"])
    row["xact_id"] = xact
    return row


def _timestamp(value: Any) -> datetime | None:
    """
    A timestamp as asyncpg reads it: a ``timestamptz`` in UTC, a
    ``timestamp`` without a zone as it is.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("a carried timestamp that is not text")
    # Raises ValueError on 'infinity' and the like: the window reads those.
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is None else moment.astimezone(UTC)


class AheadLog:
    """
    What was pushed ahead since the last window, by transaction: which rows
    each user's sessions were pushed, which transactions push nothing more
    ahead, and the unread rows pushed ahead that no window has counted yet.

    Sessions keep their own claims (``{xact: seq}``); this log only keeps
    what decides whether a session may be pushed the next row.
    """

    __slots__ = ("_adds", "_blocked", "_held", "_last", "_unread")

    def __init__(self) -> None:
        # Set by a lease's announcement: transactions may commit without a
        # NOTIFY from then on, so nothing is pushed ahead of them until a
        # window has been read.
        self._held = False
        # (xact, user) -> seq of the last carried row of theirs.
        self._last: dict[tuple[int, str], int] = {}
        self._blocked: set[int] = set()
        # seq -> (xact, user, category) of an unread row pushed ahead.
        self._unread: dict[int, tuple[int, str, str]] = {}
        # user -> category -> those rows, counted.
        self._adds: dict[str, dict[str, int]] = {}

    def __bool__(self) -> bool:
        return bool(self._last or self._blocked)

    @property
    def counting(self) -> bool:
        """
        Whether unread rows pushed ahead await a window.
        """
        return bool(self._unread)

    def block(self, xact: int) -> None:
        """
        Push nothing more of ``xact`` ahead: one of its rows was not.
        """
        self._blocked.add(xact)

    def blocked(self, xact: int) -> bool:
        """
        Whether rows of ``xact`` may no longer be pushed ahead.
        """
        return xact in self._blocked

    def hold(self) -> None:
        """
        Push nothing ahead until the next window: commits may be coming
        that sent no NOTIFY.
        """
        self._held = True

    @property
    def holding_back(self) -> bool:
        """
        Whether a row committed earlier may still wait for its window: then
        nothing is pushed ahead, since it would overtake that row.
        """
        return self._held or bool(self._blocked)

    def carried_xacts(self) -> set[int]:
        """
        The transactions whose carried rows were taken since the last
        window (pushed ahead, or noted for users with no session here).
        """
        return {xact for xact, _ in self._last}

    def may_push(self, xact: int, user: str, claim: int | None) -> bool:
        """
        Whether a session of ``user`` holding ``claim`` (its claim on
        ``xact``, None for none) may be pushed the next carried row of
        ``xact`` to that user: only if it has every earlier one, so that its
        claim stays true.
        """
        last = self._last.get((xact, user))
        return claim is None if last is None else claim == last

    def carried(self, xact: int, user: str, seq: int, unread: str | None) -> None:
        """
        Note a carried row of ``xact`` to ``user``, pushed to the sessions
        that :meth:`may_push` allowed; ``unread`` is its category when it is
        an unread row that went to at least one session (it then counts in
        :meth:`adds` until a window routes it), None otherwise.
        """
        self._last[(xact, user)] = seq
        if unread is not None:
            self._unread[seq] = (xact, user, unread)
            by_type = self._adds.setdefault(user, {})
            by_type[unread] = by_type.get(unread, 0) + 1

    def adds(self, user: str) -> dict[str, int] | None:
        """
        ``user``'s unread rows pushed ahead that no window has counted yet,
        by category (None: none).
        """
        return self._adds.get(user)

    def routed(self, seq: int) -> None:
        """
        A window routed the row ``seq``: the window counts it from now on.
        """
        entry = self._unread.pop(seq, None)
        if entry is not None:
            self._uncount(entry[1], entry[2])

    def forget(self, visible: Callable[[int], bool]) -> None:
        """
        Drop what concerns the transactions a new watermark sees (``visible``
        says which): the window routed everything of theirs that exists.
        """
        self._held = False
        self._last = {key: seq for key, seq in self._last.items() if not visible(key[0])}
        self._blocked = {xact for xact in self._blocked if not visible(xact)}
        for seq, (xact, user, category) in list(self._unread.items()):
            if visible(xact):
                # Routed by no window: the transaction deleted it before it
                # committed (its deletion event recounts the user).
                del self._unread[seq]
                self._uncount(user, category)

    def _uncount(self, user: str, category: str) -> None:
        by_type = self._adds[user]
        by_type[category] -= 1
        if not by_type[category]:
            del by_type[category]
            if not by_type:
                del self._adds[user]
