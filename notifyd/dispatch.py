"""
The dispatch table: which committed message a database-driven sink (the
webhook) still owes, shared by every notifyd instance.

How a message moves through it:

1. *fill*: whichever instance gets the sink's row in
   ``t_message_dispatch_state`` (``FOR UPDATE SKIP LOCKED``) adds a pending
   row for every message committed since the snapshot stored there, and
   stores the snapshot it read them with, in one statement. That is
   delivery's watermark rule in SQL: no message is skipped however commits
   interleave, none is added twice, across instances and restarts.
2. *claim*: the oldest pending rows (by ``seq``) whose time has come are
   leased (``next_at`` moved past the send's timeout) with ``FOR UPDATE
   SKIP LOCKED``. A row that is not due yet, or leased by another instance,
   stops the claim there: sending is oldest first, and a backlog drains in
   order.
3. *finish*: the row is marked ``sent`` after a 2xx, or ``seen``,
   ``rejected``, ``expired``, ``gone`` (deleted, or past its ``expire_at``
   when its turn came); a failed attempt moves ``next_at``
   by the backoff. An instance that dies holding a lease leaves the row
   pending: another instance sends it once the lease runs out.

"Seen" (for the offline fallback) is ``t_message_seen``: every instance
records the messages it pushed to at least one live session; a message read
(``is_read = '1'``) counts as seen too.

Every statement raises :class:`~notifyd.exceptions.DatabaseError` when
Postgres is unusable; callers retry.
"""

from __future__ import annotations

from collections.abc import Sequence

from .db import Database, Row, as_database_error
from .exceptions import DatabaseError

__all__ = ["DISPATCH", "DISPATCH_STATE", "SEEN", "DispatchStore"]

DISPATCH = "t_message_dispatch"
DISPATCH_STATE = "t_message_dispatch_state"
SEEN = "t_message_seen"

_START = f"""
INSERT INTO {DISPATCH_STATE} (sink, snap) VALUES ($1, pg_current_snapshot())
ON CONFLICT (sink) DO NOTHING
"""

# Locks the sink's row and returns the snapshot the previous fill stored.
_LOCK_STATE = f"SELECT snap::text FROM {DISPATCH_STATE} WHERE sink = $1 FOR UPDATE SKIP LOCKED"

# Run after _LOCK_STATE in the same transaction. $2: seconds until due;
# $3: types (NULL: all); $4: leave announcements out; $5: the stored
# snapshot, passed as a value rather than joined in, so the planner sees
# how recent it is and reads the xact_id index instead of guessing a third
# of the table.
_FILL = f"""
WITH fresh AS (
    INSERT INTO {DISPATCH} (sink, message_id, seq, next_at)
    SELECT $1, m.id::text, m.seq, now() + make_interval(secs => $2)
    FROM t_message_real_time AS m
    WHERE m.xact_id >= pg_snapshot_xmin($5::text::pg_snapshot)
      AND m.xact_id <= '18446744073709551615'::xid8
      AND NOT pg_visible_in_snapshot(m.xact_id, $5::text::pg_snapshot)
      AND ($3::text[] IS NULL OR m.type::text = ANY($3::text[]))
      AND NOT ($4 AND m.to_user::text = '*')
    ON CONFLICT DO NOTHING
    RETURNING 1
)
UPDATE {DISPATCH_STATE} SET snap = pg_current_snapshot(), filled_at = now()
WHERE sink = $1
RETURNING (SELECT count(*) FROM fresh)
"""

