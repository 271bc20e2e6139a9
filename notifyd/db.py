"""
All of notifyd's SQL, behind one small class over an asyncpg pool.

The LISTEN connection is not here: it is a dedicated connection owned by
:mod:`notifyd.listener`, because pools reset connections with ``UNLISTEN *``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any, TypeAlias, TypeVar

import asyncpg

from . import queries
from .backoff import backoff_delay
from .cursor import Cursor, Snapshot
from .exceptions import (
    ConfigError,
    DatabaseError,
    LineageChanged,
    ReplicaError,
    SchemaError,
    describe,
)
from .pacing import Lease
from .queries import CHANNEL, EVENTS, RECEIPTS, TABLE
from .replica import ReplicaPolicy, Route, Switch, format_lsn, parse_lsn, replayable
from .settings import Settings

__all__ = [
    "CHANNEL",
    "DATABASE_ERRORS",
    "Database",
    "Lineage",
    "LineageWatch",
    "OwnConnection",
    "Pool",
    "ReadReplica",
    "Row",
    "as_database_error",
    "connect_database",
    "named",
    "refuse_standby",
    "refuse_standby_at",
    "schema_sql",
]

logger = logging.getLogger(__name__)


Row = asyncpg.Record
_T = TypeVar("_T")

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


@contextlib.contextmanager
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


async def connect_database(settings: Settings, *, wait: bool) -> Database:
    """
    Open the query pool for ``settings``; with ``wait``, retry until
    Postgres is reachable.

    A hot standby is refused at once (:class:`ReplicaError`): retrying cannot
    help there.
    """
    if not settings.dsn:
        raise ConfigError("NOTIFYD_DSN is not set: give the PostgreSQL connection string")
    attempt = 0
    while True:
        try:
            return await Database.connect(
                settings.dsn,
                size=settings.pool_size,
                read_dsn=settings.read_dsn,
                read_max_lag_s=settings.read_max_lag_ms / 1000,
            )
        except ReplicaError:
            raise
        except DatabaseError as exc:
            if not wait:
                raise
            attempt += 1
            delay = backoff_delay(attempt, initial=0.5, maximum=settings.reconnect_max_s)
            logger.warning("%s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)


async def refuse_standby_at(dsn: str, where: str) -> None:
    """
    Raise :class:`ReplicaError` naming ``where`` when ``dsn`` reaches a hot
    standby. A server that cannot be reached is not an answer: that is left
    to whoever connects next, with its own retries.
    """
    try:
        connection = await asyncpg.connect(dsn, timeout=10)
    except (*DATABASE_ERRORS, TimeoutError):
        return
    try:
        await refuse_standby(connection, where)
    except ReplicaError:
        raise
    except DatabaseError:
        return
    finally:
        await connection.close()


def named(dsn: str, part: str) -> dict[str, str]:
    """
    asyncpg's ``server_settings`` that name a connection in
    ``pg_stat_activity`` (``notifyd`` or ``notifyd <part>``), unless the DSN
    names it already: a DBA can tell notifyd's backends, and what each is
    for, from the application's.
    """
    if "application_name" in dsn:
        return {}
    return {"application_name": f"notifyd {part}".strip()}


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
    costed on the table as it was then. notifyd's statements are first run
    against an empty or small table (a new deployment, a truncated one) and
    a generic plan made then is a sequential scan that Postgres keeps until
    the next ANALYZE: each read then walks the whole table, and the
    statement slows down as the table grows. With the parameters in hand
    the planner picks the index, at a fraction of a millisecond of planning
    per query. (The window reads, where that planning is most of the cost,
    have connections of their own: see :class:`WindowPlans`.) Set here
    rather than as a startup parameter, which poolers such as PgBouncer
    refuse.
    """
    await connection.execute("SET plan_cache_mode = force_custom_plan")


async def _plan_window_reads(connection: asyncpg.Connection, *, generic: bool) -> None:
    """
    Init hook of the window-read connections: reuse one plan per statement
    (``generic``) or plan every execution with its parameters, as
    :class:`WindowPlans` decided when the connection was opened.
    """
    mode = "force_generic_plan" if generic else "force_custom_plan"
    await connection.execute(f"SET plan_cache_mode = {mode}")


def index_bounded(
    plan: Mapping[str, Any], tables: Sequence[str], partial_indexes: Collection[str] = ()
) -> bool:
    """
    Whether every scan of ``tables`` in an EXPLAIN (FORMAT JSON) plan reads
    an index range (or a bitmap of index ranges, or all of a partial index)
    rather than the whole relation: no sequential scan, and no full index
    walked end to end with the window's condition left as a filter (the
    ``seq`` order could tempt a generic plan into that).
    """
    for node in _plan_nodes(plan):
        if node.get("Relation Name") not in tables:
            continue
        kind = node["Node Type"]
        if kind in ("Index Scan", "Index Only Scan") and (
            "Index Cond" in node or node.get("Index Name") in partial_indexes
        ):
            continue
        if kind == "Bitmap Heap Scan":
            continue  # its Bitmap Index Scans below carry index conditions
        return False
    return True


def _plan_nodes(node: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)


_probe_names = itertools.count()

# How often the window reads' plan mode is decided again: a check plans
# both window statements once more, a few milliseconds of Postgres CPU.
WINDOW_PLAN_CHECK_S = 10.0

# The window statements, each with arguments for the probe of its generic
# plan (the values do not matter: a generic plan ignores them).
_WINDOW_PROBES = (
    (queries.WINDOW_LEAN, "'1:1:', '{}', 100, NULL"),
    (queries.WINDOW_FIRST, "'1:1:', '{}', 100, '{}', NULL"),
)


