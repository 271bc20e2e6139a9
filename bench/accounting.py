"""
Every row of a run against what the sessions received: the rows a tag put
in a table (read back from Postgres with their commit times), matched by id
with the receipts (``bench/receipts.py``); latencies from the commit, rows
lost, rows received twice. Pure: the queries that feed it are
:func:`tagged_rows` and the client requests.

The commit time of a row is its transaction's commit timestamp
(``track_commit_timestamp``, ``pg_xact_commit_timestamp(xmin)``): stamped
when Postgres writes the commit record, after any wait for the notify lock,
before the record's WAL flush. A receipt minus it includes that flush, which
every commit waits for before its row is visible, and nothing before the
commit. Without ``track_commit_timestamp`` (an external ``--dsn``) the
INSERT's own ``clock_timestamp()`` stands in, and the results say so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from .measure import percentiles

__all__ = ["COMMIT_CLOCKS", "Row", "account", "commit_clock", "tagged_rows"]

COMMIT_CLOCKS = {
    "commit_timestamp": "the commit record's timestamp (pg_xact_commit_timestamp)",
    "insert_clock": "the INSERT's clock_timestamp() (track_commit_timestamp is off)",
}


@dataclass(frozen=True)
class Row:
    """
    One inserted row: its id, commit time and INSERT time (ns since the epoch).
    """

    id: str
    commit_ns: int
    insert_ns: int


async def commit_clock(db: asyncpg.Connection) -> str:
    """
    Which clock gives commit times on this cluster (a key of :data:`COMMIT_CLOCKS`).
    """
    on = await db.fetchval("SHOW track_commit_timestamp")
    return "commit_timestamp" if on == "on" else "insert_clock"


async def tagged_rows(db: asyncpg.Connection, table: str, tag: str, clock: str) -> list[Row]:
    """
    The rows whose content is ``"<tag>:<insert ns>"``, with their commit times.
    """
    commit = (
        "(extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint * 1000"
        if clock == "commit_timestamp"
        else "NULL::bigint"
    )
    records = await db.fetch(
        f"SELECT id, {commit} AS commit_ns, split_part(content, ':', 2)::bigint AS insert_ns "
        f"FROM {table} WHERE content LIKE $1",
        tag + ":%",
    )
    return [
        Row(
            r["id"],
            r["commit_ns"] if r["commit_ns"] is not None else r["insert_ns"],
            r["insert_ns"],
        )
        for r in records
    ]


def account(rows: Iterable[Row], receipts: Iterable[tuple[str, int]]) -> dict[str, Any]:
    """
    Rows against receipts: how many rows, how many received once, lost,
    received more than once (the extra copies), received but not in the
    table; latency percentiles in ms from the commit and from the INSERT,
    over the first receipt of each row.
    """
    by_id = {row.id: row for row in rows}
    copies = Counter(row_id for row_id, _ in receipts)
    first: dict[str, int] = {}
    for row_id, at in receipts:
        if row_id not in first or at < first[row_id]:
            first[row_id] = at
    from_commit = [(at - by_id[i].commit_ns) // 1000 for i, at in first.items() if i in by_id]
    from_insert = [(at - by_id[i].insert_ns) // 1000 for i, at in first.items() if i in by_id]
    return {
        "rows": len(by_id),
        "received": sum(copies.values()),
        "delivered_once": sum(1 for i in by_id if copies.get(i) == 1),
        "lost": sum(1 for i in by_id if i not in copies),
        "duplicates": sum(n - 1 for i, n in copies.items() if i in by_id and n > 1),
        "unknown": sum(n for i, n in copies.items() if i not in by_id),
        "latency_ms": _ms(percentiles(from_commit)),
        "insert_latency_ms": _ms(percentiles(from_insert)),
    }


def _ms(stats: dict[str, float | int | None]) -> dict[str, float | int | None]:
    return {k: (v if k == "n" or v is None else v / 1000) for k, v in stats.items()}
