"""
A primary and its streaming standby, as an operator would set them up, for
failover tests.

:class:`ReplicatedPair` starts a primary (``wal_level=replica``, WAL senders,
hot standby), creates a replication role with a password and a
``pg_hba.conf`` line that requires it, copies the primary with
``pg_basebackup -R -X stream`` as that role and starts the copy as a hot
standby streaming from the primary. Both listen on free ports on 127.0.0.1
and live in temporary directories removed by :meth:`ReplicatedPair.cleanup`.

Replication is asynchronous unless ``synchronous=True``: then the primary
names the standby in ``synchronous_standby_names`` and a commit returns only
once the standby has it (``synchronous_commit=on``).

Blocking calls (pg_ctl, pg_basebackup): call them through
``asyncio.to_thread`` from a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from notifyd.db import schema_sql
from notifyd.demo.binaries import EmbeddedPostgresError, PostgresBinaries, one_line
from notifyd.demo.embedded import EmbeddedPostgres
from notifyd.replica import format_lsn, parse_lsn, replayable

from .conftest import with_database

__all__ = ["ReplicatedPair", "app_database", "replicated_pair", "wait_until_replayed"]

REPLICATION_ROLE = "notifyd_replicator"
REPLICATION_PASSWORD = "replication-secret"
# The name the standby reports as application_name, for synchronous_standby_names.
STANDBY_NAME = "notifyd_standby"
_BASE_BACKUP_TIMEOUT_S = 60.0
_POLL_S = 0.02


def _settings(*, synchronous: bool) -> dict[str, str]:
    settings = {
        "wal_level": "replica",
        "max_wal_senders": "4",
        "hot_standby": "on",
        # The standby answers on its own feedback: queries on it are not cancelled.
        "hot_standby_feedback": "on",
        "fsync": "off",
        "synchronous_commit": "on" if synchronous else "off",
    }
    if synchronous:
        settings["synchronous_standby_names"] = STANDBY_NAME
    return settings


class ReplicatedPair:
    """
    A running primary and a running hot standby streaming from it.
    """

    def __init__(self, *, synchronous: bool = False) -> None:
        self.synchronous = synchronous
        self.primary = EmbeddedPostgres(settings=_settings(synchronous=synchronous))
        self._standby_root = Path(tempfile.mkdtemp(prefix="notifyd-standby-"))
        self.standby: EmbeddedPostgres | None = None

    def start(self) -> None:
        """
        Start the primary, make and start the standby; blocking.
        """
        self.primary.start()
        self._allow_replication_role()
        # mkdtemp's own directory: empty, mode 700, handed to the account.
        data_dir = self._standby_root
        self._base_backup(data_dir)
        standby_settings = dict(_settings(synchronous=self.synchronous))
        # Only the primary waits for a synchronous standby; once promoted,
        # the standby has none to wait for.
        standby_settings.pop("synchronous_standby_names", None)
        self.standby = EmbeddedPostgres(data_dir, settings=standby_settings)
        self.standby.start()
        asyncio.run(self._wait_streaming())

    def dsn(self, database: str = "postgres") -> str:
        """
        The libpq multi-host URL naming both servers, primary first, that
        only accepts a server taking writes.
        """
        assert self.standby is not None
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{database}?target_session_attrs=read-write"
        )

    def promote(self) -> None:
        """
        ``pg_ctl promote -w``: the standby leaves recovery and takes writes; blocking.
        """
        assert self.standby is not None
        code, output = PostgresBinaries.locate().run(
            "pg_ctl", self.standby.data_dir, ["-w", "-t", "30", "promote"], timeout=45
        )
        if code != 0:
            raise EmbeddedPostgresError(f"pg_ctl promote failed: {one_line(output)}")

    def cleanup(self) -> None:
        """
        Stop both servers and remove their data directories; idempotent.
        """
        try:
            if self.standby is not None:
                self.standby.cleanup()
        finally:
            self.primary.cleanup()
            shutil.rmtree(self._standby_root, ignore_errors=True)

    # -- internals -----------------------------------------------------------

    def _allow_replication_role(self) -> None:
        """
        A replication role with a password, and a pg_hba.conf line ahead of
        initdb's trust lines that makes it authenticate with it.
        """

        hba = self.primary.data_dir / "pg_hba.conf"
        line = f"host replication {REPLICATION_ROLE} 127.0.0.1/32 scram-sha-256\n"
        hba.write_text(line + hba.read_text())

        async def create_role() -> None:
            connection = await asyncpg.connect(self.primary.dsn, timeout=10)
            try:
                # No standby yet to wait for, synchronous or not.
                await connection.execute("SET synchronous_commit = local")
                await connection.execute(
                    f"CREATE ROLE {REPLICATION_ROLE} REPLICATION LOGIN "
                    f"PASSWORD '{REPLICATION_PASSWORD}'"
                )
                await connection.execute("SELECT pg_reload_conf()")
            finally:
                await connection.close()

        asyncio.run(create_role())

    async def _wait_streaming(self) -> None:
        """
        Wait until the primary streams to the standby as the replication role.
        """
        connection = await asyncpg.connect(self.primary.dsn, timeout=10)
        try:
            deadline = time.monotonic() + _BASE_BACKUP_TIMEOUT_S
            while not await connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_replication"
                " WHERE usename = $1 AND application_name = $2 AND state = 'streaming')",
                REPLICATION_ROLE,
                STANDBY_NAME,
            ):
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError("the standby did not start streaming")
                await asyncio.sleep(_POLL_S)
        finally:
            await connection.close()

    def _base_backup(self, data_dir: Path) -> None:
        binaries = PostgresBinaries.locate()
        binaries.make_data_dir(data_dir)
        conninfo = (
            f"host=127.0.0.1 port={self.primary.port} user={REPLICATION_ROLE} "
            f"password={REPLICATION_PASSWORD} application_name={STANDBY_NAME}"
        )
        code, output = binaries.run(
            "pg_basebackup",
            data_dir,
            ["-d", conninfo, "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"],
            timeout=_BASE_BACKUP_TIMEOUT_S,
        )
        if code != 0:
            raise EmbeddedPostgresError(f"pg_basebackup failed: {one_line(output)}")
        # The primary's log, copied along.
        with contextlib.suppress(FileNotFoundError):
            (data_dir / "server.log").unlink()


@contextlib.asynccontextmanager
async def replicated_pair(*, synchronous: bool = False) -> AsyncIterator[ReplicatedPair]:
    """
    A started :class:`ReplicatedPair`, cleaned up on exit.
    """
    pair = ReplicatedPair(synchronous=synchronous)
    try:
        await asyncio.to_thread(pair.start)
        yield pair
    finally:
        await asyncio.to_thread(pair.cleanup)


async def wait_until_replayed(primary_dsn: str, standby_dsn: str, timeout: float) -> None:
    """
    Poll until the standby has replayed everything the primary had written
    when this was called.
    """
    primary = await asyncpg.connect(primary_dsn, timeout=timeout)
    try:
        # The insert position: with synchronous_commit=off a commit may not
        # be written out yet, and the write position would miss it. Past a
        # page header it is only reached at the page boundary (replayable).
        row = await primary.fetchrow(
            "SELECT pg_current_wal_insert_lsn()::text AS lsn, "
            "current_setting('wal_block_size')::bigint AS block, "
            "pg_size_bytes(current_setting('wal_segment_size')) AS segment"
        )
    finally:
        await primary.close()
    assert row is not None  # a SELECT without FROM always returns its row
    target = replayable(
        parse_lsn(row["lsn"]), block_size=int(row["block"]), segment_size=int(row["segment"])
    )
    standby = await asyncpg.connect(standby_dsn, timeout=timeout)
    try:
        deadline = time.monotonic() + timeout
        while not await standby.fetchval(
            "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", format_lsn(target)
        ):
            assert time.monotonic() < deadline, "the standby did not catch up"
            await asyncio.sleep(_POLL_S)
    finally:
        await standby.close()


async def app_database(pair: ReplicatedPair, name: str, timeout: float) -> tuple[str, str]:
    """
    A database ``name`` with notifyd's schema on the pair's primary, once the
    standby has replayed it: its DSN on the primary and on the standby.
    """
    assert pair.standby is not None
    admin = await asyncpg.connect(pair.primary.dsn, timeout=timeout)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    primary = with_database(pair.primary.dsn, name)
    app = await asyncpg.connect(primary, timeout=timeout)
    try:
        await app.execute(schema_sql())
    finally:
        await app.close()
    await wait_until_replayed(pair.primary.dsn, pair.standby.dsn, timeout)
    return primary, with_database(pair.standby.dsn, name)