# The first $2 pending rows by seq that no one else holds; of those, the run
# before the first that is not due (or leased elsewhere) is leased for $3 s.
_CLAIM = f"""
WITH head AS (
    SELECT message_id, seq, next_at FROM {DISPATCH}
    WHERE sink = $1 AND state = 'pending'
    ORDER BY seq
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), due AS (
    SELECT message_id FROM head
    WHERE seq < coalesce((SELECT min(seq) FROM head WHERE next_at > now()), 9223372036854775807)
)
UPDATE {DISPATCH} AS d
SET next_at = now() + make_interval(secs => $3)
FROM due LEFT JOIN t_message_real_time AS m ON m.id::text = due.message_id
WHERE d.sink = $1 AND d.message_id = due.message_id
RETURNING d.message_id, d.seq AS dispatch_seq, d.attempts, m.id IS NOT NULL AS present,
    m.seq, m.id::text AS id, m.title::text AS title, m.content::text AS content,
    m.type::text AS type, m.send_user::text AS send_user, m.to_user::text AS to_user,
    m.send_time, m.skip_url::text AS skip_url, m.is_read::text AS is_read,
    coalesce(m.expire_at <= now(), false) AS lapsed,
    (m.is_read::text = '1' AND m.to_user::text <> '*'
     OR EXISTS (SELECT 1 FROM {SEEN} AS s WHERE s.message_id = d.message_id)) AS seen
"""

# The oldest pending row decides when there is something to do next.
_HEAD_DUE_IN = f"""
SELECT greatest(0, extract(epoch FROM next_at - now()))::float8 FROM {DISPATCH}
WHERE sink = $1 AND state = 'pending'
ORDER BY seq
LIMIT 1
"""

_FINISH = f"""
UPDATE {DISPATCH} SET state = $3, done_at = now(), last_error = $4
WHERE sink = $1 AND message_id = ANY($2::text[]) AND state = 'pending'
"""

_RETRY_LATER = f"""
UPDATE {DISPATCH}
SET attempts = attempts + 1, next_at = now() + make_interval(secs => $3), last_error = $4
WHERE sink = $1 AND message_id = $2 AND state = 'pending'
"""

_RELEASE = f"""
UPDATE {DISPATCH} SET next_at = now() + make_interval(secs => $3)
WHERE sink = $1 AND message_id = ANY($2::text[]) AND state = 'pending'
"""

_EXPIRE = f"""
UPDATE {DISPATCH}
SET state = 'expired', done_at = now(), last_error = coalesce(last_error, 'older than the max age')
WHERE sink = $1 AND state = 'pending' AND created_at < now() - make_interval(secs => $2)
RETURNING message_id
"""

_PRUNE_DONE = f"""
DELETE FROM {DISPATCH}
WHERE sink = $1 AND state <> 'pending' AND done_at < now() - make_interval(secs => $2)
"""

_PRUNE_SEEN = f"DELETE FROM {SEEN} WHERE seen_at < now() - make_interval(secs => $1)"

_MARK_SEEN = f"""
INSERT INTO {SEEN} (message_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING
"""


def _all_of(table: str, privileges: str) -> str:
    # has_table_privilege with a list is true when ANY of them is held.
    return " AND ".join(
        f"has_table_privilege('{table}', '{p.strip()}')" for p in privileges.split(",")
    )


_PRIVILEGES = f"""
SELECT
    {_all_of(DISPATCH, "SELECT, INSERT, UPDATE, DELETE")} AS dispatch,
    {_all_of(DISPATCH_STATE, "SELECT, INSERT, UPDATE")} AS dispatch_state,
    {_all_of(SEEN, "SELECT, INSERT, DELETE")} AS seen
"""


