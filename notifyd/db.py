"""
All of notifyd's SQL, behind one small class over an asyncpg pool.

The LISTEN connection is not here: it is a dedicated connection owned by
:mod:`notifyd.listener`, because pools reset connections with ``UNLISTEN *``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

from .cursor import Cursor, Snapshot
from .exceptions import ConfigError, DatabaseError, ReplicaError, SchemaError

__all__ = ["CHANNEL", "Database", "Row", "schema_sql"]

logger = logging.getLogger(__name__)

CHANNEL = "notifyd"
TABLE = "t_message_real_time"

Row = asyncpg.Record

# Every column is cast to what the protocol sends, so an application's
# existing table with varchar or char columns is read the same way.
_COLUMNS = """
    seq, xact_id::text::bigint AS xact_id, id::text AS id, title::text AS title,
    content::text AS content, type::text AS type, send_user::text AS send_user,
    to_user::text AS to_user, send_time, skip_url::text AS skip_url,
    is_read::text AS is_read
"""

# Rows of transactions not visible in the previous snapshot ($1 = its xmax,
# $2 = its in-progress list): an exact, index-backed "what is new", however
# long another transaction holds the snapshot's xmin back.
_NEW_SINCE = "(xact_id >= $1::text::xid8 OR xact_id = ANY($2::text[]::xid8[]))"

# The first page also returns the statement's own snapshot: the rows read and
# the snapshot are one consistent view.
_WINDOW_FIRST = f"""
SELECT s.snap, m.*
FROM (SELECT pg_current_snapshot()::text AS snap) AS s
LEFT JOIN LATERAL (
    SELECT {_COLUMNS} FROM {TABLE}
    WHERE {_NEW_SINCE}
    ORDER BY seq
    LIMIT $3
) AS m ON true
"""

# Later pages of the same window: bounded by the first page's snapshot, so
# the window does not grow while it is being read.
_WINDOW_PAGE = f"""
SELECT {_COLUMNS} FROM {TABLE}
WHERE {_NEW_SINCE}
  AND seq > $3
  AND pg_visible_in_snapshot(xact_id, $4::text::pg_snapshot)
ORDER BY seq
LIMIT $5
"""

# One user's rows that a client at a cursor does not have and that the
# delivery snapshot $5 saw; newest first, so an overflow keeps the newest.
_CATCH_UP = f"""
SELECT b.i, m.*
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
     WITH ORDINALITY AS b(usr, base, fin, s0, i)
CROSS JOIN LATERAL (
    SELECT {_COLUMNS} FROM {TABLE}
    WHERE to_user = b.usr
      AND xact_id >= pg_snapshot_xmin(b.base::pg_snapshot)
      AND NOT pg_visible_in_snapshot(xact_id, b.base::pg_snapshot)
      AND NOT (b.fin IS NOT NULL AND seq <= b.s0
               AND pg_visible_in_snapshot(xact_id, b.fin::pg_snapshot))
      AND pg_visible_in_snapshot(xact_id, $5::text::pg_snapshot)
    ORDER BY seq DESC
    LIMIT $6
) AS m
"""

_INSERT = f"""
INSERT INTO {TABLE} (to_user, title, content, type, skip_url, send_user)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id::text
"""

_REQUIRED_COLUMNS = (
    "id", "title", "send_user", "to_user", "type", "content",
    "send_time", "skip_url", "is_read", "seq", "xact_id",
)  # fmt: skip


def schema_sql() -> str:
    """
    The schema shipped inside the package (the same file as the top-level
    ``schema.sql``).
    """
    return resources.files("notifyd").joinpath("schema.sql").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class Window:
    """
    One page of newly committed rows, in ``seq`` order.

    ``end`` is the snapshot that bounds the window; ``complete`` is true on
    its last page.
    """

    rows: list[Row]
    end: Snapshot
    complete: bool


class Database:
    """
    A small pool of query connections and the statements notifyd runs.

    Connection failures surface as :class:`DatabaseError`; nothing else
    escapes from asyncpg unwrapped except during shutdown.
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
                dsn, min_size=1, max_size=size, command_timeout=60
            )
        except ValueError as exc:  # asyncpg's verdict on a malformed DSN
            raise ConfigError(f"invalid NOTIFYD_DSN: {_describe(exc)}") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DatabaseError(f"cannot connect to the database: {_describe(exc)}") from None
        database = cls(pool)
        try:
            if await pool.fetchval("SELECT pg_is_in_recovery()"):
                raise ReplicaError(
                    "the database is a hot standby (in recovery): LISTEN cannot "
                    "work there; point NOTIFYD_DSN at the primary"
                )
        except BaseException:
            await database.close()
            raise
        return database

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
        return Snapshot.from_pg(await self._pool.fetchval("SELECT pg_current_snapshot()::text"))

    async def window(
        self, since: Snapshot, *, limit: int, end: Snapshot | None = None, after_seq: int = 0
    ) -> Window:
        """
        Rows committed after ``since``, in ``seq`` order, ``limit`` at a time.

        The first call (``end`` None) fixes the window's end snapshot; pass it
        back with the last ``seq`` read to get the next page.
        """
        xip = [str(x) for x in since.xip]
        if end is None:
            records = await self._pool.fetch(_WINDOW_FIRST, str(since.xmax), xip, limit)
            end = Snapshot.from_pg(records[0]["snap"])
            rows = [r for r in records if r["seq"] is not None]
        else:
            rows = await self._pool.fetch(
                _WINDOW_PAGE, str(since.xmax), xip, after_seq, end.to_pg(), limit
            )
        return Window(rows, end, complete=len(rows) < limit)

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
        records = await self._pool.fetch(
            _CATCH_UP, users, bases, ends, seqs, end.to_pg(), limit
        )
        result: list[list[Row]] = [[] for _ in requests]
        for record in records:
            result[record["i"] - 1].append(record)
        return result

    async def notify(self, payload: str) -> None:
        """
        Send a notification on notifyd's channel (the listener's probe).
        """
        await self._pool.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

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
        try:
            return await self._pool.fetchval(  # type: ignore[no-any-return]
                _INSERT, to_user, title, content, type, skip_url, send_user
            )
        except asyncpg.UndefinedTableError:
            raise SchemaError(f"table {TABLE} does not exist: run `notifyd init-db`") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DatabaseError(f"insert failed: {_describe(exc)}") from None

    async def apply_schema(self) -> None:
        """
        Run ``schema.sql`` in one transaction (it is idempotent).
        """
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                await connection.execute(schema_sql())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DatabaseError(f"applying the schema failed: {_describe(exc)}") from None

    async def schema_problems(self) -> list[str]:
        """
        What is missing for delivery, in plain words; empty when all is well.
        """
        columns = {
            r["column_name"]
            for r in await self._pool.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = $1 AND table_schema = current_schema()",
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
        triggers = await self._pool.fetchval(
            "SELECT count(*) FROM pg_trigger "
            "WHERE tgrelid = $1::regclass AND tgname = 'notifyd_wake_on_insert' "
            "AND tgenabled <> 'D'",
            TABLE,
        )
        if not triggers:
            problems.append(
                f"trigger notifyd_wake_on_insert on {TABLE} is missing or disabled: "
                "run `notifyd init-db`"
            )
        return problems

    async def fetchval(self, query: str, *args: Any) -> Any:
        """
        Run a one-value query (for ``notifyd check`` and tests).
        """
        return await self._pool.fetchval(query, *args)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