class WindowPlans:
    """
    The connections that read delivery's windows, and whether they reuse
    one plan per statement.

    A window read is planned in about three times the time it takes to run
    it. Postgres would reuse a generic plan after five executions of a
    prepared statement, but one made before the table has statistics (a new
    or truncated table, before autovacuum's first ANALYZE) can be a
    sequential scan, kept until the next ANALYZE while the table grows. So
    these connections plan every execution until the message table has been
    analyzed and the generic plans of both window statements reach the
    message and event tables only through index ranges; the verdict is
    taken again every WINDOW_PLAN_CHECK_S (an ANALYZE invalidates cached
    plans, so a table that changed shape is replanned anyway), and a
    changed one replaces the connections as they are next released.
    """

    def __init__(self) -> None:
        self.generic = False
        self._due = 0.0
        # The window-read connections (replaced when the verdict changes),
        # and the pool the check runs on.
        self._windows: Pool | None = None
        self._checks: Pool | None = None
        self._checking: asyncio.Task[bool] | None = None

    async def init(self, connection: asyncpg.Connection) -> None:
        await _plan_window_reads(connection, generic=self.generic)

    def attach(self, windows: Pool, checks: Pool) -> None:
        self._windows = windows
        self._checks = checks

    def check_if_due(self) -> None:
        """
        Start the check in the background when it is due. The read that
        asked goes on in the plan mode in force: awaited before it, the
        check's ten or so round trips (4.8 ms, median of 30 on a table of
        100,000 rows) held back one message every WINDOW_PLAN_CHECK_S.
        """
        if time.monotonic() < self._due:
            return
        if self._checking is not None and not self._checking.done():
            return
        self._due = time.monotonic() + WINDOW_PLAN_CHECK_S
        self._checking = asyncio.create_task(self.check(), name="window-plan-check")

    async def stop(self) -> None:
        """
        Cancel a check in progress.
        """
        if self._checking is not None:
            self._checking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checking

    async def check(self) -> bool:
        """
        Decide again whether window reads reuse a generic plan; returns the
        verdict.
        """
        assert self._windows is not None and self._checks is not None
        self._due = time.monotonic() + WINDOW_PLAN_CHECK_S
        try:
            async with self._checks.transaction(readonly=True) as connection:
                generic = await self._generic_is_safe(connection)
        except (*DATABASE_ERRORS, DatabaseError) as exc:
            # Planning every read is always safe; the window reads meet the
            # same trouble, if any, and report it.
            logger.warning("checking the window reads' plans failed: %s", describe(exc))
            generic = False
        if generic != self.generic:
            self.generic = generic
            logger.info(
                "window reads now %s", "reuse their plans" if generic else "plan every read"
            )
            await self._windows.renew()
        return generic

    @staticmethod
    async def _generic_is_safe(connection: PooledConnection) -> bool:
        # reltuples is -1 until the first VACUUM or ANALYZE.
        analyzed = {
            record["relname"]: record["analyzed"]
            for record in await connection.fetch(
                "SELECT relname, reltuples >= 0 AS analyzed FROM pg_class "
                "WHERE oid = ANY(ARRAY[$1::regclass, $2::regclass])",
                TABLE,
                EVENTS,
            )
        }
        if not analyzed[TABLE]:
            return False
        partial_indexes = {
            record["relname"]
            for record in await connection.fetch(
                "SELECT c.relname FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = ANY(ARRAY[$1::regclass, $2::regclass]) "
                "AND i.indpred IS NOT NULL",
                TABLE,
                EVENTS,
            )
        }
        # A PREPAREd statement under force_generic_plan: its EXPLAIN EXECUTE
        # shows the plan a reused one would run (EXPLAIN (GENERIC_PLAN)
        # needs PostgreSQL 16). Inside the transaction, which ends with it.
        await connection.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        for query, probe_args in _WINDOW_PROBES:
            # A name of its own each time: a PREPARE outlives the transaction
            # of a probe that failed before its DEALLOCATE.
            name = f"notifyd_window_probe_{next(_probe_names)}"
            await connection.execute(f"PREPARE {name} AS {query}")
            explained = await connection.fetchval(
                f"EXPLAIN (FORMAT JSON) EXECUTE {name}({probe_args})"
            )
            await connection.execute(f"DEALLOCATE {name}")
            plan = json.loads(explained)[0]["Plan"]
            if not index_bounded(plan, (TABLE,), partial_indexes):
                return False
            # The event table stays small (events are pruned) and may be
            # read whole when its statistics say it is tiny: the ANALYZE
            # that autovacuum runs as it grows replans the statement. Never
            # analyzed, it must be read by index.
            if not analyzed[EVENTS] and not index_bounded(plan, (EVENTS,), partial_indexes):
                return False
        return True


# What a client waits for at most when its action needs the database (read,
# unread, delete, read_all, history): a free pooled connection, a lock on a
# table (an application's ALTER TABLE holds ACCESS EXCLUSIVE until it
# commits), the statement itself, and the whole exchange (a server that
# answers nothing). Past any of them the client is answered `unavailable`,
# at once instead of after the lock, and nothing queues up behind it.
CLIENT_ACQUIRE_S = 1.0
CLIENT_LOCK_TIMEOUT_MS = 1000
CLIENT_STATEMENT_TIMEOUT_MS = 3000
CLIENT_BUDGET_S = 5.0

# Transaction-local settings, one round trip for all of them.
_SET_LOCAL = (
    "SELECT set_config(name, value, true) FROM unnest($1::text[], $2::text[]) AS s(name, value)"
)


def _never_sent(exc: BaseException) -> bool:
    """
    Whether a statement failed because the server had already ended its
    pooled connection while it was idle, so that the statement never ran:
    safe to run again elsewhere, whatever it does.

    When the server ends an idle connection (a failover's shutdown,
    ``pg_terminate_backend``, ``idle_session_timeout``) it sends a FATAL
    error and closes. asyncpg reads the error as soon as it arrives and
    parks the connection in its error state, but only counts it closed when
    it reads the end of the stream, a moment later. A statement started in
    between fails at once with "cannot switch to state N; another
    operation (2) is in progress", with nothing sent. A statement sent
    before the FATAL arrived fails with it; only ``idle_session_timeout``
    says that the session was idle (the others may have ended a statement
    that was running, and a commit's fate would be unknown).
    """
    if isinstance(exc, asyncpg.InternalClientError):
        return str(exc).startswith("cannot switch to state")
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        return isinstance(exc.__cause__, asyncpg.IdleSessionTimeoutError)
    return isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)


def _drop(connection: PooledConnection) -> None:
    """
    Close a dead pooled connection, so that the pool opens a new one in its
    place; one whose loss asyncpg has already noticed is back in the pool.
    """
    with contextlib.suppress(asyncpg.InterfaceError):
        connection.terminate()


class _Lease:
    """
    ``ConnectionSet.acquire()``: a connection for the ``async with`` block.
    """

    __slots__ = ("_connection", "_set", "_timeout")

    def __init__(self, connections: ConnectionSet, timeout: float | None) -> None:
        self._set = connections
        self._timeout = timeout
        self._connection: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        self._connection = await self._set.take(self._timeout)
        return self._connection

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        connection, self._connection = self._connection, None
        assert connection is not None  # set by __aenter__
        # After a failure or a cancellation the connection may still be busy
        # (a cancel request in flight, a transaction open): not handed out again.
        self._set.give(connection, reuse=kind is None)


