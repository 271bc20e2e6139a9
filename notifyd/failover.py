"""
The repair after the database's history changed under delivery: a standby
promoted (or a restore) since the last window.

When the promotion lost the old primary's last transactions, the new
primary hands their ids out again, and rows committed under a reused id look
finished to every snapshot of the old history: delivery's watermark, the
cursors clients hold, the webhook's fill point. Before anything reads
against the new history (:class:`~notifyd.db.LineageWatch` holds the pools
until then), the repair, on a connection of its own:

1. takes transaction ids until the next one is past every snapshot this
   instance read, so that no transaction starts under a reused id any more;
2. waits (up to ``OPEN_WAIT_S``) for transactions that took a reused id
   before that and are still open;
3. reads the rows and events under ids the watermark calls finished since
   the horizon of :class:`~notifyd.recall.Recall`, and judges them against
   what was routed under each id;
4. gives those of reused ids a fresh transaction id (``notifyd_restamp``),
   taken past every snapshot of the old history with a margin of about ten
   seconds' worth of ids, so that every instance and cursor sees them as
   new.

Instances repair one at a time (an advisory lock); a second one finds the
rows already moved above its snapshots. A failover that lost nothing costs
one statement per step and moves no row.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from . import queries
from .cursor import Snapshot
from .db import Database, OwnConnection
from .exceptions import DatabaseError
from .recall import Recall, event_fingerprint, fingerprint

__all__ = ["MAX_ADVANCE", "OPEN_WAIT_S", "Repaired", "repair"]

# How long the repair waits for transactions still open under a reused id.
OPEN_WAIT_S = 10.0
# The fresh id of moved rows lies this far past this instance's snapshots:
# as many ids as the last _MARGIN_S seconds took, and at least _MARGIN_XIDS,
# so past those of every other instance, which read the same primary at about
# the same time. Taking them costs about 5 µs each.
_MARGIN_S = 10.0
_MARGIN_XIDS = 10_000
# A database whose next id lies this far below the snapshots read is not
# the history that was read (a restore from an older backup): taking that
# many ids (minutes of work) would not make it so.
MAX_ADVANCE = 5_000_000
_LOCK = "notifyd history repair"
_STATEMENT_TIMEOUT_S = 60.0
# Lock waits (for another instance's repair, for rows an app holds) end
# before the statement timeout, so that the server answers, not a cancel.
_LOCK_WAIT_S = 50.0
_POLL_S = 0.02


@dataclass(frozen=True, slots=True)
class Repaired:
    """
    What a repair did: ``advanced``, transaction ids taken to get past the
    old snapshots; ``reused``, transactions found under reused ids, and
    ``moved``, their rows and events given a fresh id; ``recognised``,
    transactions the new primary had from the old one; ``still_open``,
    transactions under reused ids still open after ``OPEN_WAIT_S`` (their
    rows are pushed, but a cursor of the old history passes over them);
    ``past_memory``: the lost tail may reach back further than the memory;
    ``behind``: the next id was more than ``MAX_ADVANCE`` below the
    snapshots, and nothing was done.
    """

    advanced: int = 0
    reused: int = 0
    moved: int = 0
    recognised: int = 0
    still_open: int = 0
    past_memory: bool = False
    behind: int = 0


async def repair(database: Database, recall: Recall, watermark: Snapshot) -> Repaired:
    """
    Repair what a change of history may hide from ``watermark`` (delivery's,
    of the old history) and from the cursors made before it. Raises
    :class:`~notifyd.exceptions.DatabaseError` when the database fails it;
    it can then be run again.
    """
    horizon = recall.horizon
    if horizon is None:
        return Repaired()
    connection = await database.own_connection(
        "history repair", statement_timeout=_STATEMENT_TIMEOUT_S, lock_timeout=_LOCK_WAIT_S
    )
    try:
        if not await connection.wait_for_advisory_lock(_LOCK):
            # Another instance has been repairing all this time: try again
            # next round rather than repair beside it.
            raise DatabaseError(f"another instance held {_LOCK!r} for {_LOCK_WAIT_S:g}s")
        ceiling = max(recall.highest_xmax, watermark.xmax)
        advanced = await _advance(connection, ceiling)
        if advanced < 0:
            return Repaired(behind=-advanced)
        still_open = await _wait_for_open(connection, recall, watermark)
        found = [
            (row["xact_id"], fingerprint(row["id"], row["seq"]))
            for row in await connection.fetch(
                queries.SUSPECT_ROWS, horizon.to_pg(), watermark.to_pg()
            )
        ]
        found += [
            (
                event["xact_id"],
                event_fingerprint(event["to_user"], event["kind"], event["ids"], event["type"]),
            )
            for event in await connection.fetch(
                queries.SUSPECT_EVENTS, horizon.to_pg(), watermark.to_pg()
            )
        ]
        plan = recall.plan(found)
        moved = 0
        if plan.reused:
            margin = max(_MARGIN_XIDS, round(recall.span_xids * _MARGIN_S / recall.span_s))
            advanced += await _advance(connection, ceiling + margin)
            moved = int(
                await connection.fetchval(queries.RESTAMP, [str(x) for x in sorted(plan.reused)])
            )
        return Repaired(
            advanced=advanced,
            reused=len(plan.reused),
            moved=moved,
            recognised=plan.recognised,
            still_open=len(still_open),
            past_memory=plan.past_memory,
        )
    finally:
        # Ending the session releases the advisory lock.
        await connection.close()


async def _advance(connection: OwnConnection, target: int) -> int:
    """
    Take transaction ids until the next is at least ``target``; how many
    were taken, or minus how far below it the next id was when that is more
    than ``MAX_ADVANCE`` (and nothing was taken).
    """
    current = Snapshot.from_pg(await connection.fetchval("SELECT pg_current_snapshot()::text"))
    gap = target - current.xmax
    if gap <= 0:
        return 0
    if gap > MAX_ADVANCE:
        return -gap
    await connection.execute(queries.advance_xact_id(target))
    return gap


async def _wait_for_open(
    connection: OwnConnection, recall: Recall, watermark: Snapshot
) -> frozenset[int]:
    """
    Wait until no transaction under a reused id is open, up to
    ``OPEN_WAIT_S``; those still open then.
    """
    deadline = time.monotonic() + OPEN_WAIT_S
    while True:
        now = Snapshot.from_pg(await connection.fetchval("SELECT pg_current_snapshot()::text"))
        still_open = recall.still_open(now, watermark)
        if not still_open or time.monotonic() >= deadline:
            return still_open
        await asyncio.sleep(_POLL_S)
