"""
All of notifyd's SQL, behind one small class over an asyncpg pool.

The LISTEN connection is not here: it is a dedicated connection owned by
:mod:`notifyd.listener`, because pools reset connections with ``UNLISTEN *``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import asyncpg

from .cursor import Cursor, Snapshot
from .exceptions import ConfigError, DatabaseError, ReplicaError, SchemaError, describe

__all__ = [
    "CHANNEL",
    "DATABASE_ERRORS",
    "Database",
    "Row",
    "as_database_error",
    "refuse_standby",
    "schema_sql",
]

logger = logging.getLogger(__name__)

CHANNEL = "notifyd"
TABLE = "t_message_real_time"
RECEIPTS = "t_message_receipt"
EVENTS = "t_message_event"

Row = asyncpg.Record

# What asyncpg raises when Postgres is unreachable, refuses a statement or
# the connection breaks: socket errors and timeouts (OSError), the server's
# errors, the client's interface errors, and its internal ones (a protocol
# surprise, a type cache made stale by DDL). Nothing outside this module
# catches them: they leave it as DatabaseError (see as_database_error).
DATABASE_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


@contextmanager
def as_database_error(failed: str) -> Iterator[None]:
    """
    Turn asyncpg's and the socket's errors raised inside into
    :class:`DatabaseError` reading ``"<failed>: <what asyncpg said>"``
    (the original stays as its ``__cause__``); notifyd's own exceptions and
    everything else pass through unchanged.
    """
    try:
        yield
    except DATABASE_ERRORS as exc:
        raise DatabaseError(f"{failed}: {describe(exc)}") from exc


async def refuse_standby(connection: asyncpg.Connection | asyncpg.Pool, where: str) -> None:
    """
    Raise :class:`ReplicaError` naming ``where`` (the setting that holds the
    DSN) when ``connection`` reaches a hot standby, where LISTEN cannot work;
    :class:`DatabaseError` when the question cannot be asked.
    """
    with as_database_error(f"asking whether {where} is a hot standby failed"):
        in_recovery = await connection.fetchval("SELECT pg_is_in_recovery()")
    if in_recovery:
        raise ReplicaError(
            f"{where} is a hot standby (in recovery), where LISTEN cannot work: "
            "point it at the primary"
        )


# Every column is cast to what the protocol sends, so an application's
# existing table with varchar or char columns is read the same way.
_COLUMNS = """
    seq, xact_id::text::bigint AS xact_id, id::text AS id, title::text AS title,
    content::text AS content, type::text AS type, send_user::text AS send_user,
    to_user::text AS to_user, send_time, skip_url::text AS skip_url,
    is_read::text AS is_read
"""


def _columns_for(user: str) -> str:
    """
    The message columns with ``is_read`` as ``user`` sees it: an
    announcement is read when the user has a receipt for it.
    """
    return _COLUMNS.replace(
        "is_read::text AS is_read",
        f"""CASE WHEN to_user = '*' THEN
            CASE WHEN EXISTS (SELECT 1 FROM {RECEIPTS} AS r
                              WHERE r.user_id = {user} AND r.message_id = id::text)
                 THEN '1' ELSE '0' END
        ELSE is_read::text END AS is_read""",
    )


# Rows of transactions not visible in the previous snapshot ($1 = the
# snapshot, $2 = its in-progress list): an exact, index-backed "what is new",
# however long another transaction holds the snapshot's xmin back.
#
# Each arm is written as a range with both ends, though one end always holds
# (no xid8 is above the largest; in-progress ids lie in [xmin, xmax)): on a
# table never analyzed, as a new or truncated one is until autovacuum comes
# by, Postgres guesses a third of the table for "xact_id >= x" and reads all
# of it sequentially on every window; for a two-ended range it guesses 0.5 %
# and uses the index. With statistics both ends are estimated from them.
_NEW_SINCE = """(
    (xact_id >= pg_snapshot_xmax($1::text::pg_snapshot)
     AND xact_id <= '18446744073709551615'::xid8)
    OR (xact_id = ANY($2::text[]::xid8[])
        AND xact_id >= pg_snapshot_xmin($1::text::pg_snapshot)
        AND xact_id < pg_snapshot_xmax($1::text::pg_snapshot))
)"""

# A user's unread count: own unread rows plus announcements without a receipt.
_UNREAD_OF = f"""
    (SELECT count(*) FROM {TABLE} WHERE to_user = {{user}} AND is_read = '0')
    + (SELECT count(*) FROM {TABLE} AS a
       WHERE a.to_user = '*' AND NOT EXISTS (
           SELECT 1 FROM {RECEIPTS} AS r
           WHERE r.user_id = {{user}} AND r.message_id = a.id::text))
