"""
Delivery cursors: what a client has, expressed so Postgres can answer "what
comes after it" exactly.

A :class:`Snapshot` is a ``pg_snapshot`` (``xmin:xmax:xip,...``). A committed
transaction is *visible* in a snapshot when it had committed before the
snapshot was taken. Because every row stores the top-level transaction that
inserted it (``xact_id``), "the rows a snapshot saw" is a precise set, however
the transactions' commits interleave with their ``seq`` values.

A :class:`Cursor` says which of a user's rows a client already has:

* ``Cursor(base)``: every row visible in ``base``;
* ``Cursor(base, end, seq)``: every row visible in ``base``, plus the rows
  visible in ``end`` whose ``seq`` is at most ``seq``. Deliveries walk the rows
  between two snapshots in ``seq`` order, so this is the position of a client
  that stopped in the middle of such a batch.
* either, with ``ahead`` claims ``{xact: seq}``: plus the rows of transaction
  ``xact`` whose ``seq`` is at most ``seq``. Rows pushed from a NOTIFY's
  payload before any window read them (:mod:`notifyd.ahead`) are claimed so.

The encoding is opaque to clients, URL-safe, and versioned by its shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .exceptions import CursorError

__all__ = ["MAX_CLAIMS", "Cursor", "Snapshot", "WindowCursors", "claims_token"]

# xid8 values have at most 20 decimal digits; ASCII digits only.
_N = "[0-9]{1,20}"
_SNAPSHOT_TEXT = re.compile(f"({_N}):({_N}):((?:{_N}(?:,{_N})*)?)")
_SNAPSHOT_TOKEN = re.compile(f"({_N})-({_N})((?:\\.{_N})*)")
_SEQ = re.compile(_N)
_CLAIMS = re.compile(f"a({_N}-{_N}(?:\\.{_N}-{_N})*)")
_MAX_XIP = 10_000
# A client holds claims only for the transactions pushed ahead to it since
# the last window: a handful.
MAX_CLAIMS = 64
# Postgres refuses a pg_snapshot with xid 0 (invalid) or past the xid8 range;
# such a cursor must fail here, not in delivery's query for every session.
_MIN_XID = 1
_MAX_XID = 2**63 - 1
_MAX_CURSOR_CHARS = 200_000


@dataclass(frozen=True, slots=True)
class Snapshot:
    """
    An immutable ``pg_snapshot``.
    """

    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()

    @classmethod
    def from_pg(cls, text: str) -> Snapshot:
        """
        Parse Postgres' text form ``xmin:xmax:xip1,xip2``.

        Raises :class:`CursorError` on anything else.
        """
        match = _SNAPSHOT_TEXT.fullmatch(text)
        if match is None:
            raise CursorError(f"not a pg_snapshot: {text[:80]!r}")
        xip = match.group(3)
        return cls._checked(
            int(match.group(1)),
            int(match.group(2)),
            frozenset(int(x) for x in xip.split(",")) if xip else frozenset(),
        )

    @classmethod
    def _checked(cls, xmin: int, xmax: int, xip: frozenset[int]) -> Snapshot:
        if not _MIN_XID <= xmin <= xmax <= _MAX_XID or len(xip) > _MAX_XIP:
            raise CursorError("inconsistent snapshot")
        if any(not xmin <= x < xmax for x in xip):
            raise CursorError("inconsistent snapshot")
        return cls(xmin, xmax, xip)

    def to_pg(self) -> str:
        """
        Postgres' text form, for ``$n::text::pg_snapshot``.
        """
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, sorted(self.xip)))}"

    def visible(self, xact_id: int) -> bool:
        """
        Whether a committed transaction was visible in this snapshot.

        Mirrors ``pg_visible_in_snapshot``.
        """
        return xact_id < self.xmax and xact_id not in self.xip

    def covers(self, other: Snapshot) -> bool:
        """
        Whether every transaction visible in ``other`` is visible in this one.
        """
        if other.xmax > self.xmax:
            return False
        return all(x in other.xip for x in self.xip if x < other.xmax)

    def with_visible(self, xact_ids: Iterable[int]) -> Snapshot | None:
        """
        This snapshot with the committed transactions ``xact_ids`` visible
        too; None when that would list more ids in progress than a
        snapshot may.
        """
        xip = set(self.xip)
        xmax = self.xmax
        for xact_id in sorted(xact_ids):
            if xact_id >= xmax:
                if len(xip) + xact_id - xmax > _MAX_XIP:
                    return None
                xip.update(range(xmax, xact_id))
                xmax = xact_id + 1
            else:
                xip.discard(xact_id)
        return Snapshot(min(xip, default=xmax), xmax, frozenset(xip))

    def _token(self) -> str:
        return f"{self.xmin}-{self.xmax}" + "".join(f".{x}" for x in sorted(self.xip))

    @classmethod
    def _from_token(cls, token: str) -> Snapshot:
        match = _SNAPSHOT_TOKEN.fullmatch(token)
        if match is None:
            raise CursorError("malformed snapshot")
        xip = match.group(3)
        return cls._checked(
            int(match.group(1)),
            int(match.group(2)),
            frozenset(int(x) for x in xip[1:].split(".")) if xip else frozenset(),
        )


@dataclass(frozen=True, slots=True)
class Cursor:
    """
    A client's position in one user's messages; see the module docstring.
    """

    base: Snapshot
    end: Snapshot | None = None
    seq: int | None = None
    # (xact, seq) pairs, sorted, one per transaction: claims_token()'s form.
    ahead: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if (self.end is None) != (self.seq is None):
            raise ValueError("end and seq go together")

    def covers(self, xact_id: int, seq: int) -> bool:
        """
        Whether a client at this cursor already has the row.
        """
        if self.base.visible(xact_id):
            return True
        if (
            self.end is not None
            and self.seq is not None
            and seq <= self.seq
            and self.end.visible(xact_id)
        ):
            return True
        return any(xact == xact_id and seq <= claimed for xact, claimed in self.ahead)

    def encode(self, at_seq: int | None = None) -> str:
        """
        The opaque, URL-safe text clients store and send back.

        ``at_seq`` is the seq of the message carrying the cursor: appended as
        ``~<seq>`` so the same cursor also serves as ``before`` in history.
        """
        if at_seq is not None:
            return f"{self.encode()}~{at_seq}"
        claims = claims_token(dict(self.ahead)) if self.ahead else ""
        if self.end is None:
            return self.base._token() + claims
        return f"{self.base._token()}_{self.end._token()}_{self.seq}{claims}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """
        Parse what :meth:`encode` produced.

        Raises :class:`CursorError` for anything malformed.
        """
        if not isinstance(text, str) or not text or len(text) > _MAX_CURSOR_CHARS:
            raise CursorError("malformed cursor")
        # A message cursor ends with "~<seq>", its position for history paging.
        text = text.partition("~")[0]
        parts = text.split("_")
        ahead: tuple[tuple[int, int], ...] = ()
        if len(parts) in (2, 4):
            ahead = _decode_claims(parts.pop())
        if len(parts) == 1:
            return cls(Snapshot._from_token(parts[0]), ahead=ahead)
        if len(parts) == 3 and _SEQ.fullmatch(parts[2]):
            base = Snapshot._from_token(parts[0])
            end = Snapshot._from_token(parts[1])
            if not end.covers(base):
                raise CursorError("cursor end precedes its base")
            return cls(base, end, int(parts[2]), ahead)
        raise CursorError("malformed cursor")

    def claims(self) -> dict[int, int]:
        """
        The ``ahead`` claims of transactions this cursor does not otherwise
        cover in full, as ``{xact: seq}``.
        """
        return {xact: seq for xact, seq in self.ahead if not self.base.visible(xact)}


def claims_token(claims: Mapping[int, int]) -> str:
    """
    The ``ahead`` part of a cursor's text, with its separator: what goes
    between a cursor and its ``~<seq>`` when the client holds ``claims``
    (``{xact: seq}``, non-empty).
    """
    return "_a" + ".".join(f"{xact}-{seq}" for xact, seq in sorted(claims.items()))


def _decode_claims(token: str) -> tuple[tuple[int, int], ...]:
    match = _CLAIMS.fullmatch(token)
    if match is None:
        raise CursorError("malformed cursor")
    pairs = [pair.partition("-") for pair in match.group(1).split(".")]
    claims = {int(xact): int(seq) for xact, _, seq in pairs}
    if len(claims) != len(pairs) or len(claims) > MAX_CLAIMS:
        raise CursorError("malformed cursor")
    if any(not _MIN_XID <= xact <= _MAX_XID or seq > _MAX_XID for xact, seq in claims.items()):
        raise CursorError("malformed cursor")
    return tuple(sorted(claims.items()))


class WindowCursors:
    """
    The cursors of messages delivered between two snapshots, encoded fast.

    Equivalent to ``Cursor(base, end, seq).encode(at_seq=seq)`` and
    ``Cursor(end).encode(at_seq=seq)``, with the snapshot tokens built once
    per window instead of once per message.
    """

    __slots__ = ("_end", "_within")

    def __init__(self, base: Snapshot, end: Snapshot) -> None:
        end_token = end._token()
        self._within = f"{base._token()}_{end_token}_"
        self._end = end_token

    def within(self, seq: int, claims: str = "") -> str:
        """
        The cursor of a message in the middle of the window; ``claims`` is
        the client's :func:`claims_token`, if it holds any.
        """
        return f"{self._within}{seq}{claims}~{seq}"

    def at_end(self, seq: int, claims: str = "") -> str:
        """
        The cursor of a user's last message of a complete window.
        """
        return f"{self._end}{claims}~{seq}"
