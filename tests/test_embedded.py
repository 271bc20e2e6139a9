"""
Tests for :mod:`notifyd.demo.embedded` and :mod:`notifyd.demo.binaries`, against real
PostgreSQL binaries.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from notifyd.demo.embedded import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_postgres_bin_dir,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAS_PROC = Path("/proc/self/status").exists()


def _read_pid(pg: EmbeddedPostgres) -> int:
    """
    The postmaster pid from ``postmaster.pid``.
    """
    return int((pg.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def _process_gone(pid: int, timeout: float = 10.0) -> bool:
    """
    Poll until ``os.kill(pid, 0)`` says the process no longer exists.

    A polled deadline rather than a fixed sleep: the exited postmaster is
    reparented to init, which may take a moment (~1.5 s here) to reap it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _process_uid(pid: int) -> int:
    """
    The real uid of *pid*, from /proc.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


@pytest.fixture
def pg() -> Iterator[EmbeddedPostgres]:
    """
    A started cluster on a temporary data dir, cleaned up afterwards.
    """
    server = EmbeddedPostgres(settings={"fsync": "off", "work_mem": "7MB"})
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def world_searchable_tmp() -> Iterator[Path]:
    """
    A temporary directory the unprivileged ``nobody`` account can traverse.

    pytest's ``tmp_path`` lives under a mode-700 dir, which PostgreSQL
    cannot reach when we are root and it runs as ``nobody``.
    """
    base = Path(tempfile.mkdtemp(prefix="notifyd-test-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_start_gives_dsn_that_asyncpg_can_query(pg: EmbeddedPostgres) -> None:
    """
    After start(), asyncpg connects to the DSN and runs ``select 1``.
    """
    assert pg.is_running()
    assert pg.dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    conn = await asyncpg.connect(pg.dsn, timeout=10)
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


async def test_server_options_and_extra_settings_are_applied(
    pg: EmbeddedPostgres,
) -> None:
    """
    Fixed options (loopback only, no unix socket, 300 connections, UTF8) and extra settings apply.
    """
    conn = await asyncpg.connect(pg.dsn, timeout=10)
    try:
        assert await conn.fetchval("show listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("show max_connections") == "300"
        assert await conn.fetchval("show server_encoding") == "UTF8"
        assert await conn.fetchval("show unix_socket_directories") == ""
        assert await conn.fetchval("show work_mem") == "7MB"
        assert await conn.fetchval("show fsync") == "off"
    finally:
        await conn.close()
    assert (pg.data_dir / "server.log").is_file()


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to read the process owner")
def test_server_never_runs_as_root(pg: EmbeddedPostgres) -> None:
    """
    The postmaster runs unprivileged: as ``nobody`` under root, else as ourselves.
    """
    uid = _process_uid(_read_pid(pg))
    if IS_ROOT:
        import pwd

        assert uid == pwd.getpwnam("nobody").pw_uid
    else:
        assert uid == os.getuid()


async def test_stop_then_start_keeps_port_and_data(pg: EmbeddedPostgres) -> None:
    """
    stop() then start(), and restart(), keep the port, the DSN and committed data.
    """
    port, dsn = pg.port, pg.dsn
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("create table kept (id int primary key); insert into kept values (42)")
    finally:
        await conn.close()

    pg.stop()
    assert not pg.is_running()
    pg.start()
    assert (pg.port, pg.dsn) == (port, dsn)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        assert await conn.fetchval("select id from kept") == 42
    finally:
        await conn.close()

    pg.restart()
    assert pg.is_running() and pg.port == port
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        assert await conn.fetchval("select count(*) from kept") == 1
    finally:
        await conn.close()


def test_start_and_stop_are_idempotent(pg: EmbeddedPostgres) -> None:
    """
    start() while running keeps the same postmaster; stop() when stopped is a no-op.
    """
    pid = _read_pid(pg)
    pg.start()
    assert _read_pid(pg) == pid
    pg.stop(mode="immediate")
    pg.stop()
    assert not pg.is_running()
    with pytest.raises(ValueError):
        pg.stop(mode="sideways")


def test_cleanup_removes_temp_dir_and_postmaster() -> None:
    """
    cleanup() removes the temp data dir and the postmaster, and may be repeated.
    """
    pg = EmbeddedPostgres()
    pg.start()
    pid = _read_pid(pg)
    data_dir = pg.data_dir

    pg.cleanup()

    assert not data_dir.exists()
    assert _process_gone(pid), f"postmaster {pid} still exists after cleanup()"
    assert not pg.is_running()
    pg.cleanup()  # already gone: no error
    with pytest.raises(EmbeddedPostgresError, match="cleaned up"):
        pg.start()


async def test_cleanup_kills_postmaster_and_backends_when_pg_ctl_stop_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    If pg_ctl stop fails, cleanup() SIGKILLs the postmaster's group, backends too.
    """
    pg = EmbeddedPostgres()
    pg.start()
    pid = _read_pid(pg)
    conn = await asyncpg.connect(pg.dsn, timeout=10)
    backend_pid = await conn.fetchval("select pg_backend_pid()")

    def broken_stop(mode: str = "fast", timeout: float = 30.0) -> None:
        raise EmbeddedPostgresError(f"simulated pg_ctl failure ({mode})")

    monkeypatch.setattr(pg, "stop", broken_stop)
    try:
        pg.cleanup()
    finally:
        conn.terminate()

    assert not pg.data_dir.exists()
    assert _process_gone(pid), f"postmaster {pid} survived cleanup()"
    assert _process_gone(backend_pid), f"backend {backend_pid} survived cleanup()"


