"""
The dispatch table: which committed message a database-driven sink (the
webhook) still owes, shared by every notifyd instance, and the lock that
lets one instance at a time send it.

How a message moves through it:

1. *fill*: whichever instance gets the sink's row in
   ``t_message_dispatch_state`` (``FOR UPDATE SKIP LOCKED``) adds a pending
   row for every message committed since the snapshot stored there, and
   stores the snapshot it read them with, in one statement. That is
   delivery's watermark rule in SQL: no message is skipped however commits
   interleave, none is added twice, across instances and restarts.
2. *send*: one instance per sink holds the :class:`SenderLock`, a session
   advisory lock on a connection of its own. It reads the oldest pending
   rows (by ``seq``) whose time has come, up to the first that is not due
   yet, and before each POST asks on that same connection whether the row
   is still pending: the answer can only come while the session, and so
   the lock, is alive. The others wait in the lock's queue. The lock dies
   with its session: a killed process or a lost host (server-side TCP
   keepalives) or a cut connection hands it to the next instance within
   seconds, while a live instance that is merely slow keeps it.
3. *finish*: the row is marked ``sent`` after a 2xx, or ``seen``,
   ``rejected``, ``expired``, ``gone`` (deleted, or past its ``expire_at``
   when its turn came); a failed attempt moves ``next_at`` by the backoff,
   and the rows behind it wait (order is kept).

"Seen" (for the offline fallback) is ``t_message_seen``: every instance
records the messages it pushed to at least one live session; a message read
(``is_read = '1'``) counts as seen too.

Every statement raises :class:`~notifyd.exceptions.DatabaseError` when
Postgres is unusable; callers retry.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from .db import Database, OwnConnection, Row, as_database_error
from .exceptions import DatabaseError

__all__ = ["DISPATCH", "DISPATCH_STATE", "SEEN", "DispatchStore", "SenderLock"]

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

# Run on the sender's own connection (the lock's): the first $2 pending rows
# by seq, up to the first that is not due yet, joined with their messages.
# Nothing is written: only the lock's holder sends, so there is no lease
# to take (a lease outlives a dead holder; the lock does not).
_DUE = f"""
WITH head AS (
    SELECT message_id, seq, next_at, attempts FROM {DISPATCH}
    WHERE sink = $1 AND state = 'pending'
    ORDER BY seq
    LIMIT $2
)
SELECT d.message_id, d.seq AS dispatch_seq, d.attempts, m.id IS NOT NULL AS present,
    m.seq, m.id::text AS id, m.title::text AS title, m.content::text AS content,
    m.type::text AS type, m.send_user::text AS send_user, m.to_user::text AS to_user,
    m.send_time, m.skip_url::text AS skip_url, m.is_read::text AS is_read,
    coalesce(m.expire_at <= now(), false) AS lapsed,
    (m.is_read::text = '1' AND m.to_user::text <> '*'
     OR EXISTS (SELECT 1 FROM {SEEN} AS s WHERE s.message_id = d.message_id)) AS seen