class ConnectionSet:
    """
    A few connections kept for one hot statement, in place of asyncpg's pool.

    asyncpg's acquire and release cost a task (the release is shielded) and
    several turns of the event loop per statement, paid by every window
    read: an empty window read took 295 µs of notifyd's CPU through the
    pool and 213 µs through this (medians of 4 alternating runs of 3,000).
    Here an idle connection is handed out and taken back without awaiting
    anything; ``connect`` opens (and initialises) a new one when none is
    idle and fewer than ``size`` are open, and callers beyond that wait for
    one to come back.
    """

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], size: int) -> None:
        self._connect = connect
        self._size = size
        self._idle: list[asyncpg.Connection] = []
        self._open: set[asyncpg.Connection] = set()
        self._opening = 0
        self._stale: set[asyncpg.Connection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def get_max_size(self) -> int:
        return self._size

    def acquire(self, *, timeout: float | None = None) -> _Lease:
        """
        ``async with connections.acquire() as connection``; with ``timeout``,
        waiting longer than that for a free one raises :class:`TimeoutError`.
        """
        return _Lease(self, timeout)

    async def take(self, timeout: float | None = None) -> asyncpg.Connection:
        """
        An idle connection, a new one, or the next one given back.
        """
        if timeout is None:
            return await self._take()
        async with asyncio.timeout(timeout):
            return await self._take()

    async def _take(self) -> asyncpg.Connection:
        while True:
            if self._closed:
                raise asyncpg.InterfaceError("pool is closed")
            while self._idle:
                connection = self._idle.pop()
                if not connection.is_closed():
                    return connection
                self._open.discard(connection)
            if len(self._open) + self._opening < self._size:
                self._opening += 1
                try:
                    connection = await self._connect()
                finally:
                    self._opening -= 1
                self._open.add(connection)
                return connection
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the turn passes on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise

    def give(self, connection: asyncpg.Connection, *, reuse: bool = True) -> None:
        """
        Take back a connection; one that is closed, failed (``reuse``
        false), renewed meanwhile or given back after :meth:`close` is
        closed instead of kept.
        """
        if self._closed or not reuse or connection in self._stale or connection.is_closed():
            self._stale.discard(connection)
            self._open.discard(connection)
            connection.terminate()
        else:
            self._idle.append(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def expire_connections(self) -> None:
        """
        Replace every connection: the idle ones now, the others when given back.
        """
        idle, self._idle = self._idle, []
        for connection in idle:
            self._open.discard(connection)
            await connection.close()
        self._stale |= self._open

    async def close(self) -> None:
        """
        Close the idle connections; the others are closed when given back.
        """
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        idle, self._idle = self._idle, []
        for connection in idle:
            self._open.discard(connection)
            try:
                await connection.close(timeout=2)
            except Exception:
                connection.terminate()

    def terminate(self) -> None:
        self._closed = True
        for connection in (*self._idle, *self._open):
            connection.terminate()
        self._idle.clear()
        self._open.clear()


# Pooled sessions are replaced at most this often while writes are refused
# as read-only: each refusal would otherwise cost every connection a reconnect.
_RENEW_EVERY_S = 1.0


# A connection as a pool hands it out: asyncpg's pool wraps it in a proxy,
# a ConnectionSet does not.
PooledConnection: TypeAlias = "asyncpg.Connection | asyncpg.pool.PoolConnectionProxy[Row]"


class Pool:
    """
    asyncpg's pool (or a :class:`ConnectionSet`), minus its connections that
    the server has already closed.

    A statement that asyncpg refuses to start because the server ended its
    connection (see :func:`_never_sent`) is run again on another one, the
    dead one dropped; at most once per connection in the pool, so a
    failover that ended all of them costs no failed statement when the
    server is back. Anything else is raised as asyncpg raised it.
    """

    def __init__(self, pool: asyncpg.Pool | ConnectionSet) -> None:
        self._pool = pool
        self._renewed_at = -_RENEW_EVERY_S

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        rows: list[Row] = await self._run("fetch", query, args)
        return rows

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._run("fetchval", query, args)

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        row: Row | None = await self._run("fetchrow", query, args)
        return row

    async def execute(self, query: str, *args: Any) -> str:
        status: str = await self._run("execute", query, args)
        return status

    def acquire(self) -> Any:
        """
        asyncpg's ``acquire()``: a connection as it comes, for callers that
        start with a statement of their own (prefer :meth:`transaction`).
        """
        return self._pool.acquire()

    @contextlib.asynccontextmanager
    async def transaction(
        self, *, readonly: bool = False, acquire_timeout: float | None = None
    ) -> AsyncIterator[PooledConnection]:
        """
        A pooled connection inside a transaction that has begun (committed
        on exit, rolled back on an exception); a dead connection is found
        by the BEGIN and replaced. With ``acquire_timeout``, waiting longer
        than that for a free connection raises :class:`DatabaseError`.
        """
        for attempt in range(self._pool.get_max_size() + 1):
            async with contextlib.AsyncExitStack() as stack:
                try:
                    connection: PooledConnection = await stack.enter_async_context(
                        self._pool.acquire(timeout=acquire_timeout)
                    )
                except TimeoutError:
                    raise DatabaseError(
                        f"no database connection free within {acquire_timeout:g}s"
                    ) from None
                try:
                    await stack.enter_async_context(connection.transaction(readonly=readonly))
                except Exception as exc:
                    if not _never_sent(exc) or attempt == self._pool.get_max_size():
                        raise
                    _drop(connection)
                    continue
                try:
                    yield connection
                except asyncpg.ReadOnlySQLTransactionError:
                    await self._renew_sessions()
                    raise
                return

    async def close(self) -> None:
        await self._pool.close()

    def terminate(self) -> None:
        self._pool.terminate()

    async def renew(self) -> None:
        """
        Replace every connection as it is next released (its init hook runs
        again on the new one).
        """
        await self._pool.expire_connections()

    async def _renew_sessions(self) -> None:
        """
        A write was refused as read-only (``default_transaction_read_only``
        on, or a standby reached by mistake): replace every pooled
        connection as it is next released, so that once the database
        accepts writes again (or the DSN leads to the primary) the next
        session sees it, instead of connections that were opened read-only
        refusing writes for good. At most once per _RENEW_EVERY_S.
        """
        now = time.monotonic()
        if now - self._renewed_at >= _RENEW_EVERY_S:
            self._renewed_at = now
            await self._pool.expire_connections()

    async def _run(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        for attempt in range(self._pool.get_max_size() + 1):
            async with self._pool.acquire() as connection:
                try:
                    return await getattr(connection, method)(query, *args)
                except asyncpg.ReadOnlySQLTransactionError:
                    await self._renew_sessions()
                    raise
                except Exception as exc:
                    if not _never_sent(exc) or attempt == self._pool.get_max_size():
                        raise
                    _drop(connection)
        raise AssertionError("unreachable")  # the last attempt returns or raises


def role_sql() -> str:
    """
    The least-privilege role for the daemon (``role.sql``).
    """
    return resources.files("notifyd").joinpath("role.sql").read_text("utf-8")


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
    its last page. The first page also carries the window's events (the
    withdrawals of what expired among them) and the unread counts taken at
    ``end``, the clock they were taken at (``now()`` of its statement: no row
    past its ``expire_at`` at ``clock`` is in the window) and the next
    ``expire_at`` after it, if any; and the polling lease as the same
    statement saw it (None on later pages).
    """

    rows: list[Row]
    end: Snapshot
    complete: bool
    events: list[Event] = field(default_factory=list)
    # user -> category -> unread count, at ``end``.
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    clock: datetime | None = None
    next_expiry: datetime | None = None
    lease: Lease | None = None


# How often a read waiting for the standby asks how far it has replayed:
# every 2 ms while a replay may be a moment away (a commit the standby
# received with the primary's flush), then every 20 ms, so a commit held
# back by the primary's WAL writer (synchronous_commit off: up to
# wal_writer_delay, 200 ms) costs about 20 questions, not a hundred.
_REPLAY_POLL_S = 0.002
_REPLAY_POLL_SLOW_S = 0.02
_REPLAY_POLL_FAST_FOR_S = 0.02
# Whether a server is a standby, and of which cluster.
_STANDBY_IDENTITY = (
    "SELECT pg_is_in_recovery() AS standby, "
    "(SELECT system_identifier FROM pg_control_system())::text AS cluster"
)
# The WAL page and segment sizes, for notifyd.replica.replayable.
_WAL_GEOMETRY = (
    "SELECT current_setting('wal_block_size')::bigint AS block, "
    "pg_size_bytes(current_setting('wal_segment_size')) AS segment"
)


async def _check_standby(connection: asyncpg.Connection, cluster: str) -> None:
    """
    Raise :class:`ReplicaError` unless ``connection`` reaches a hot standby
    of the cluster whose system identifier is ``cluster``: reads anywhere
    else would be silently wrong.
    """
    identity = await connection.fetchrow(_STANDBY_IDENTITY)
    assert identity is not None  # a SELECT without FROM always returns its row
    if not identity["standby"]:
        raise ReplicaError(
            "NOTIFYD_READ_DSN is not a hot standby (pg_is_in_recovery() is false): "
            "name a streaming standby of NOTIFYD_DSN's cluster, or unset it"
        )
    if identity["cluster"] != cluster:
        raise ReplicaError(
            f"NOTIFYD_READ_DSN is a standby of another cluster (system identifier "
            f"{identity['cluster']}, NOTIFYD_DSN's is {cluster}): name a standby of "
            "NOTIFYD_DSN's cluster"
        )


class ReadReplica:
    """
    The hot standby that serves reads (``NOTIFYD_READ_DSN``), and whether it
    may serve one now (:class:`~notifyd.replica.ReplicaPolicy`).

    Every new connection to it is checked to be a standby of the primary's
    cluster; one that cannot be reached, lags past the bound or fails a read
    is bypassed (one log line on each switch), and asked again in the
    background, so that a bypassed standby never holds a read up.
    """

    def __init__(
        self, pool: asyncpg.Pool, policy: ReplicaPolicy, *, block_size: int, segment_size: int
    ) -> None:
        self._pool = Pool(pool)
        self.policy = policy
        self._block_size = block_size
        self._segment_size = segment_size
        self._check: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, dsn: str, primary: Pool, *, max_lag_s: float) -> ReadReplica:
        """
        Open the standby's pool. Raises :class:`ReplicaError` when the server
        answers but is not a standby of the primary's cluster; one that does
        not answer is logged and waited for (reads go to the primary).
        """
        with as_database_error("asking the primary for its identity failed"):
            cluster = str(
                await primary.fetchval("SELECT system_identifier FROM pg_control_system()")
            )
            geometry = await primary.fetchrow(_WAL_GEOMETRY)
        assert geometry is not None  # a SELECT without FROM always returns its row

        async def init(connection: asyncpg.Connection) -> None:
            await _check_standby(connection, cluster)
            await connection.execute("SET plan_cache_mode = force_custom_plan")

        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=0,
                max_size=3,
                timeout=10,
                command_timeout=60,
                server_settings=named(dsn, "standby reads"),
                init=init,
                reset=_keep_session,
            )
        except ValueError as exc:  # asyncpg's verdict on a malformed DSN
            raise ConfigError(f"invalid NOTIFYD_READ_DSN: {describe(exc)}") from None
        replica = cls(
            pool,
            ReplicaPolicy(max_lag_s),
            block_size=int(geometry["block"]),
            segment_size=int(geometry["segment"]),
        )
        try:
            await replica._replayed()
        except ReplicaError:
            await replica.close()
            raise
        except DatabaseError as exc:
            logger.warning("%s; reads go to the primary until it answers", exc)
        return replica

    async def problem(self) -> str | None:
        """
        What keeps the standby from serving reads now, if anything (for
        ``notifyd check``).
        """
        try:
            await self._replayed()
        except DatabaseError as exc:
            return str(exc)
        return None

    def target(self, insert_lsn: str) -> int:
        """
        The replay position that covers the primary's insert position
        ``insert_lsn`` (text).
        """
        return replayable(
            parse_lsn(insert_lsn), block_size=self._block_size, segment_size=self._segment_size
        )

    async def pool_for(self, target: int) -> Pool | None:
        """
        The standby's pool once it has replayed ``target``; None: read on
        the primary (bypassed, or it did not get there within the bound).
        """
        policy = self.policy
        started = time.monotonic()
        route = policy.route(target, started)
        if route is Route.STANDBY:
            return self._pool
        if route is not Route.WAIT:
            if route is Route.CHECK and self._check is None:
                self._check = asyncio.create_task(self._check_caught_up(target))
            return None
        reached, reason = await self._wait_for(target, policy.wait_limit(route))
        waited = time.monotonic() - started
        if not reached:
            self.failed(reason, waited)
            return None
        self._log(policy.reached(waited))
        return self._pool

    async def _wait_for(self, target: int, limit: float) -> tuple[bool, str]:
        """
        Whether the standby replays ``target`` within ``limit`` seconds, and
        if not, why.
        """
        started = time.monotonic()
        deadline = started + limit
        while True:
            try:
                async with asyncio.timeout_at(_loop_time(deadline + 1.0)):
                    replayed = await self._replayed()
            except TimeoutError:
                return False, "did not answer in time"
            except DatabaseError as exc:
                return False, str(exc)
            if replayed >= target:
                return True, ""
            if time.monotonic() >= deadline:
                return False, (
                    f"has not replayed the primary's {format_lsn(target)} within "
                    f"{limit:g}s (it is at {format_lsn(replayed)})"
                )
            fast = time.monotonic() - started < _REPLAY_POLL_FAST_FOR_S
            await asyncio.sleep(_REPLAY_POLL_S if fast else _REPLAY_POLL_SLOW_S)

    def failed(self, reason: str, waited_s: float = 0.0) -> None:
        """
        A read could not be served by the standby: bypass it.
        """
        self._log(self.policy.missed(waited_s, time.monotonic()), reason)

    async def close(self) -> None:
        if self._check is not None:
            self._check.cancel()
        try:
            await self._pool.close()
        except Exception:
            self._pool.terminate()

    async def _replayed(self) -> int:
        """
        How far the standby has replayed; :class:`ReplicaError` when it is
        no longer a standby (promoted), :class:`DatabaseError` when it
        cannot be asked.
        """
        with as_database_error("NOTIFYD_READ_DSN cannot be reached"):
            row = await self._pool.fetchrow(
                "SELECT pg_is_in_recovery() AS standby, pg_last_wal_replay_lsn()::text AS lsn"
            )
        assert row is not None  # a SELECT without FROM always returns its row
        if not row["standby"] or row["lsn"] is None:
            await self._pool.renew()
            raise ReplicaError("NOTIFYD_READ_DSN is no longer a hot standby")
        replayed = parse_lsn(row["lsn"])
        self.policy.observed(replayed)
        return replayed

    async def _check_caught_up(self, target: int) -> None:
        """
        Wait (in the background, up to the lag bound) for a bypassed standby
        to replay ``target``: used again once it has.
        """
        try:
            reached, _ = await self._wait_for(target, self.policy.max_lag_s)
        finally:
            self._check = None
        if reached:
            self._log(self.policy.reached(0.0))
        else:
            self.policy.missed(0.0, time.monotonic())

    @staticmethod
    def _log(switch: Switch | None, reason: str = "") -> None:
        if switch is Switch.BYPASSED:
            logger.warning("reads go to the primary: the standby (NOTIFYD_READ_DSN) %s", reason)
        elif switch is Switch.RESUMED:
            logger.info("reads go to the standby (NOTIFYD_READ_DSN): it has replayed the primary")


def _loop_time(monotonic: float) -> float:
    """
    A ``time.monotonic()`` instant on the event loop's clock.
    """
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic - time.monotonic())


@dataclass(frozen=True, slots=True)
class Lineage:
    """
    A database's history: its cluster and the timeline it writes on.
    """

    cluster: str
    timeline: str


class LineageWatch:
    """
    The history each new pooled connection finds, against the one delivery's
    snapshots come from.

    A promotion (or a restore) starts a new timeline, and a failover that
    lost the old primary's last commits hands their transaction ids out
    again (:mod:`notifyd.recall`). From the first connection that finds a
    new history until delivery has repaired that (:mod:`notifyd.failover`)
    and called :meth:`accept`, new connections are refused with
    :class:`LineageChanged`: no window is read and no cursor resumed against
    the new history before then. The old history's connections are gone by
    then (its server is).
    """

    def __init__(self) -> None:
        self.known: Lineage | None = None
        self.changed: Lineage | None = None
        # Why the history cannot be told, when the server will not say (a
        # managed service without pg_current_wal_lsn(), a role refused
        # pg_control_system()): no failover is then repaired.
        self.unknowable: str | None = None

    async def check(self, connection: asyncpg.Connection) -> None:
        """
        Pool init hook: note the history of a new connection; raises
        :class:`LineageChanged` while a change awaits its repair.
        """
        if self.unknowable is not None:
            return
        try:
            record = await connection.fetchrow(queries.LINEAGE)
        except asyncpg.PostgresError as exc:
            self.unknowable = describe(exc)
            logger.warning(
                "cannot tell the database's timeline (%s): a failover that loses "
                "transactions will not be repaired (docs/deployment.md, "
                '"What asynchronous replication can lose")',
                self.unknowable,
            )
            return
        assert record is not None  # a SELECT without FROM always returns its row
        if record["timeline"] is None:
            return  # a standby, refused elsewhere (refuse_standby) with its own words
        found = Lineage(record["cluster"], record["timeline"])
        if self.known is None:
            self.known = found
        elif found != self.known:
            self.changed = found
        if self.changed is not None:
            raise LineageChanged(
                f"the database's history changed ({self.describe()}); "
                "repairing before reading again"
            )

    @property
    def another_cluster(self) -> bool:
        """
        Whether the change awaiting repair is to another cluster altogether
        (another system identifier), not a new timeline of the same one.
        """
        known, changed = self.known, self.changed
        return known is not None and changed is not None and known.cluster != changed.cluster

    def describe(self) -> str:
        """
        The change awaiting repair, in words (for logs).
        """
        known, changed = self.known, self.changed
        if known is None or changed is None:
            return "no change"
        if known.cluster != changed.cluster:
            return f"another cluster: system identifier {known.cluster} -> {changed.cluster}"
        return f"timeline {int(known.timeline, 16)} -> {int(changed.timeline, 16)}"

    def accept(self) -> None:
        """
        The change is repaired: connections to the new history are let in.
        """
        if self.changed is not None:
            self.known, self.changed = self.changed, None


class Database:
    """
    A small pool of query connections and the statements notifyd runs.

    Every method raises :class:`DatabaseError` (or a subclass) when Postgres
    is unreachable or refuses a statement: nothing escapes from asyncpg
    unwrapped, so callers catch that alone.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        windows: ConnectionSet,
        plans: WindowPlans,
        *,
        dsn: str,
        lineage: LineageWatch,
    ) -> None:
        self._pool = Pool(pool)
        self._dsn = dsn
        # Which history the pools' connections must find (see LineageWatch).
        self.lineage = lineage
        # Reads on a hot standby (NOTIFYD_READ_DSN), when configured; the
        # replay position that covers each recent window end (a read bounded
        # by one goes to the standby once it has replayed that far), and
        # the last window's, below which history never reads.
        self._replica: ReadReplica | None = None
        self._ends: OrderedDict[Snapshot, int] = OrderedDict()
        self._delivered = 0
        # Window reads on connections of their own: their plan mode is not
        # the one every other statement needs (see WindowPlans).
        self._windows = Pool(windows)
        self._plans = plans
        plans.attach(self._windows, self._pool)

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        size: int = 4,
        read_dsn: str | None = None,
        read_max_lag_s: float = 2.0,
    ) -> Database:
        """
        Open the pool (and the standby's for reads, with ``read_dsn``);
        raises :class:`DatabaseError` when Postgres cannot be reached and
        :class:`ReplicaError` when it is a hot standby, or ``read_dsn`` is a
        server but not a standby of its cluster.
        """
        plans = WindowPlans()
        lineage = LineageWatch()

        async def init_query(connection: asyncpg.Connection) -> None:
            await _plan_per_execution(connection)
            await lineage.check(connection)

        async def open_window_reads() -> asyncpg.Connection:
            connection = await asyncpg.connect(
                dsn, command_timeout=60, server_settings=named(dsn, "window reads")
            )
            try:
                await plans.init(connection)
                await lineage.check(connection)
            except BaseException:
                connection.terminate()
                raise
            return connection

        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=size,
                command_timeout=60,
                server_settings=named(dsn, ""),
                init=init_query,
                reset=_keep_session,
            )
        except ValueError as exc:  # asyncpg's verdict on a malformed DSN
            raise ConfigError(f"invalid NOTIFYD_DSN: {describe(exc)}") from None
        except DATABASE_ERRORS as exc:
            raise DatabaseError(f"cannot connect to the database: {describe(exc)}") from exc
        try:
            # Two: the window being read and the next one, prefetched; the
            # first opened now, so that a bad DSN fails here.
            windows = ConnectionSet(open_window_reads, size=2)
            windows.give(await windows.take())
        except DATABASE_ERRORS as exc:
            pool.terminate()
            raise DatabaseError(f"cannot connect to the database: {describe(exc)}") from exc
        database = cls(pool, windows, plans, dsn=dsn, lineage=lineage)
        try:
            await refuse_standby(pool, "NOTIFYD_DSN")
            if read_dsn:
                database._replica = await ReadReplica.open(
                    read_dsn, database._pool, max_lag_s=read_max_lag_s
                )
        except BaseException:
            await database.close()
            raise
        return database

    @property
    def read_replica(self) -> ReplicaPolicy | None:
        """
        Where reads go when a standby is configured (for metrics and tests).
        """
        return None if self._replica is None else self._replica.policy

    @property
    def pool(self) -> Pool:
        """
        The pool, for modules that keep their own statements
        (:mod:`notifyd.dispatch`).
        """
        return self._pool

    @property
    def window_pool(self) -> Pool:
        """
        The connections that read delivery's windows.
        """
        return self._windows

    @property
    def window_plans(self) -> WindowPlans:
        """
        Whether window reads reuse their plans (and the check that decides).
        """
        return self._plans

    async def close(self) -> None:
        """
        Close the pools, aborting connections that do not close in time.
        """
        await self._plans.stop()
        if self._replica is not None:
            await self._replica.close()
        for pool in (self._windows, self._pool):
            try:
                await pool.close()
            except Exception:
                pool.terminate()

    async def own_connection(
        self, part: str, *, statement_timeout: float, lock_timeout: float
    ) -> OwnConnection:
        """
        A session of its own on the primary, outside the pools (their
        connections may be refused meanwhile: see :class:`LineageWatch`),
        named ``notifyd <part>``. ``lock_timeout`` must be shorter than
        ``statement_timeout``: a lock not obtained is then the server's
        answer (a lock wait that reports False), not the client's cancel.
        """
        assert lock_timeout < statement_timeout
        return await OwnConnection.open(
            self._dsn,
            application_name=named(self._dsn, part).get("application_name", "notifyd"),
            settings={"lock_timeout": str(round(lock_timeout * 1000))},
            statement_timeout=statement_timeout,
            what=f"{part} connection",
        )

    async def read_replica_problem(self) -> str | None:
        """
        What keeps the standby (``NOTIFYD_READ_DSN``) from serving reads now;
        None when it can, or when none is configured.
        """
        return None if self._replica is None else await self._replica.problem()

    def _remember(self, end: Snapshot, target: int) -> None:
        """
        Every commit ``end`` saw is replayed on a standby at ``target``.
        """
        self._ends[end] = target
        self._ends.move_to_end(end)
        while len(self._ends) > 16:
            self._ends.popitem(last=False)
        self._delivered = max(self._delivered, target)

    async def _read(self, target: int | None, read: Callable[[Pool], Awaitable[_T]]) -> _T:
        """
        ``read`` on the standby once it has replayed ``target``, else (no
        standby, no target, bypassed, or the read failed there) on the
        primary.
        """
        if self._replica is not None and target is not None:
            pool = await self._replica.pool_for(target)
            if pool is not None:
                try:
                    return await read(pool)
                except (*DATABASE_ERRORS, DatabaseError) as exc:
                    self._replica.failed(f"failed a read ({describe(exc)})")
        return await read(self._pool)

    async def _note_write(self, user: str) -> None:
        """
        After ``user``'s write: that user's next reads on the standby wait
        for it (read-your-writes).
        """
        if self._replica is None:
            return
        target: int | None
        try:
            with as_database_error("taking the WAL position failed"):
                target = self._replica.target(
                    await self._pool.fetchval(f"SELECT {queries.INSERT_LSN}")
                )
        except DatabaseError:
            target = None  # the primary serves this user for a while
        self._replica.policy.wrote(user, target, time.monotonic())

    async def snapshot(self) -> Snapshot:
        """
        The current snapshot: everything committed so far is visible in it.
        """
        return (await self.snapshot_and_clock())[0]

    async def snapshot_and_clock(self) -> tuple[Snapshot, datetime]:
        """
        The current snapshot and the database's clock (``now()``) with it.
        """
        with as_database_error("reading the current snapshot failed"):
            record = await self._pool.fetchrow(
                "SELECT pg_current_snapshot()::text AS snap, now() AS clock"
            )
        assert record is not None  # a SELECT without FROM always returns its row
        return Snapshot.from_pg(record["snap"]), record["clock"]

    async def window(
        self,
        since: Snapshot,
        *,
        limit: int,
        count_users: Sequence[str] = (),
        swept_to: datetime | None = None,
    ) -> Window:
        """
        The first ``limit`` rows committed after ``since``, in ``seq`` order,
        leaving out those already past their ``expire_at``.

        This fixes the window's end snapshot and clock and also returns the
        window's events, the withdrawals of rows ``since`` saw whose
        ``expire_at`` passed after ``swept_to`` (the previous window's clock;
        None: none are withdrawn), and the unread counts of the users with
        either and of ``count_users``; when the page is full,
        :meth:`window_rest` reads the rest.
        """
        xip = [str(x) for x in since.xip]
        with as_database_error("reading new rows failed"):
            self._plans.check_if_due()
            if self._replica is not None and not count_users:
                lean = await self._window_at_head(since, xip, limit, swept_to)
                if lean is not None:
                    return lean
            elif not count_users:
                records = await self._windows.fetch(
                    queries.WINDOW_LEAN, since.to_pg(), xip, limit, swept_to
                )
                head = next(r for r in records if r["snap"] is not None)
                next_expiry = head["next_expiry"]
                if not head["has_events"] and not (
                    next_expiry is not None and next_expiry <= head["clock"]
                ):
                    rows = sorted((r for r in records if r["snap"] is None), key=lambda r: r["seq"])
                    return Window(
                        rows,
                        Snapshot.from_pg(head["snap"]),
                        complete=len(rows) < limit,
                        clock=head["clock"],
                        next_expiry=next_expiry,
                        lease=_lease(head),
                    )
            records = await self._windows.fetch(
                queries.WINDOW_FIRST, since.to_pg(), xip, limit, list(count_users), swept_to
            )
        head = next(r for r in records if r["snap"] is not None)
        rows = sorted((r for r in records if r["snap"] is None), key=lambda r: r["seq"])
        end = Snapshot.from_pg(head["snap"])
        if self._replica is not None:
            self._remember(end, self._replica.target(head["lsn"]))
        return Window(
            rows,
            end,
            complete=len(rows) < limit,
            events=[_event(e) for e in json.loads(head["events"] or "[]")],
            counts=json.loads(head["counts"] or "{}"),
            clock=head["clock"],
            next_expiry=head["next_expiry"],
            lease=_lease(head),
        )

    async def _window_at_head(
        self, since: Snapshot, xip: list[str], limit: int, swept_to: datetime | None
    ) -> Window | None:
        """
        With a standby: the window's first page bounded by the primary's
        snapshot of now, read on the standby once it has replayed that far
        (else on the primary); None when the window has events or an expiry
        is due, which :data:`queries.WINDOW_FIRST` reads on the primary.
        """
        assert self._replica is not None
        head = await self._pool.fetchrow(queries.WINDOW_HEAD)
        assert head is not None  # a SELECT without FROM always returns its row
        target = self._replica.target(head["lsn"])
        args = (since.to_pg(), xip, limit, swept_to, head["snap"], head["clock"])
        records = await self._read(target, lambda pool: pool.fetch(queries.WINDOW_LEAN_AT, *args))
        top = next(r for r in records if r["snap"] is not None)
        next_expiry = top["next_expiry"]
        if top["has_events"] or (next_expiry is not None and next_expiry <= head["clock"]):
            return None
        end = Snapshot.from_pg(head["snap"])
        self._remember(end, target)
        rows = sorted((r for r in records if r["snap"] is None), key=lambda r: r["seq"])
        return Window(
            rows,
            end,
            complete=len(rows) < limit,
            clock=head["clock"],
            next_expiry=next_expiry,
            lease=_lease(head),
        )

    async def window_rest(
        self,
        since: Snapshot,
        end: Snapshot,
        *,
        after_seq: int,
        pages: Iterator[int],
        clock: datetime | None = None,
    ) -> AsyncGenerator[Window, None]:
        """
        The rows of the window from ``since`` to ``end`` after ``after_seq``
        and not past their ``expire_at`` at ``clock`` (the first page's; None:
        now), in ``seq`` order, one page per size the endless ``pages`` yields; the
        last page is shorter than its size (possibly empty) and the only one
        marked complete. Holds a pool connection until closed: use with
        :func:`contextlib.aclosing`.
        """
        rows: list[Row] = []
        with as_database_error("reading the rest of a window failed"):
            # On the standby once it has replayed the window's end (a failure
            # there is retried by delivery, from the last row handed over).
            pool = self._pool
            target = self._ends.get(end)
            if self._replica is not None and target is not None:
                pool = await self._replica.pool_for(target) or self._pool
            async with pool.transaction(readonly=True) as connection:
                cursor = await connection.cursor(
                    queries.WINDOW_REST,
                    since.to_pg(),
                    [str(x) for x in since.xip],
                    after_seq,
                    end.to_pg(),
                    clock,
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
        self,
        requests: Sequence[tuple[str, Cursor]],
        end: Snapshot,
        *,
        limit: int,
        clock: datetime | None = None,
    ) -> list[list[Row]]:
        """
        For each (user, cursor): the user's rows the cursor does not cover and
        ``end`` saw, not past their ``expire_at`` at ``clock`` (``end``'s
        window's; None: now), newest first, at most ``limit``.
        """
        if not requests:
            return []
        users = [user for user, _ in requests]
        bases = [cursor.base.to_pg() for _, cursor in requests]
        ends = [cursor.end.to_pg() if cursor.end else None for _, cursor in requests]
        seqs = [cursor.seq for _, cursor in requests]
        args = (users, bases, ends, seqs, end.to_pg(), limit, clock)
        with as_database_error("reading missed rows failed"):
            records = await self._read(
                self._ends.get(end), lambda pool: pool.fetch(queries.CATCH_UP, *args)
            )
        result: list[list[Row]] = [[] for _ in requests]
        for record in records:
            result[record["i"] - 1].append(record)
        return result

    @contextlib.asynccontextmanager
    async def _for_client(
        self,
        failed: str,
        *,
        readonly: bool = False,
        settings: Mapping[str, str] | None = None,
        pool: Pool | None = None,
    ) -> AsyncIterator[PooledConnection]:
        """
        A transaction for a client's action, within the CLIENT_* bounds
        (and with ``settings`` set locally); every failure, a bound passed
        included, is a :class:`DatabaseError` reading ``"<failed>: ..."``.
        """
        local = {
            "lock_timeout": str(CLIENT_LOCK_TIMEOUT_MS),
            "statement_timeout": str(CLIENT_STATEMENT_TIMEOUT_MS),
            **(settings or {}),
        }
        with as_database_error(failed):
            try:
                async with (
                    asyncio.timeout(CLIENT_BUDGET_S),
                    (pool or self._pool).transaction(
                        readonly=readonly, acquire_timeout=CLIENT_ACQUIRE_S
                    ) as connection,
                ):
                    await connection.execute(_SET_LOCAL, list(local), list(local.values()))
                    yield connection
            except DatabaseError as exc:
                raise DatabaseError(f"{failed}: {exc}") from exc
            except TimeoutError:
                raise DatabaseError(f"{failed}: no answer within {CLIENT_BUDGET_S:g}s") from None

    async def mark_read(self, user: str, ids: Sequence[str]) -> int:
        """
        Mark the user's messages (and announcements) with these ids read;
        returns how many changed. The triggers tell every session.
        """
        async with self._for_client("marking messages read failed") as connection:
            changed = await connection.fetchval(queries.MARK_READ, user, list(ids))
        await self._note_write(user)
        return int(changed)

    async def mark_unread(self, user: str, ids: Sequence[str]) -> int:
        """
        Mark the user's messages (and announcements) with these ids unread
        again; returns how many changed. The triggers tell every session.
        """
        async with self._for_client("marking messages unread failed") as connection:
            changed = await connection.fetchval(queries.MARK_UNREAD, user, list(ids))
        await self._note_write(user)
        return int(changed)

    async def hide(self, user: str, ids: Sequence[str]) -> int:
        """
        Remove the messages (own or announcements) with these ids from the
        user's inbox: hidden for this user, and read. Returns how many were
        hidden; a 'deleted' event tells every session.
        """
        async with self._for_client(
            "deleting messages failed", settings={"notifyd.hiding": "on"}
        ) as connection:
            hidden = await connection.fetchval(queries.HIDE, user, list(ids))
        await self._note_write(user)
        return int(hidden)

    async def mark_all_read(self, user: str, type: str | None) -> int:
        """
        Mark all of the user's unread messages read (of one ``type`` when
        given); the event says "all" instead of listing ids.
        """
        async with self._for_client(
            "marking all messages read failed", settings={"notifyd.read_all": type or "*"}
        ) as connection:
            changed = await connection.fetchval(queries.MARK_ALL_READ, user, type)
        await self._note_write(user)
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
        args = (user, before_seq if before_seq is not None else 2**63 - 1, type, unread_only)

        async def read(pool: Pool) -> list[Row]:
            async with self._for_client(
                "reading history failed", readonly=True, pool=pool
            ) as connection:
                rows: list[Row] = await connection.fetch(queries.HISTORY, *args, limit + 1)
            return rows

        # On a standby: once it shows everything delivered so far and the
        # user's own last write (read-your-writes).
        target = None
        if self._replica is not None:
            target = self._replica.policy.target_for(user, self._delivered, time.monotonic())
        rows = await self._read(target, read)
        return rows[:limit], len(rows) > limit

    async def prune_events(self, older_than_s: float) -> int:
        """
        Delete read/delete events older than ``older_than_s`` seconds.
        """
        with as_database_error("pruning old events failed"):
            status = await self._pool.execute(queries.PRUNE_EVENTS, older_than_s)
        return int(status.split()[-1])

    async def set_lease(self, ms: int) -> Lease:
        """
        Start or extend the polling lease to ``ms`` milliseconds from now
        (never shortening it); returns the lease as set. Every instance
        must then hear of it: :meth:`announce_lease`.
        """
        with as_database_error("renewing the polling lease failed"):
            head = await self._pool.fetchrow(queries.SET_LEASE, ms)
        if head is None:  # the sequence has exactly one row
            raise DatabaseError("renewing the polling lease returned no row")
        return _lease(head)

    async def announce_lease(self) -> None:
        """
        Wake every instance with a NOTIFY, so that one waiting for NOTIFYs
        reads, sees the lease and polls too. It waits in the NOTIFY lock's
        queue like any NOTIFY.
        """
        with as_database_error("announcing the polling lease failed"):
            await self._pool.execute(queries.ANNOUNCE_LEASE)

    async def next_xact_id(self) -> int:
        """
        A new transaction id: every transaction that had one before this
        call has a lower one.
        """
        with as_database_error("taking a transaction id failed"):
            xact_id = await self._pool.fetchval(queries.NEXT_XACT_ID)
        return int(xact_id)

    async def notify_lock_queue(self) -> int:
        """
        How many transactions wait for the NOTIFY lock now.
        """
        with as_database_error("looking at the NOTIFY lock failed"):
            waiting = await self._pool.fetchval(queries.NOTIFY_LOCK_QUEUE)
        return int(waiting)

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
                    queries.INSERT, to_user, title, content, type, skip_url, send_user
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
            async with self._pool.transaction() as connection:
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
            r["attname"]: r["type_name"]
            for r in await self._pool.fetch(
                "SELECT attname, format_type(atttypid, atttypmod) AS type_name FROM pg_attribute "
                "WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                TABLE,
            )
        }
        if not columns:
            return [f"table {TABLE} does not exist: run `notifyd init-db`"]
        problems = [
            f"column {TABLE}.{name} is missing: run `notifyd init-db`"
            for name in queries.REQUIRED_COLUMNS
            if name not in columns
        ]
        expire_at_type = columns.get("expire_at", queries.EXPIRE_AT_TYPE)
        if expire_at_type != queries.EXPIRE_AT_TYPE:
            problems.append(
                f"column {TABLE}.expire_at is {expire_at_type}, not timestamptz: convert it "
                f"(ALTER TABLE {TABLE} ALTER COLUMN expire_at TYPE timestamptz USING ...) "
                "or rename it, then run `notifyd init-db`"
            )
        enabled = {
            r["tgname"]
            for r in await self._pool.fetch(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass AND tgenabled <> 'D'",
                TABLE,
            )
        }
        problems += [
            f"trigger {name} on {TABLE} is missing or disabled: run `notifyd init-db`"
            for name in queries.REQUIRED_TRIGGERS
            if name not in enabled
        ]
        for table in (RECEIPTS, EVENTS, queries.HIDDEN):
            if not await self._pool.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                problems.append(f"table {table} does not exist: run `notifyd init-db`")
        if not await self._pool.fetchval("SELECT to_regclass($1) IS NOT NULL", queries.LEASE):
            problems.append(f"sequence {queries.LEASE} does not exist: run `notifyd init-db`")
        if not await self._pool.fetchval(
            "SELECT to_regprocedure($1) IS NOT NULL", queries.RESTAMP_FUNCTION
        ):
            problems.append(
                f"function {queries.RESTAMP_FUNCTION} does not exist: run `notifyd init-db`"
            )
        if problems:
            return problems
        allowed = await self._pool.fetchrow(queries.PRIVILEGES)
        if allowed is None:  # a SELECT without FROM always returns its row
            raise DatabaseError("the privilege check returned no row")
        missing = {
            "read_messages": f"SELECT on {TABLE}",
            "update_is_read": f"UPDATE (is_read) on {TABLE}",
            "receipts": f"SELECT, INSERT and DELETE on {RECEIPTS}",
            "hidden": f"SELECT and INSERT on {queries.HIDDEN}",
            "events": f"SELECT and DELETE on {EVENTS}",
            "lease": f"SELECT and UPDATE on sequence {queries.LEASE}",
            "restamp": f"EXECUTE on function {queries.RESTAMP_FUNCTION}",
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
                # In a transaction of its own: asyncpg's prepare leaves the
                # implicit one open, and with it a lock on the app's table
                # that would block the app's DDL until the next query.
                async with self._pool.transaction(readonly=True) as connection:
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


def _lease(head: Row) -> Lease:
    return Lease(int(head["lease_until"]), int(head["lease_now"]))


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


class OwnConnection:
    """
    A connection of its own, outside the pool, for session state that must
    live exactly as long as the session: an advisory lock
    (:class:`~notifyd.dispatch.SenderLock`). Every method raises
    :class:`DatabaseError` when Postgres is unusable, like :class:`Database`.
    """

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        application_name: str,
        settings: Mapping[str, str],
        statement_timeout: float,
        what: str,
    ) -> OwnConnection:
        """
        Connect to ``dsn`` and set these ``settings`` (GUCs) for the session;
        every statement is given up after ``statement_timeout`` s. Only
        ``application_name`` is a startup parameter: poolers refuse others.
        """
        with as_database_error(f"cannot open the {what}"):
            connection = await asyncpg.connect(
                dsn,
                timeout=statement_timeout,
                command_timeout=statement_timeout,
                server_settings={"application_name": application_name},
            )
            try:
                await connection.execute(
                    "SELECT set_config(name, value, false) "
                    "FROM unnest($1::text[], $2::text[]) AS s(name, value)",
                    list(settings),
                    list(settings.values()),
                )
            except BaseException:
                connection.terminate()
                raise
        return cls(connection)

    @property
    def closed(self) -> bool:
        """
        Whether the session has ended (closed here or by the server).
        """
        return self._connection.is_closed()

    @property
    def backend_pid(self) -> int:
        """
        The server process of the session.
        """
        return self._connection.get_server_pid()

    async def wait_for_advisory_lock(self, name: str) -> bool:
        """
        Take the session-level advisory lock keyed by ``hashtextextended(name,
        0)``, waiting up to the session's ``lock_timeout``; False when it
        was still held elsewhere by then.
        """
        with as_database_error(f"waiting for the advisory lock {name!r} failed"):
            try:
                await self._connection.fetchval(
                    "SELECT pg_advisory_lock(hashtextextended($1, 0))", name
                )
            except asyncpg.LockNotAvailableError:
                return False
        return True

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        """
        Run a query; its rows.
        """
        with as_database_error("query failed"):
            rows: list[Row] = await self._connection.fetch(query, *args)
        return rows

    async def fetchval(self, query: str, *args: Any) -> Any:
        """
        Run a one-value query.
        """
        with as_database_error("query failed"):
            return await self._connection.fetchval(query, *args)

    async def execute(self, query: str) -> None:
        """
        Run statements as one simple query (no parameters: a ``DO`` block
        that commits as it goes must be sent this way).
        """
        with as_database_error("statement failed"):
            await self._connection.execute(query)

    def terminate(self) -> None:
        """
        Drop the connection at once.
        """
        self._connection.terminate()

    async def close(self) -> None:
        """
        End the session gracefully, or drop it when that does not work within
        2 s; raises nothing but a cancellation.
        """
        try:
            await self._connection.close(timeout=2)
        except asyncio.CancelledError:
            self._connection.terminate()
            raise
        except Exception:
            self._connection.terminate()