def test_finding_the_wheels_binaries_does_not_import_pgserver() -> None:
    """
    The bin dir comes from pgserver's location, without running its __init__ (and its imports).
    """
    probe = (
        "import sys; from notifyd.demo.binaries import find_postgres_bin_dir; "
        "print(find_postgres_bin_dir()); print('pgserver' in sys.modules, 'psutil' in sys.modules)"
    )
    env = {key: value for key, value in os.environ.items() if key != "NOTIFYD_PG_BIN"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 0, result.stderr
    bin_dir, imported = result.stdout.splitlines()
    assert Path(bin_dir).parts[-3:] == ("pgserver", "pginstall", "bin")
    assert imported == "False False"
    assert result.stderr == ""


def test_empty_pg_bin_dir_gives_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """
    NOTIFYD_PG_BIN naming an empty dir raises an error that says what to install.
    """
    monkeypatch.setenv("NOTIFYD_PG_BIN", str(tmp_path))
    pg = EmbeddedPostgres()
    data_dir = pg.data_dir
    expected = "no PostgreSQL binaries found"
    with pytest.raises(EmbeddedPostgresError, match=expected) as excinfo:
        with pg:
            pass
    assert "pip install 'notifyd[embedded]' or set NOTIFYD_PG_BIN" in str(excinfo.value)
    # A failing __enter__ still cleans up the temp data dir.
    assert not data_dir.exists()


def test_failed_start_reports_server_log_tail_in_one_line() -> None:
    """
    A server that refuses to start raises an error quoting server.log on one line.
    """
    pg = EmbeddedPostgres(settings={"shared_buffers": "not-a-size"})
    try:
        with pytest.raises(EmbeddedPostgresError) as excinfo:
            pg.start(timeout=20)
        message = str(excinfo.value)
        assert "\n" not in message
        assert 'invalid value for parameter "shared_buffers"' in message
        assert not pg.is_running()
    finally:
        pg.cleanup()


def test_a_port_taken_before_the_first_start_is_replaced_by_a_free_one() -> None:
    """
    Ports are picked free, not reserved: another process may bind one before
    the cluster starts; the first start then takes another port.
    """
    pg = EmbeddedPostgres()
    taken = pg.port
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", taken))
            squatter.listen()
            pg.start(timeout=30)
        assert pg.is_running()
        assert pg.port != taken
        assert pg.dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    finally:
        pg.cleanup()


def test_invalid_setting_name_is_rejected() -> None:
    """
    A setting name that could smuggle shell or server options is refused up front.
    """
    with pytest.raises(ValueError):
        EmbeddedPostgres(Path("/nonexistent"), settings={"fsync=off -c x": "1"})


def _socket_files(directory: Path) -> list[Path]:
    """
    The unix socket (and socket lock) files PostgreSQL left in *directory*.
    """
    return list(directory.glob(".s.PGSQL.*"))


async def test_long_data_dir_works_without_a_socket_file_and_is_kept(
    world_searchable_tmp: Path,
) -> None:
    """
    A data dir too long for a unix socket path works (TCP only); a caller's outlives cleanup().
    """
    data_dir = world_searchable_tmp / ("d" * 90)
    pg = EmbeddedPostgres(data_dir)
    try:
        pg.start()
        conn = await asyncpg.connect(pg.dsn, timeout=10)
        try:
            assert await conn.fetchval("show unix_socket_directories") == ""
        finally:
            await conn.close()
        assert not _socket_files(data_dir)
    finally:
        pg.cleanup()
    assert (data_dir / "PG_VERSION").is_file()


def _binary_caches(base: Path) -> tuple[list[Path], list[Path]]:
    """
    The published copies of the binaries under *base*, and staging dirs left behind.
    """
    return list(base.glob("notifyd-pg-*")), list(base.glob(".notifyd-pg-*"))


@pytest.mark.skipif(not IS_ROOT or not HAS_PROC, reason="the shared copy is only made as root")
async def test_root_copies_binaries_nobody_cannot_read_to_shared_cache(
    monkeypatch: pytest.MonkeyPatch, world_searchable_tmp: Path
) -> None:
    """
    As root, binaries under a mode-700 dir run from a world-readable cached copy.
    """
    source = find_postgres_bin_dir().parent
    if not (source / "share").is_dir():
        pytest.skip("install tree is not self-contained (e.g. Debian splits share/)")
    private = world_searchable_tmp / "private"
    private.mkdir(mode=0o700)
    # Same layout as site-packages: pgserver's binaries find their vendored
    # libpq through RPATH $ORIGIN/../../../pgserver.libs.
    copy = private / source.parent.name / source.name
    skip_headers = shutil.ignore_patterns("include")
    shutil.copytree(source, copy, symlinks=True, ignore=skip_headers)
    vendored = source.parent.parent / f"{source.parent.name}.libs"
    if vendored.is_dir():
        shutil.copytree(vendored, private / vendored.name, symlinks=True)
    monkeypatch.setenv("NOTIFYD_PG_BIN", str(copy / "bin"))
    # Keep the cache (and the temp data dir) inside the test's own dir.
    monkeypatch.setattr(tempfile, "tempdir", str(world_searchable_tmp))

    with EmbeddedPostgres() as pg:
        conn = await asyncpg.connect(pg.dsn, timeout=10)
        try:
            assert await conn.fetchval("select 1") == 1
        finally:
            await conn.close()
        executable = Path(os.readlink(f"/proc/{_read_pid(pg)}/exe"))

    caches, staging = _binary_caches(world_searchable_tmp)
    assert len(caches) == 1 and caches[0].is_dir()
    assert executable.is_relative_to(caches[0])
    assert caches[0].stat().st_mode & 0o777 == 0o755
    assert not staging, f"staging dir left behind: {staging}"


async def _wait_for_table(conn: asyncpg.Connection, name: str, timeout: float) -> bool:
    """
    Poll until *name* resolves to a relation on *conn*, or *timeout* passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        if await conn.fetchval("select to_regclass($1) is not null", name):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)


async def test_standby_of_is_in_recovery_and_replays_tables_created_on_primary(
    pg: EmbeddedPostgres,
) -> None:
    """
    standby_of() copies the primary, starts in recovery and streams later changes.
    """
    conn = await asyncpg.connect(pg.dsn, timeout=10)
    try:
        await conn.execute("create table copied (id int); insert into copied values (1)")
    finally:
        await conn.close()

    standby = EmbeddedPostgres.standby_of(pg)
    try:
        assert (standby.data_dir / "standby.signal").is_file()
        assert standby.port != pg.port and standby.data_dir != pg.data_dir
        assert not standby.is_running()
        standby.start()
        assert standby.is_running()
        if HAS_PROC:
            assert _process_uid(_read_pid(standby)) == _process_uid(_read_pid(pg))

        conn = await asyncpg.connect(pg.dsn, timeout=10)
        try:
            await conn.execute("create table streamed (id int); insert into streamed values (2)")
        finally:
            await conn.close()

        replica = await asyncpg.connect(standby.dsn, timeout=10)
        try:
            assert await replica.fetchval("select pg_is_in_recovery()") is True
            # The primary's extra settings carry over to the standby.
            assert await replica.fetchval("show work_mem") == "7MB"
            assert await replica.fetchval("select id from copied") == 1
            assert await _wait_for_table(replica, "streamed", timeout=10.0), (
                "table created on the primary never reached the standby"
            )
            assert await replica.fetchval("select id from streamed") == 2
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await replica.execute("create table refused (id int)")
        finally:
            await replica.close()
    finally:
        standby.cleanup()
    assert not standby.data_dir.exists()
    assert pg.is_running()


def test_standby_of_stopped_primary_is_refused() -> None:
    """
    standby_of() a primary that is not running raises a one-line error.
    """
    primary = EmbeddedPostgres()
    try:
        with pytest.raises(EmbeddedPostgresError, match="not running"):
            EmbeddedPostgres.standby_of(primary)
    finally:
        primary.cleanup()


def test_standby_of_into_non_empty_dir_fails_and_keeps_callers_dir(
    pg: EmbeddedPostgres, world_searchable_tmp: Path
) -> None:
    """
    A failed base backup raises with pg_basebackup's reason; a caller's dir is kept.
    """
    occupied = world_searchable_tmp / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(
        EmbeddedPostgresError, match=re.escape("pg_basebackup from 127.0.0.1")
    ) as excinfo:
        EmbeddedPostgres.standby_of(pg, occupied)
    assert "\n" not in str(excinfo.value)
    assert (occupied / "keep.txt").read_text() == "mine"
    assert pg.is_running()