FROM head AS d LEFT JOIN t_message_real_time AS m ON m.id::text = d.message_id
WHERE d.seq < coalesce((SELECT min(seq) FROM head WHERE next_at > now()), 9223372036854775807)
ORDER BY d.seq
"""

# Asked on the lock's connection right before a POST.
_STILL_PENDING = f"""
SELECT EXISTS (
    SELECT 1 FROM {DISPATCH} WHERE sink = $1 AND message_id = $2 AND state = 'pending'
)
"""

# One lock per sink name. Waits in the lock's queue, up to the connection's
# lock_timeout.
_LOCK = "SELECT pg_advisory_lock(hashtextextended($1, 0))"

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
            async with self._pool.transaction() as connection:
                stored = await connection.fetchval(_LOCK_STATE, self._sink)
                if stored is None:
                    return None
                added = await connection.fetchval(
                    _FILL, self._sink, due_in, list(types) or None, skip_announcements, stored
                )
        return int(added or 0)

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


# What the server is told about the lock's connection. Keepalives: a holder
# whose host vanishes without closing its socket is noticed after about
# idle + interval x count = 11 s (tcp_user_timeout bounds unacknowledged
# writes the same way), and its session ends, releasing the lock.
_SENDER_SESSION = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}
# Beyond the lock wait, how long any statement on that connection may take
# before the connection is given up (a black-holed one answers nothing).
_SENDER_STATEMENT_S = 10.0


class SenderLock:
    """
    The right to send one sink's messages, held by one instance at a time:
    a session advisory lock (``pg_advisory_lock(hashtextextended(
    'notifyd.dispatch:<sink>', 0))``) on a connection of its own.

    The lock lives exactly as long as that session. Whatever ends it (the
    process killed, the host lost, the connection cut or terminated) lets
    the next instance waiting in the lock's queue through at once; a live
    holder keeps it however slow its receiver is. Every statement it runs
    on that connection (:meth:`due`, :meth:`still_pending`) answers only
    while the lock is held; a failed one drops the connection, and with it
    the claim to be the sender (:attr:`held` turns false).

    The connection must reach Postgres directly or through a session-mode
    pooler (a transaction-mode pooler would hand the lock's session to
    another client): give it the LISTEN connection's DSN.
    """

    def __init__(self, dsn: str, sink: str, *, wait: float) -> None:
        """
        ``wait``: how long :meth:`acquire` waits in the lock's queue before
        returning False (it is also the lock_timeout of every statement on
        the connection).
        """
        self._dsn = dsn
        self._sink = sink
        self._key = f"notifyd.dispatch:{sink}"
        self._wait = wait
        self._connection: OwnConnection | None = None
        self._held = False

    @property
    def held(self) -> bool:
        """
        Whether this instance holds the lock, as far as it can tell without
        asking (the next statement tells for sure).
        """
        return self._held and self._connection is not None and not self._connection.closed

    @property
    def backend_pid(self) -> int | None:
        """
        The server process of the lock's connection (for logs).
        """
        return None if self._connection is None else self._connection.backend_pid

    async def acquire(self) -> bool:
        """
        Become the sender: True once the lock is held (at once when it
        already is), False when another instance still held it after
        ``wait`` seconds. Raises :class:`DatabaseError` when Postgres cannot
        be asked.
        """
        if self.held:
            return True
        if self._held:  # held once, but its session has ended since
            self._drop()
        connection = await self._connect()
        try:
            self._held = await connection.wait_for_advisory_lock(self._key)
        except DatabaseError:
            self._drop()
            raise
        return self._held

    async def due(self, limit: int) -> list[Row]:
        """
        The next rows to send, oldest first, up to the first not yet due,
        joined with their messages (``present`` false when the message was
        deleted, ``lapsed`` true when it is past its ``expire_at``). Only
        while the lock is held.
        """
        connection = self._holding(f"reading due {self._sink} dispatch rows failed")
        try:
            return await connection.fetch(_DUE, self._sink, limit)
        except DatabaseError:
            # Whatever broke, the lock may be gone with it: never send on.
            self._drop()
            raise

    async def still_pending(self, message_id: str) -> bool:
        """
        Whether the row is still to be sent, asked right before its POST: an
        answer also proves that the lock was held a moment ago.
        """
        connection = self._holding(f"checking a {self._sink} dispatch row failed")
        try:
            return bool(await connection.fetchval(_STILL_PENDING, self._sink, message_id))
        except DatabaseError:
            self._drop()
            raise

    async def release(self) -> None:
        """
        Give the lock up (closing its session), so that the next instance
        takes over now. Raises nothing but a cancellation.
        """
        connection, self._connection = self._connection, None
        self._held = False
        if connection is not None:
            await connection.close()

    async def _connect(self) -> OwnConnection:
        if self._connection is not None and not self._connection.closed:
            return self._connection
        name = f"notifyd {self._sink} sender {socket.gethostname()}:{os.getpid()}"
        self._connection = await OwnConnection.open(
            self._dsn,
            application_name=name[:63],
            settings={**_SENDER_SESSION, "lock_timeout": str(max(1, round(self._wait * 1000)))},
            statement_timeout=self._wait + _SENDER_STATEMENT_S,
            what=f"{self._sink} sender connection",
        )
        return self._connection

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._held = False
        if connection is not None:
            connection.terminate()

    def _holding(self, failed: str) -> OwnConnection:
        connection = self._connection
        if not self.held or connection is None:
            self._drop()
            raise DatabaseError(f"{failed}: this instance does not hold the sender lock")
        return connection