"""

# The first page is one statement, so one snapshot: the new rows, the
# read/delete events, the unread counts of users with events (and of joining
# sessions, $4) and the snapshot itself are one consistent view. Counts taken
# here already include this window's rows and events.
_WINDOW_FIRST = f"""
WITH ev AS (
    SELECT xact_id::text AS xact_id, to_user, kind, ids, type, readers,
           inserted::text AS inserted
    FROM {EVENTS}
    WHERE {_NEW_SINCE}
), counted AS (
    SELECT DISTINCT usr FROM (
        SELECT to_user AS usr FROM ev WHERE to_user <> '*'
        UNION ALL SELECT unnest($4::text[])
    ) AS u
)
SELECT pg_current_snapshot()::text AS snap,
       (SELECT json_agg(ev) FROM ev)::text AS events,
       (SELECT json_object_agg(usr, {_UNREAD_OF.format(user="usr")}) FROM counted)::text AS counts,
       NULL AS seq, NULL AS xact_id, NULL AS id, NULL AS title, NULL AS content,
       NULL AS type, NULL AS send_user, NULL AS to_user, NULL AS send_time,
       NULL AS skip_url, NULL AS is_read
UNION ALL (
    SELECT NULL, NULL, NULL, {_COLUMNS} FROM {TABLE}
    WHERE {_NEW_SINCE}
    ORDER BY seq
    LIMIT $3
)
"""

# The first page when no session is joining, as one statement too: most
# windows have no read/delete events, and this shape costs Postgres less than
# half the planning of _WINDOW_FIRST (planned anew on every execution, since
# its best plan depends on the snapshot). When events exist, the caller reads
# the window again with _WINDOW_FIRST: nothing was routed yet, so only the
# end snapshot moves.
_WINDOW_LEAN = f"""
SELECT pg_current_snapshot()::text AS snap,
       EXISTS (SELECT 1 FROM {EVENTS} WHERE {_NEW_SINCE}) AS has_events,
       NULL AS seq, NULL AS xact_id, NULL AS id, NULL AS title, NULL AS content,
       NULL AS type, NULL AS send_user, NULL AS to_user, NULL AS send_time,
       NULL AS skip_url, NULL AS is_read
UNION ALL (
    SELECT NULL, NULL, {_COLUMNS} FROM {TABLE}
    WHERE {_NEW_SINCE}
    ORDER BY seq
    LIMIT $3
)
"""

# The rest of a window after its first page: bounded by the first page's
# snapshot, so the window does not grow while it is being read. Read through
# one cursor, so the rows are found and sorted once however many pages they
# fill.
_WINDOW_REST = f"""
SELECT {_COLUMNS} FROM {TABLE}
WHERE {_NEW_SINCE}
  AND seq > $3
  AND pg_visible_in_snapshot(xact_id, $4::text::pg_snapshot)
ORDER BY seq
"""

# One user's rows that a client at a cursor does not have and that the
# delivery snapshot $5 saw; newest first, so an overflow keeps the newest.
_CATCH_UP = f"""
SELECT b.i, m.*
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
     WITH ORDINALITY AS b(usr, base, fin, s0, i)
CROSS JOIN LATERAL (
    SELECT {_columns_for("b.usr")} FROM {TABLE}
    WHERE to_user IN (b.usr, '*')
      AND xact_id >= pg_snapshot_xmin(b.base::pg_snapshot)
      AND NOT pg_visible_in_snapshot(xact_id, b.base::pg_snapshot)
      AND NOT (b.fin IS NOT NULL AND seq <= b.s0
               AND pg_visible_in_snapshot(xact_id, b.fin::pg_snapshot))
      AND pg_visible_in_snapshot(xact_id, $5::text::pg_snapshot)
    ORDER BY seq DESC
    LIMIT $6
) AS m
"""

# Marks the user's own messages and announcements read; ids of other users'
# messages match nothing and so change and reveal nothing.
_MARK_READ = f"""
WITH own AS (
    UPDATE {TABLE} SET is_read = '1'
    WHERE to_user = $1 AND id::text = ANY($2::text[]) AND is_read = '0'
    RETURNING 1
), announcements AS (
    INSERT INTO {RECEIPTS} (user_id, message_id)
    SELECT $1, id::text FROM {TABLE}
    WHERE to_user = '*' AND id::text = ANY($2::text[])
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM own) + (SELECT count(*) FROM announcements)
"""

_MARK_ALL_READ = f"""
WITH own AS (
    UPDATE {TABLE} SET is_read = '1'
    WHERE to_user = $1 AND is_read = '0' AND ($2::text IS NULL OR type = $2)
    RETURNING 1
), announcements AS (
    INSERT INTO {RECEIPTS} (user_id, message_id)
    SELECT $1, id::text FROM {TABLE}
    WHERE to_user = '*' AND ($2::text IS NULL OR type = $2)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM own) + (SELECT count(*) FROM announcements)
