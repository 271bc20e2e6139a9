"""
A throwaway PostgreSQL cluster for ``notifyd demo``, the tests and the benchmark.

:class:`EmbeddedPostgres` runs ``initdb`` and ``pg_ctl`` itself (from the
binaries :mod:`.binaries` finds) rather than through pgserver's
``get_server``, which starts a cluster too. What pgserver lacks, one line per need:

- it listens on a unix socket only: here TCP on 127.0.0.1 at a port fixed for
  the instance's life, as the tests' TCP proxies in front of it need;
- it passes no server settings: here ``-c name=value`` for each of *settings*;
- it stops the server only as it drops its last handle, in fast mode: here
  :meth:`~EmbeddedPostgres.stop` in any mode (immediate: a crash), then
  :meth:`~EmbeddedPostgres.start` or :meth:`~EmbeddedPostgres.restart`;
- it has no standby: :meth:`~EmbeddedPostgres.standby_of` makes one with
  ``pg_basebackup -R -X stream``, for tests of a database in recovery;
- it gives pg_ctl 10 s and then raises, leaving a slow postmaster running:
  here the caller's timeout, and a postmaster that did not come up is killed;
- it registers atexit handlers, keeps a registry of servers per process and
  a cross-process lock file: here nothing global, the creator owns
  :meth:`~EmbeddedPostgres.cleanup`;
- its cleanup terminates only the postmaster: here, when pg_ctl cannot stop
  the server, SIGKILL to its process group, backends included, so even an
  interrupted demo leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from ..exceptions import DatabaseError
from .binaries import EmbeddedPostgresError, PostgresBinaries, find_postgres_bin_dir, one_line

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "find_postgres_bin_dir",
    "start_in_thread",
]

logger = logging.getLogger(__name__)

SUPERUSER = "postgres"
_STOP_MODES = frozenset({"smart", "fast", "immediate"})
# pg_ctl enforces its own -t deadline; this margin only covers pg_ctl exiting.
_SUBPROCESS_MARGIN_S = 15.0
# How long to wait for a killed postmaster to exit.
_EXIT_GRACE_S = 10.0
_BASE_BACKUP_TIMEOUT_S = 60.0
_POLL_S = 0.01
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# The postmaster's words when its port was taken, and how many ports a
# first start tries.
_PORT_TAKEN = "Address already in use"
_PORT_ATTEMPTS = 3


class EmbeddedPostgres:
    """
    A private PostgreSQL cluster listening on ``127.0.0.1:<port>``.

    The port is picked at construction (another one if a different process
    takes it before the first start) and never changes once started, across
    :meth:`stop`/:meth:`start`, so a DSN stays valid through restarts.
    Authentication is ``trust`` for the ``postgres`` superuser. A data
    directory created here is removed by :meth:`cleanup`; one passed in is
    kept.
    """

    def __init__(
        self, data_dir: Path | str | None = None, *, settings: Mapping[str, str] | None = None
    ) -> None:
        """
        Prepare (but do not start) a cluster on a port free now.

        *data_dir* ``None`` means a fresh temporary directory that
        :meth:`cleanup` removes. *settings* are extra ``postgresql.conf``
        parameters passed as ``-c name=value``; names are validated here
        (``ValueError``), since pg_ctl hands them to a shell.
        """
        self._settings = dict(settings or {})
        for name in self._settings:
            if not _SETTING_NAME.match(name):
                raise ValueError(f"invalid PostgreSQL setting name: {name!r}")
        self._port = _free_port()
        self._owns_data_dir = data_dir is None
        if data_dir is None:
            data_dir = tempfile.mkdtemp(prefix="notifyd-pgdata-")
        # Commands run with cwd="/", so the path must not be relative.
        self._data_dir = Path(os.path.abspath(Path(data_dir).expanduser()))
        self._located: PostgresBinaries | None = None
        self._discarded = False
        self._started = False

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self._data_dir)!r}, port={self._port})"

    @classmethod
    def standby_of(
        cls, primary: EmbeddedPostgres, data_dir: Path | str | None = None
    ) -> EmbeddedPostgres:
        """
        Create (but do not start) a hot standby of the running *primary*.

        Runs ``pg_basebackup -R -X stream`` against ``primary.dsn`` with the
        primary's binaries and account, into *data_dir* (``None``: a fresh
        temporary directory that :meth:`cleanup` removes; otherwise it must
        be empty or absent). ``-R`` writes ``standby.signal`` and
        ``primary_conninfo``, so :meth:`start` brings the copy up in
        recovery, streaming from the primary over the ``host replication
        all 127.0.0.1/32 trust`` line that ``initdb --auth=trust`` writes.
        The standby gets the primary's settings: a hot standby refuses to
        start with, say, a lower ``max_connections``. Raises
        :exc:`EmbeddedPostgresError` when the primary is not running or the
        backup fails; a temporary data dir is removed then, a caller's kept.
        """
        if not primary.is_running():
            raise EmbeddedPostgresError(
                f"{primary!r} is not running; start it before making a standby of it"
            )
        standby = cls(data_dir, settings=primary._settings)
        try:
            standby._base_backup(primary)
        except BaseException:
            standby.cleanup()
            raise
        return standby

    @property
    def dsn(self) -> str:
        """
        The libpq/asyncpg URL of the ``postgres`` database as superuser.
        """
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self._port}/postgres"

    @property
    def port(self) -> int:
        """
        The TCP port; fixed for the lifetime of the instance.
        """
        return self._port

    @property
    def data_dir(self) -> Path:
        """
        The cluster's data directory (``server.log`` is written there too).
        """
        return self._data_dir

    def is_running(self) -> bool:
        """
        Whether a postmaster for this data directory is alive.
        """
        return self._live_postmaster_pid() is not None

    def start(self, timeout: float = 30.0) -> None:
        """
        Initialise the cluster if needed, start it, wait until it accepts connections.

        Idempotent when already running. *timeout* bounds initdb plus
        startup. Raises :exc:`EmbeddedPostgresError` on any failure, with
        the tail of ``server.log`` in the message; a postmaster that was
        spawned but did not become ready is killed rather than leaked.
        """
        if self._discarded:
            raise EmbeddedPostgresError(f"{self!r} was cleaned up; create a new instance")
        if self.is_running():
            return
        deadline = time.monotonic() + timeout
        binaries = self._binaries()
        if not (self._data_dir / "PG_VERSION").exists():
            self._initdb(binaries, deadline)
        attempt = 1
        while (failure := self._start_postmaster(binaries, deadline)) is not None:
            # Another process took the port between its pick and the first
            # start (ports are picked free, not reserved): pick another.
            # Once started, the port is the cluster's for good.
            if self._started or _PORT_TAKEN not in failure or attempt >= _PORT_ATTEMPTS:
                raise EmbeddedPostgresError(
                    f"PostgreSQL did not start on 127.0.0.1:{self._port} "
                    f"(data dir {self._data_dir}): {failure}"
                )
            attempt += 1
            self._port = _free_port()
        self._started = True
        logger.info("PostgreSQL started on 127.0.0.1:%d (data dir %s)", self._port, self._data_dir)

    def _start_postmaster(self, binaries: PostgresBinaries, deadline: float) -> str | None:
        """
        ``pg_ctl start -w`` on the current port; None once it accepts
        connections, else why not (a postmaster that did not become ready
        is killed).
        """
        parameters = {
            "port": str(self._port),
            "listen_addresses": "127.0.0.1",
            # TCP only: every client here uses the DSN, and no socket file is
            # left in a shared directory or overflows sun_path in a long one.
            "unix_socket_directories": "",
            "max_connections": "300",
            "logging_collector": "off",
            **self._settings,
        }
        options = [arg for name, value in parameters.items() for arg in ("-c", f"{name}={value}")]
        remaining = max(1.0, deadline - time.monotonic())
        code, output = binaries.run(
            "pg_ctl",
            self._data_dir,
            [
                "-l",
                str(self._data_dir / "server.log"),
                "-w",
                "-t",
                str(math.ceil(remaining)),
                # pg_ctl hands -o to /bin/sh, hence shell quoting.
                "-o",
                shlex.join(options),
                "start",
            ],
            timeout=remaining + _SUBPROCESS_MARGIN_S,
        )
        if code == 0:
            return None
        # pg_ctl -w gives up on a slow server without stopping it.
        self._kill_postmaster()
        return self._log_tail() or one_line(output)

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """
        Stop the server with ``pg_ctl -m <mode>`` and wait for the postmaster to exit.

        *mode* is ``"smart"``, ``"fast"`` or ``"immediate"`` (no shutdown
        checkpoint: the next start runs crash recovery). Idempotent when not
        running. Raises :exc:`EmbeddedPostgresError` if pg_ctl fails and the
        server is still up.
        """
        if mode not in _STOP_MODES:
            raise ValueError(f"invalid stop mode {mode!r}; expected one of {sorted(_STOP_MODES)}")
        pid = self._live_postmaster_pid()
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        code, output = self._binaries().run(
            "pg_ctl",
            self._data_dir,
            ["-w", "-t", str(max(1, math.ceil(timeout))), "-m", mode, "stop"],
            timeout=timeout + _SUBPROCESS_MARGIN_S,
        )
        if code != 0 and self.is_running():
            raise EmbeddedPostgresError(
                f"pg_ctl stop -m {mode} failed (data dir {self._data_dir}): {one_line(output)}"
            )
        # pg_ctl returns once postmaster.pid is gone, a moment before the
        # process itself exits. A zombie counts as exited: reaping is up to
        # init (about 1.5 s in some containers) and holds no port or memory.
        _wait_until(lambda: not _pid_alive(pid), max(deadline, time.monotonic() + 1.0))
        logger.info("PostgreSQL stopped (%s, data dir %s)", mode, self._data_dir)

    def restart(self) -> None:
        """
        Stop (fast) and start again on the same port and data directory.
        """
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """
        Stop the server by any means and remove a data directory this instance created.

        Tries ``fast``, then ``immediate``, then SIGKILLs the postmaster's
        process group found via ``postmaster.pid``, so even an interrupted
        demo leaves no server behind. Idempotent; never raises because
        something is already gone.
        """
        try:
            try:
                self.stop("fast")
            except EmbeddedPostgresError as exc:
                logger.warning("fast stop failed, trying immediate: %s", exc)
                try:
                    self.stop("immediate", timeout=10.0)
                except EmbeddedPostgresError as exc2:
                    logger.warning("immediate stop failed, killing the postmaster: %s", exc2)
        finally:
            # Runs even on KeyboardInterrupt during pg_ctl: kill what is left.
            self._kill_postmaster()
            if self._owns_data_dir and not self._discarded:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(self._data_dir)
                self._discarded = True
                logger.info("removed PostgreSQL data dir %s", self._data_dir)

    def __enter__(self) -> EmbeddedPostgres:
        """
        Start the cluster; if that fails, clean up before re-raising.
        """
        try:
            self.start()
        except BaseException:
            # __exit__ is not called when __enter__ raises.
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """
        Clean up (stop and remove a temporary data directory).
        """
        self.cleanup()

    # -- internals ---------------------------------------------------------

    def _binaries(self) -> PostgresBinaries:
        """
        The binaries and account, located on first use.
        """
        if self._located is None:
            self._located = PostgresBinaries.locate()
        return self._located

    def _initdb(self, binaries: PostgresBinaries, deadline: float) -> None:
        """
        Create the cluster in the (new or empty) data directory.
        """
        binaries.make_data_dir(self._data_dir)
        started = time.monotonic()
        code, output = binaries.run(
            "initdb",
            self._data_dir,
            [
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                # C locale: always available, and makes sorting reproducible.
                "--locale=C",
                "--no-sync",
            ],
            timeout=max(1.0, deadline - time.monotonic()),
        )
        if code != 0:
            raise EmbeddedPostgresError(
                f"initdb failed (data dir {self._data_dir}): {one_line(output)}"
            )
        # tests/test_cli.py waits for this line to interrupt the demo right
        # between initdb and pg_ctl start.
        logger.info(
            "initialised PostgreSQL cluster in %s (%.2fs, binaries %s)",
            self._data_dir,
            time.monotonic() - started,
            binaries.bin_dir,
        )

    def _base_backup(self, primary: EmbeddedPostgres) -> None:
        """
        Fill the data dir (absent or empty: pg_basebackup refuses others) with a copy of *primary*.
        """
        started = time.monotonic()
        # The primary's binaries (a standby must run the same major version)
        # and account, so both data dirs have one owner.
        binaries = self._located = primary._binaries()
        binaries.make_data_dir(self._data_dir)
        code, output = binaries.run(
            "pg_basebackup",
            self._data_dir,
            [
                "-d",
                primary.dsn,
                # standby.signal plus primary_conninfo in postgresql.auto.conf.
                "-R",
                "-X",
                "stream",
                # A spread checkpoint can take minutes even on an idle cluster.
                "--checkpoint=fast",
                "--no-sync",
                "--no-password",
            ],
            timeout=_BASE_BACKUP_TIMEOUT_S,
        )
        if code != 0:
            raise EmbeddedPostgresError(
                f"pg_basebackup from 127.0.0.1:{primary.port} failed "
                f"(data dir {self._data_dir}): {one_line(output)}"
            )
        # Copied along, but the primary's log, not this server's.
        with contextlib.suppress(FileNotFoundError):
            (self._data_dir / "server.log").unlink()
        logger.info(
            "copied PostgreSQL cluster 127.0.0.1:%d to standby data dir %s (%.2fs)",
            primary.port,
            self._data_dir,
            time.monotonic() - started,
        )

    def _live_postmaster_pid(self) -> int | None:
        """
        The pid in ``postmaster.pid`` if that process is alive and is our postmaster.

        Where /proc says, the process must be a postgres for this data dir:
        a stale ``postmaster.pid`` may name a pid since reused.
        """
        try:
            text = (self._data_dir / "postmaster.pid").read_text()
            pid = int(text.split("\n", 1)[0].strip())
        except (OSError, ValueError):
            return None
        if pid <= 0 or not _pid_alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return pid
        return pid if os.fsencode(str(self._data_dir)) in cmdline else None

    def _kill_postmaster(self) -> None:
        """
        SIGKILL the postmaster and its backends, if one is still alive.
        """
        pid = self._live_postmaster_pid()
        if pid is None:
            return
        logger.warning("killing PostgreSQL postmaster %d (data dir %s)", pid, self._data_dir)
        try:
            # pg_ctl starts the postmaster in its own session, so its process
            # group is exactly the postmaster plus its backends.
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _wait_until(lambda: not _pid_alive(pid), time.monotonic() + _EXIT_GRACE_S)

    def _log_tail(self) -> str:
        """
        The last lines of ``server.log`` joined into one line ("" if none).
        """
        try:
            text = (self._data_dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return one_line(text) if text.strip() else ""


def _free_port() -> int:
    """
    Return a TCP port on 127.0.0.1 that is free right now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    """
    Whether process *pid* exists and is not a zombie.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists but belongs to someone else
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (or hidden): trust kill()
    # The state letter follows the parenthesised command name, which may
    # itself contain spaces or parentheses.
    return status.rpartition(")")[2].split()[:1] != ["Z"]


def _wait_until(predicate: Callable[[], bool], deadline: float) -> bool:
    """
    Poll *predicate* until it returns true or *deadline* (monotonic) passes.
    """
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


async def start_in_thread(embedded: EmbeddedPostgres) -> None:
    """
    Start the embedded cluster in a thread. If the demo is interrupted
    meanwhile, wait for the thread anyway, so cleanup never races a start
    that would leave a server behind.
    """
    starting = asyncio.ensure_future(asyncio.to_thread(embedded.start))
    try:
        await asyncio.shield(starting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await starting
        raise
    except EmbeddedPostgresError as exc:
        # One line for the user, as for any database that cannot be used.
        raise DatabaseError(str(exc)) from None