class DispatchStore:
    """
    The dispatch statements for one sink name.
    """

    def __init__(self, database: Database, sink: str) -> None:
        self._pool = database.pool
        self._sink = sink

    async def problems(self) -> list[str]:
        """
        What is missing for the dispatch table, in plain words.
        """
        with as_database_error("checking the dispatch tables failed"):
            missing = [
                table
                for table in (DISPATCH, DISPATCH_STATE, SEEN)
                if not await self._pool.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
            ]
            if missing:
                return [f"table {table} does not exist: run `notifyd init-db`" for table in missing]
            allowed = await self._pool.fetchrow(_PRIVILEGES)
        if allowed is None:  # a SELECT without FROM always returns its row
            raise DatabaseError("the dispatch privilege check returned no row")
        needed = {
            "dispatch": f"SELECT, INSERT, UPDATE and DELETE on {DISPATCH}",
            "dispatch_state": f"SELECT, INSERT and UPDATE on {DISPATCH_STATE}",
            "seen": f"SELECT, INSERT and DELETE on {SEEN}",
        }
        return [
            f"the database role lacks {what}: apply role.sql (`notifyd init-db --role`)"
            for key, what in needed.items()
            if not allowed[key]
        ]

    async def start(self) -> None:
        """
        Begin at the current snapshot the first time this sink runs; a
        restart goes on from where the last fill stopped.
        """
        with as_database_error(f"starting the {self._sink} dispatch failed"):
            await self._pool.execute(_START, self._sink)

    async def fill(
        self, *, due_in: float, types: Sequence[str], skip_announcements: bool
    ) -> int | None:
        """
        Add the newly committed messages; returns how many, or None when
        another instance is filling right now.
        """
        with as_database_error(f"filling the {self._sink} dispatch failed"):
            async with self._pool.acquire() as connection, connection.transaction():
                stored = await connection.fetchval(_LOCK_STATE, self._sink)
                if stored is None:
                    return None
                added = await connection.fetchval(
                    _FILL, self._sink, due_in, list(types) or None, skip_announcements, stored
                )
        return int(added or 0)

    async def claim(self, *, limit: int, lease: float) -> list[Row]:
        """
        Lease the next due rows, oldest first, joined with their messages
        (``present`` false when the message was deleted, ``lapsed`` true when
        it is past its ``expire_at``).
        """
        with as_database_error(f"claiming {self._sink} dispatch rows failed"):
            rows = await self._pool.fetch(_CLAIM, self._sink, limit, lease)
        return sorted(rows, key=lambda row: row["dispatch_seq"])

    async def head_due_in(self) -> float | None:
        """
        Seconds until the oldest pending row is due; None when none is.
        """
        with as_database_error(f"reading when the {self._sink} dispatch is due failed"):
            due_in = await self._pool.fetchval(_HEAD_DUE_IN, self._sink)
        return None if due_in is None else float(due_in)

    async def finish(
        self, message_ids: Sequence[str], state: str, error: str | None = None
    ) -> None:
        """
        Mark rows done: ``sent``, ``seen``, ``rejected`` or ``gone``.
        """
        with as_database_error(f"finishing {self._sink} dispatch rows failed"):
            await self._pool.execute(_FINISH, self._sink, list(message_ids), state, error)

    async def retry_later(self, message_id: str, delay: float, error: str) -> None:
        """
        Count a failed attempt and make the row due again in ``delay`` s.
        """
        with as_database_error(f"rescheduling a {self._sink} dispatch row failed"):
            await self._pool.execute(_RETRY_LATER, self._sink, message_id, delay, error)

    async def release(self, message_ids: Sequence[str], delay: float = 0.0) -> None:
        """
        Give leased rows back, due in ``delay`` seconds.
        """
        if message_ids:
            with as_database_error(f"releasing {self._sink} dispatch rows failed"):
                await self._pool.execute(_RELEASE, self._sink, list(message_ids), delay)

    async def expire(self, max_age: float) -> list[str]:
        """
        Give up pending rows older than ``max_age``; returns their ids.
        """
        with as_database_error(f"expiring {self._sink} dispatch rows failed"):
            rows = await self._pool.fetch(_EXPIRE, self._sink, max_age)
        return [row["message_id"] for row in rows]

    async def prune(self, older_than: float) -> None:
        """
        Delete finished rows and seen marks older than ``older_than`` s.
        """
        with as_database_error(f"pruning the {self._sink} dispatch failed"):
            await self._pool.execute(_PRUNE_DONE, self._sink, older_than)
            await self._pool.execute(_PRUNE_SEEN, older_than)

    async def mark_seen(self, message_ids: Sequence[str]) -> None:
        """
        Record that these messages reached a live session.
        """
        if message_ids:
            with as_database_error("recording seen messages failed"):
                await self._pool.execute(_MARK_SEEN, list(message_ids))