"""

# Newest first, the user's own rows and announcements merged by seq; one
# extra row tells whether there is more.
_HISTORY = f"""
SELECT * FROM (
    (SELECT {_columns_for("$1")} FROM {TABLE}
     WHERE to_user = $1 AND seq < $2 AND ($3::text IS NULL OR type = $3)
       AND (NOT $4 OR is_read = '0')
     ORDER BY seq DESC LIMIT $5)
    UNION ALL
    (SELECT {_columns_for("$1")} FROM {TABLE} AS m
     WHERE to_user = '*' AND seq < $2 AND ($3::text IS NULL OR type = $3)
       AND (NOT $4 OR NOT EXISTS (SELECT 1 FROM {RECEIPTS} AS r
                                  WHERE r.user_id = $1 AND r.message_id = m.id::text))
     ORDER BY seq DESC LIMIT $5)
) AS h
ORDER BY seq DESC
LIMIT $5
"""

_PRUNE_EVENTS = f"DELETE FROM {EVENTS} WHERE at < now() - make_interval(secs => $1)"

_INSERT = f"""
INSERT INTO {TABLE} (to_user, title, content, type, skip_url, send_user)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id::text
"""

_REQUIRED_TRIGGERS = (
    "notifyd_wake_on_insert", "notifyd_log_update", "notifyd_log_delete",
)  # fmt: skip

_REQUIRED_COLUMNS = (
    "id", "title", "send_user", "to_user", "type", "content",
    "send_time", "skip_url", "is_read", "seq", "xact_id",
)  # fmt: skip


async def _keep_session(connection: asyncpg.Connection) -> None:
    """
    Pool reset hook that does nothing.

    notifyd's queries leave no session state behind (no LISTEN, SET or
    cursors outside their transaction; the one SET is the init hook's, meant
    to last), so asyncpg's default reset query, an extra round trip on every
    release, is skipped.
    """


async def _plan_per_execution(connection: asyncpg.Connection) -> None:
    """
    Pool init hook: plan every execution with its parameters.

    asyncpg prepares each statement once per connection, and after five
    executions Postgres may switch a prepared statement to a generic plan,
    costed on the table as it was then. The window queries are first run
    against an empty or small table (a new deployment, a truncated one) and
    a generic plan made then is a sequential scan that Postgres keeps until
    the next ANALYZE: each read then walks the whole table, and delivery
    slows down as the table grows. With the snapshot's xmax in hand the
    planner always picks the index, at a fraction of a millisecond of
    planning per query. Set here rather than as a startup parameter, which
    poolers such as PgBouncer refuse.
    """
    await connection.execute("SET plan_cache_mode = force_custom_plan")


def role_sql() -> str:
    """
    The least-privilege role for the daemon (``role.sql``).
    """
    return resources.files("notifyd").joinpath("role.sql").read_text("utf-8")


# What the daemon's own role must be allowed to do.
_PRIVILEGES = f"""
SELECT
    has_table_privilege('{TABLE}', 'SELECT') AS read_messages,
    has_column_privilege('{TABLE}', 'is_read', 'UPDATE') AS update_is_read,
    has_table_privilege('{RECEIPTS}', 'SELECT') AND has_table_privilege('{RECEIPTS}', 'INSERT')
        AS receipts,
    has_table_privilege('{EVENTS}', 'SELECT') AND has_table_privilege('{EVENTS}', 'DELETE')
        AS events
