"""
What a joining session is sent first: its ``hello`` and its replay.

Pure planning, no I/O: given the client's cursor (if any), the rows it
missed (read by delivery up to its watermark), the watermark and the unread
counts by category, decide the frames and the cursor each carries. Three cases:

* no cursor: ``hello`` at the watermark, nothing to replay;
* a cursor that cannot be used (malformed, or ahead of this database):
  ``hello`` with ``recovered: false`` and a ``resync`` at the watermark;
* a usable cursor: ``hello`` then every missed row in seq order, with
  cursors chosen so that a client cut off anywhere in the replay resumes
  with no gap and no duplicate; more than ``replay_limit`` rows replays the
  newest part and then asks the client to resync from history.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import protocol
from .cursor import Cursor, Snapshot
from .exceptions import CursorError
from .protocol import MessageRow

__all__ = ["Greeting", "plan_fresh", "plan_resume", "plan_unusable", "usable_cursor"]


@dataclass(frozen=True, slots=True)
class Greeting:
    """
    The frames a joining session is sent, in order: ``hello``, then each
    replayed frame with the cursor it leaves the client at. ``resync`` is
    whether the replay ends in a resync (counted in the metrics).
    """

    hello: str
    replay: Sequence[tuple[str, str]] = field(default_factory=tuple)
    resync: bool = False
    # The rows pushed ahead that the client claims beyond ``end``
    # (``{xact: seq}``): later windows skip them for this session.
    claims: Mapping[int, int] = field(default_factory=dict)


def usable_cursor(since: str, end: Snapshot) -> Cursor:
    """
    The client's cursor, decoded; :class:`CursorError` when it is malformed
    or from a future this database has not reached (another database, or
    one restored from a backup).
    """
    cursor = Cursor.decode(since)
    if not end.covers(cursor.end or cursor.base):
        raise CursorError("cursor is ahead of this database")
    return cursor


def plan_fresh(user: str, end: Snapshot, unread: Mapping[str, int]) -> Greeting:
    """
    A session without a cursor: live from ``end`` on.
    """
    return Greeting(protocol.encode_hello(user, Cursor(end).encode(), None, unread))


def plan_unusable(user: str, end: Snapshot, unread: Mapping[str, int]) -> Greeting:
    """
    A session whose cursor cannot be used: it must reload from history.
    """
    position = Cursor(end).encode()
    return Greeting(
        protocol.encode_hello(user, position, False, unread),
        [(protocol.encode_resync(position), position)],
        resync=True,
    )


def plan_resume(
    user: str,
    since: Cursor,
    newest_first: Sequence[MessageRow],
    end: Snapshot,
    unread: Mapping[str, int],
    *,
    replay_limit: int,
) -> Greeting:
    """
    ``hello`` and the replay from ``since`` up to ``end``.

    ``newest_first`` are the user's rows that ``since`` did not cover and
    ``end`` does, newest first (at most ``replay_limit + 1`` are needed).
    Cursors are chosen so that a client cut off anywhere in the replay
    resumes without a gap or a duplicate: first the rest of the batch the
    client was in the middle of (rows ``since.end`` saw), then the rows
    after it, each in seq order.
    """
    # What the client claims of rows pushed ahead of their window is left
    # out, and claimed on in every cursor it is sent, until a window has
    # routed those transactions whole.
    if since.ahead:
        newest_first = [row for row in newest_first if not since.covers(row["xact_id"], row["seq"])]
    since_text = since.encode()
    if len(newest_first) > replay_limit:
        # Too much to replay: the newest part, with no claim of progress,
        # then resync to make the client reload from history.
        kept = list(newest_first[:replay_limit])[::-1]
        replay = [
            (protocol.encode_message(row, f"{since_text}~{row['seq']}"), since_text) for row in kept
        ]
        position = Cursor(end).encode()
        replay.append((protocol.encode_resync(position), position))
        return Greeting(protocol.encode_hello(user, since_text, False, unread), replay, resync=True)
    rows = list(newest_first)[::-1]
    if since.end is not None:
        seen_by = since.end
        rest_of_batch = [row for row in rows if seen_by.visible(row["xact_id"])]
        after = [row for row in rows if not seen_by.visible(row["xact_id"])]
        after_base = since.end
    else:
        rest_of_batch, after, after_base = [], rows, since.base
    claims = since.ahead
    cursors = [Cursor(since.base, since.end, row["seq"], claims) for row in rest_of_batch]
    cursors += [Cursor(after_base, end, row["seq"], claims) for row in after]
    ordered = rest_of_batch + after
    remaining = {xact: seq for xact, seq in claims if not end.visible(xact)}
    last = Cursor(end, ahead=tuple(sorted(remaining.items())))
    if ordered:
        cursors[-1] = last
        hello_cursor = since_text
    else:
        hello_cursor = last.encode()
    frames = []
    for row, cursor in zip(ordered, cursors, strict=True):
        text = cursor.encode(at_seq=row["seq"])
        frames.append((protocol.encode_message(row, text), text))
    return Greeting(
        protocol.encode_hello(user, hello_cursor, True, unread), frames, claims=remaining
    )