"""


def schema_sql() -> str:
    """
    The schema shipped inside the package (the same file as the top-level
    ``schema.sql``).
    """
    return resources.files("notifyd").joinpath("schema.sql").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class Event:
    """
    A committed read-state change or deletion (from ``t_message_event``).

    ``ids`` None means "all" (of ``type`` when set).
    """

    xact_id: int
    user: str
    kind: str
    ids: list[str] | None
    type: str | None
    readers: list[str] | None
    inserted: int | None  # a deleted announcement's inserting transaction


@dataclass(frozen=True, slots=True)
class Window:
    """
    One page of newly committed rows, in ``seq`` order.

    ``end`` is the snapshot that bounds the window; ``complete`` is true on
    its last page. The first page also carries the window's events and the
    unread counts taken at ``end``.
    """

    rows: list[Row]
    end: Snapshot
    complete: bool
    events: list[Event] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


class Database:
    """
    A small pool of query connections and the statements notifyd runs.

    Every method raises :class:`DatabaseError` (or a subclass) when Postgres
    is unreachable or refuses a statement: nothing escapes from asyncpg
    unwrapped, so callers catch that alone.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, size: int = 4) -> Database:
        """
        Open the pool; raises :class:`DatabaseError` when Postgres cannot be
        reached and :class:`ReplicaError` when it is a hot standby.
        """
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=size,
                command_timeout=60,
                init=_plan_per_execution,
                reset=_keep_session,
            )
        except ValueError as exc:  # asyncpg's verdict on a malformed DSN
            raise ConfigError(f"invalid NOTIFYD_DSN: {describe(exc)}") from None
        except DATABASE_ERRORS as exc:
            raise DatabaseError(f"cannot connect to the database: {describe(exc)}") from exc
        database = cls(pool)
        try:
            await refuse_standby(pool, "NOTIFYD_DSN")
        except BaseException:
            await database.close()
            raise
        return database

    @property
    def pool(self) -> asyncpg.Pool:
        """
        The pool, for modules that keep their own statements
        (:mod:`notifyd.dispatch`).
        """
        return self._pool

    async def close(self) -> None:
        """
        Close the pool, aborting connections that do not close in time.
        """
        try:
            await self._pool.close()
        except Exception:
            self._pool.terminate()

    async def snapshot(self) -> Snapshot:
        """
        The current snapshot: everything committed so far is visible in it.
        """
        with as_database_error("reading the current snapshot failed"):
            text = await self._pool.fetchval("SELECT pg_current_snapshot()::text")
        return Snapshot.from_pg(text)

    async def window(
        self,
        since: Snapshot,
        *,
        limit: int,
        count_users: Sequence[str] = (),
    ) -> Window:
        """
        The first ``limit`` rows committed after ``since``, in ``seq`` order.

        This fixes the window's end snapshot and also returns the window's
        events and the unread counts of the users with events and of
        ``count_users``; when the page is full, :meth:`window_rest` reads
        the rest.
        """
        xip = [str(x) for x in since.xip]
        with as_database_error("reading new rows failed"):
            if not count_users:
                records = await self._pool.fetch(_WINDOW_LEAN, since.to_pg(), xip, limit)
                head = next(r for r in records if r["snap"] is not None)
                if not head["has_events"]:
                    rows = sorted((r for r in records if r["snap"] is None), key=lambda r: r["seq"])
                    return Window(rows, Snapshot.from_pg(head["snap"]), complete=len(rows) < limit)
            records = await self._pool.fetch(
                _WINDOW_FIRST, since.to_pg(), xip, limit, list(count_users)
            )
        head = next(r for r in records if r["snap"] is not None)
        rows = sorted((r for r in records if r["snap"] is None), key=lambda r: r["seq"])
        return Window(
            rows,
            Snapshot.from_pg(head["snap"]),
            complete=len(rows) < limit,
            events=[_event(e) for e in json.loads(head["events"] or "[]")],
            counts=json.loads(head["counts"] or "{}"),
        )

    async def window_rest(
        self, since: Snapshot, end: Snapshot, *, after_seq: int, pages: Iterator[int]
    ) -> AsyncGenerator[Window, None]:
        """
        The rows of the window from ``since`` to ``end`` after ``after_seq``,
        in ``seq`` order, one page per size the endless ``pages`` yields; the
        last page is shorter than its size (possibly empty) and the only one
        marked complete. Holds a pool connection until closed: use with
        :func:`contextlib.aclosing`.
        """
        rows: list[Row] = []
        with as_database_error("reading the rest of a window failed"):
            async with self._pool.acquire() as connection, connection.transaction(readonly=True):
                cursor = await connection.cursor(
                    _WINDOW_REST, since.to_pg(), [str(x) for x in since.xip], after_seq, end.to_pg()
                )
                for size in pages:
                    rows = await cursor.fetch(size)
                    if len(rows) < size:
                        break
                    yield Window(rows, end, complete=False)
                else:
                    raise ValueError("pages ran out before the window did")
        # Given once the transaction is over: delivery flushes the window
        # right after the last page, and must not wait for the COMMIT.
        yield Window(rows, end, complete=True)

    async def catch_up(
        self, requests: Sequence[tuple[str, Cursor]], end: Snapshot, *, limit: int
    ) -> list[list[Row]]:
        """
        For each (user, cursor): the user's rows the cursor does not cover and
        ``end`` saw, newest first, at most ``limit``.
        """
        if not requests:
            return []
        users = [user for user, _ in requests]
        bases = [cursor.base.to_pg() for _, cursor in requests]
        ends = [cursor.end.to_pg() if cursor.end else None for _, cursor in requests]
        seqs = [cursor.seq for _, cursor in requests]
        with as_database_error("reading missed rows failed"):
            records = await self._pool.fetch(
                _CATCH_UP, users, bases, ends, seqs, end.to_pg(), limit
            )
        result: list[list[Row]] = [[] for _ in requests]
        for record in records:
            result[record["i"] - 1].append(record)
        return result

    async def mark_read(self, user: str, ids: Sequence[str]) -> int:
        """
        Mark the user's messages (and announcements) with these ids read;
        returns how many changed. The triggers tell every session.
        """
        with as_database_error("marking messages read failed"):
            changed = await self._pool.fetchval(_MARK_READ, user, list(ids))
        return int(changed)

    async def mark_all_read(self, user: str, type: str | None) -> int:
        """
        Mark all of the user's unread messages read (of one ``type`` when
        given); the event says "all" instead of listing ids.
        """
        with as_database_error("marking all messages read failed"):
            async with self._pool.acquire() as connection, connection.transaction():
                await connection.execute(
                    "SELECT set_config('notifyd.read_all', $1, true)", type if type else "*"
                )
                changed = await connection.fetchval(_MARK_ALL_READ, user, type)
        return int(changed)

    async def history(
        self,
        user: str,
        *,
        before_seq: int | None,
        limit: int,
        type: str | None,
        unread_only: bool,
    ) -> tuple[list[Row], bool]:
        """
        Up to ``limit`` of the user's messages older than ``before_seq``,
        newest first, and whether there are more.
        """
        with as_database_error("reading history failed"):
            rows = await self._pool.fetch(
                _HISTORY,
                user,
                before_seq if before_seq is not None else 2**63 - 1,
                type,
                unread_only,
                limit + 1,
            )
        return rows[:limit], len(rows) > limit

    async def prune_events(self, older_than_s: float) -> int:
        """
        Delete read/delete events older than ``older_than_s`` seconds.
        """
        with as_database_error("pruning old events failed"):
            status = await self._pool.execute(_PRUNE_EVENTS, older_than_s)
        return int(status.split()[-1])

    async def notify(self, payload: str) -> float:
        """
        Send a notification on notifyd's channel (the listener's probe);
        returns ``pg_notification_queue_usage()`` (0..1) as seen before it.
        """
        with as_database_error("sending a notification failed"):
            usage = await self._pool.fetchval(
                "SELECT pg_notification_queue_usage() FROM (SELECT pg_notify($1, $2)) AS sent",
                CHANNEL,
                payload,
            )
        return float(usage)

    async def insert_message(
        self,
        *,
        to_user: str,
        title: str | None,
        content: str | None,
        type: str | None = None,
        skip_url: str | None = None,
        send_user: str | None = None,
    ) -> str:
        """
        Insert one message as an application would; returns its id.
        """
        with as_database_error("insert failed"):
            try:
                message_id = await self._pool.fetchval(
                    _INSERT, to_user, title, content, type, skip_url, send_user
                )
            except asyncpg.UndefinedTableError:
                raise SchemaError(f"table {TABLE} does not exist: run `notifyd init-db`") from None
        return str(message_id)

    async def apply_schema(self, *, role: bool = False) -> None:
        """
        Run ``schema.sql`` (and ``role.sql`` with ``role``) in one
        transaction; both are idempotent.
        """
        with as_database_error("applying the schema failed"):
            async with self._pool.acquire() as connection, connection.transaction():
                await connection.execute(schema_sql())
                if role:
                    await connection.execute(role_sql())

    async def schema_problems(self) -> list[str]:
        """
        What is missing for delivery, in plain words; empty when all is well.
        """
        with as_database_error("checking the schema failed"):
            return await self._schema_problems()

    async def _schema_problems(self) -> list[str]:
        # The catalogs, not information_schema: the latter hides columns the
        # role has no rights on, which would read as "missing".
        columns = {
            r["attname"]
            for r in await self._pool.fetch(
                "SELECT attname FROM pg_attribute "
                "WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                TABLE,
            )
        }
        if not columns:
            return [f"table {TABLE} does not exist: run `notifyd init-db`"]
        problems = [
            f"column {TABLE}.{name} is missing: run `notifyd init-db`"
            for name in _REQUIRED_COLUMNS
            if name not in columns
        ]
        enabled = {
            r["tgname"]
            for r in await self._pool.fetch(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass AND tgenabled <> 'D'",
                TABLE,
            )
        }
        problems += [
            f"trigger {name} on {TABLE} is missing or disabled: run `notifyd init-db`"
            for name in _REQUIRED_TRIGGERS
            if name not in enabled
        ]
        for table in (RECEIPTS, EVENTS):
            if not await self._pool.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                problems.append(f"table {table} does not exist: run `notifyd init-db`")
        if problems:
            return problems
        allowed = await self._pool.fetchrow(_PRIVILEGES)
        if allowed is None:  # a SELECT without FROM always returns its row
            raise DatabaseError("the privilege check returned no row")
        missing = {
            "read_messages": f"SELECT on {TABLE}",
            "update_is_read": f"UPDATE (is_read) on {TABLE}",
            "receipts": f"SELECT and INSERT on {RECEIPTS}",
            "events": f"SELECT and DELETE on {EVENTS}",
        }
        problems += [
            f"the database role lacks {what}: apply role.sql (`notifyd init-db --role`)"
            for key, what in missing.items()
            if not allowed[key]
        ]
        return problems

    async def fetchval(self, query: str, *args: Any) -> Any:
        """
        Run a one-value query (for ``notifyd check`` and tests).
        """
        with as_database_error("query failed"):
            return await self._pool.fetchval(query, *args)

    async def revocation_arity(self, query: str) -> int:
        """
        How many parameters the operator's revocation query takes (1 or 2);
        preparing it at start turns a typo into a start-up error.

        Raises :class:`ConfigError` naming NOTIFYD_REVOCATION_SQL when
        Postgres refuses the query or it takes other parameters.
        """
        with as_database_error("checking NOTIFYD_REVOCATION_SQL failed"):
            try:
                async with self._pool.acquire() as connection:
                    # In a transaction of its own: asyncpg's prepare leaves
                    # the implicit one open, and with it a lock on the app's
                    # table that would block the app's DDL until the next
                    # query.
                    async with connection.transaction(readonly=True):
                        statement = await connection.prepare(query)
                        arity = len(statement.get_parameters())
            except asyncpg.PostgresError as exc:
                raise ConfigError(
                    f"NOTIFYD_REVOCATION_SQL is not usable: {describe(exc)}"
                ) from None
        if arity not in (1, 2):
            raise ConfigError(
                "NOTIFYD_REVOCATION_SQL must take $1 (the user id) and optionally $2 "
                f"(the token's claims as jsonb); it takes {arity} parameters"
            )
        return arity

    async def session_allowed(
        self, query: str, arity: int, user: str, claims: Mapping[str, Any]
    ) -> bool:
        """
        Run the revocation query: only a first column that is true allows
        the session (no row, NULL or false refuse it).
        """
        args: list[Any] = [user, json.dumps(claims, default=str)][:arity]
        with as_database_error("the revocation check failed"):
            return await self._pool.fetchval(query, *args) is True


def _event(data: dict[str, Any]) -> Event:
    inserted = data["inserted"]
    return Event(
        int(data["xact_id"]),
        data["to_user"],
        data["kind"],
        data["ids"],
        data["type"],
        data["readers"],
        None if inserted is None else int(inserted),
    )
