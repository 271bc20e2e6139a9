"""
A throwaway PostgreSQL cluster for ``notifyd demo`` and the test suite.

:class:`EmbeddedPostgres` runs ``initdb``/``pg_ctl``/``postgres`` from, in
order of preference:

1. the directory named by ``NOTIFYD_PG_BIN`` (no fallback when it is set);
2. the binaries shipped in the ``pgserver`` wheel (``notifyd[embedded]``),
   which is what a fresh machine has;
3. ``pg_config --bindir``, then ``initdb`` on ``PATH``, then the highest
   ``/usr/lib/postgresql/*/bin``.

PostgreSQL refuses to run as root, so under ``euid == 0`` every command runs
as the ``nobody`` account; when that account cannot read the binaries (say a
venv under ``/root``), the install tree is copied once into a world-readable
cache directory in the temp dir.

:meth:`EmbeddedPostgres.standby_of` makes a hot standby of a running cluster
with ``pg_basebackup -R -X stream`` (same binaries, same account), for tests
that need a database in recovery.

Nothing global is registered here: whoever creates an instance owns calling
:meth:`EmbeddedPostgres.cleanup` (or uses it as a context manager).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "find_postgres_bin_dir"]

logger = logging.getLogger(__name__)

BIN_ENV_VAR = "NOTIFYD_PG_BIN"
SUPERUSER = "postgres"
UNPRIVILEGED_ACCOUNT = "nobody"
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_BASE_BACKUP = "pg_basebackup"
_NOT_FOUND = "no PostgreSQL binaries found: pip install 'notifyd[embedded]' or install PostgreSQL"
_STOP_MODES = frozenset({"smart", "fast", "immediate"})
# A unix socket path is limited to ~107 bytes and PostgreSQL appends
# "/.s.PGSQL.NNNNN" (15 bytes) to the directory.
_MAX_SOCKET_DIR_LEN = 80
_LOG_TAIL_LINES = 20
# pg_ctl enforces its own -t deadline; this margin only covers pg_ctl exiting.
_SUBPROCESS_MARGIN_S = 15.0
# How long to wait for a killed postmaster to exit.
_EXIT_GRACE_S = 10.0
_POLL_S = 0.01
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class EmbeddedPostgresError(RuntimeError):
    """
    The embedded cluster could not be found, initialised, started or stopped.

    The message is a single line, fit for a log or a CLI error.
    """


@dataclass(frozen=True)
class _Account:
    """
    The unprivileged account commands run as when we are root.
    """

    name: str
    uid: int
    gid: int


def find_postgres_bin_dir() -> Path:
    """
    Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    ``NOTIFYD_PG_BIN`` wins and is not second-guessed: if it is set but lacks
    the binaries this raises rather than silently using others. Raises
    :exc:`EmbeddedPostgresError` when nothing is found.
    """
    override = os.environ.get(BIN_ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if _has_binaries(path):
            return path.resolve()
        raise EmbeddedPostgresError(
            f"{_NOT_FOUND} ({BIN_ENV_VAR}={override} has no initdb/pg_ctl/postgres)"
        )
    for candidate in _candidate_bin_dirs():
        if _has_binaries(candidate):
            return candidate.resolve()
    raise EmbeddedPostgresError(_NOT_FOUND)


def _candidate_bin_dirs() -> Iterator[Path]:
    """
    Yield plausible bin directories, best first, without importing pgserver.
    """
    # find_spec on a top-level name locates the package without executing
    # its __init__, so psutil and friends are never imported.
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            yield Path(location) / "pginstall" / "bin"

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            result = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):
            result = None
        if result is not None and result.returncode == 0 and result.stdout.strip():
            yield Path(result.stdout.strip())

    initdb = shutil.which("initdb")
    if initdb:
        # /usr/local/bin/initdb is often a symlink; pg_ctl and postgres live
        # next to its target, not next to the link.
        yield Path(initdb).resolve().parent

    installed = Path("/usr/lib/postgresql").glob("*/bin")
    yield from sorted(installed, key=_version_key, reverse=True)


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    """
    Sort key for ``/usr/lib/postgresql/<version>/bin`` (``9.6`` < ``15``).
    """
    parts = re.findall(r"\d+", bin_dir.parent.name)
    return tuple(int(part) for part in parts) or (-1,)


def _has_binaries(bin_dir: Path) -> bool:
    """
    Whether *bin_dir* holds executable ``initdb``, ``pg_ctl`` and ``postgres``.
    """
    return all(
        (bin_dir / name).is_file() and os.access(bin_dir / name, os.X_OK)
        for name in _REQUIRED_BINARIES
    )


def _unprivileged_account() -> _Account | None:
    """
    Return the account to run PostgreSQL as, or ``None`` when not root.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd  # Unix-only; only reached when running as root.

    try:
        entry = pwd.getpwnam(UNPRIVILEGED_ACCOUNT)
    except KeyError:
        raise EmbeddedPostgresError(
            f"running as root, but there is no '{UNPRIVILEGED_ACCOUNT}' account "
            "to run PostgreSQL as"
        ) from None
    return _Account(UNPRIVILEGED_ACCOUNT, entry.pw_uid, entry.pw_gid)


def _can_traverse(path: Path, account: _Account) -> bool:
    """
    Whether *account* may search (``x``) the directory *path*.
    """
    st = path.stat()
    if st.st_uid == account.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == account.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _ancestors_traversable(path: Path, account: _Account) -> bool:
    """
    Whether *account* can reach *path* (every existing ancestor is searchable).
    """
    return all(_can_traverse(parent, account) for parent in path.parents if parent.exists())


def _tree_world_readable(root: Path) -> bool:
    """
    Whether "others" can reach *root* and read/execute everything under it.
    """
    if not all(parent.stat().st_mode & stat.S_IXOTH for parent in root.parents):
        return False
    for dirpath, _dirnames, filenames in os.walk(root):
        dir_mode = os.stat(dirpath).st_mode
        if dir_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
            return False
        for name in filenames:
            try:
                mode = os.stat(os.path.join(dirpath, name)).st_mode
            except OSError:  # a dangling symlink is harmless
                continue
            if not mode & stat.S_IROTH:
                return False
            if mode & stat.S_IXUSR and not mode & stat.S_IXOTH:
                return False
    return True


def _make_world_readable(root: Path) -> None:
    """
    Give "others" read (and execute where the owner has it) under *root*.

    Only ever called on a tree this module has just created.
    """
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode
            extra = stat.S_IRGRP | stat.S_IROTH
            if mode & stat.S_IXUSR:
                extra |= stat.S_IXGRP | stat.S_IXOTH
            os.chmod(path, stat.S_IMODE(mode) | extra)


def _postgres_version(bin_dir: Path) -> str:
    """
    Return ``postgres --version`` output (allowed as root), or a file fingerprint.
    """
    binary = bin_dir / "postgres"
    try:
        result = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    st = binary.stat()
    return f"size={st.st_size} mtime={st.st_mtime_ns}"


def _install_trees(bin_dir: Path) -> list[Path]:
    """
    Return the directories that the programs in *bin_dir* load files from.

    That is the install root (the parent of ``bin``: bin/lib/share) plus,
    for a wheel repaired by auditwheel such as pgserver's, the vendored
    library dir ``<package>.libs`` next to the package, which the binaries
    reach through ``RPATH $ORIGIN/../../../<package>.libs``.
    """
    root = bin_dir.parent
    trees = [root]
    vendored = root.parent.parent / f"{root.parent.name}.libs"
    if vendored.is_dir():
        trees.append(vendored)
    return trees


def _shared_install(bin_dir: Path) -> Path:
    """
    Return a bin dir with the same binaries that every user can execute.

    The install trees are copied once to ``<tmp>/notifyd-pg-<hash>``,
    keeping their last two path components so relative RPATHs still
    resolve. The copy is built and checked under a temporary name, then
    renamed into place, so concurrent callers either win the rename or use
    the winner's copy. Raises :exc:`EmbeddedPostgresError` if the copy does
    not run or an existing cache dir could have been planted by another user.
    """
    root = bin_dir.parent
    anchor = root.parent.parent
    fingerprint = f"{root}\0{_postgres_version(bin_dir)}"
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    base = Path(tempfile.gettempdir())
    target = base / f"notifyd-pg-{digest}"
    copied_bin = target / root.relative_to(anchor) / "bin"
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=base))
        try:
            logger.info(
                "copying PostgreSQL binaries to %s so that %s can run them",
                target,
                UNPRIVILEGED_ACCOUNT,
            )
            for tree in _install_trees(bin_dir):
                shutil.copytree(tree, staging / tree.relative_to(anchor), symlinks=True)
            _make_world_readable(staging)
            staged_bin = staging / root.relative_to(anchor) / "bin"
            # Catch a copy that cannot load its libraries before publishing
            # it; initdb is the one linked against (vendored) libpq.
            check = subprocess.run(
                [str(staged_bin / "initdb"), "--version"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            if check.returncode != 0:
                why = _one_line(check.stderr + check.stdout)
                raise EmbeddedPostgresError(
                    f"a copy of {root} does not run ({why}); make {root} "
                    f"readable by '{UNPRIVILEGED_ACCOUNT}' or set {BIN_ENV_VAR}"
                )
            try:
                os.rename(staging, target)
            except OSError:
                # Lost the race to a concurrent run; its copy is as good as ours.
                if not target.exists():
                    raise
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedPostgresError(
                f"cannot copy PostgreSQL binaries to {target}: {exc}"
            ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    # The temp dir is shared: binaries we are about to run must not be
    # replaceable by another user.
    st = os.lstat(target)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise EmbeddedPostgresError(
            f"refusing to use {target}: not a directory owned by uid "
            f"{os.geteuid()} and writable only by it"
        )
    if not _has_binaries(copied_bin):
        raise EmbeddedPostgresError(f"{target} is incomplete; remove it and retry")
    return copied_bin


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


def _remove_tree(path: Path) -> None:
    """
    Remove *path* recursively; a missing path is not an error.
    """
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


class EmbeddedPostgres:
    """
    A private PostgreSQL cluster listening on ``127.0.0.1:<port>``.

    The port is picked once, at construction, and never changes across
    :meth:`stop`/:meth:`start`, so a DSN stays valid through restarts.
    Authentication is ``trust`` for the ``postgres`` superuser. A data
    directory created here is removed by :meth:`cleanup`; one passed in is
    kept.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        """
        Prepare (but do not start) a cluster.

        *data_dir* ``None`` means a fresh temporary directory that
        :meth:`cleanup` removes. *port* ``None`` picks a free port now.
        *settings* are extra ``postgresql.conf`` parameters passed as
        ``-c name=value``; names are validated here (``ValueError``).
        """
        extra = dict(settings or {})
        for name in extra:
            if not _SETTING_NAME.match(name):
                raise ValueError(f"invalid PostgreSQL setting name: {name!r}")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"invalid port: {port}")
        self._settings = extra
        self._port = port if port is not None else _free_port()
        self._owns_data_dir = data_dir is None
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="notifyd-pgdata-"))
        # Commands run with cwd="/", so the path must not be relative.
        self._data_dir = Path(os.path.abspath(Path(data_dir).expanduser()))
        self._socket_dir: Path | None = None
        self._owns_socket_dir = False
        self._bin_dir: Path | None = None
        self._account: _Account | None = None
        self._discarded = False

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self._data_dir)!r}, port={self._port})"

    @classmethod
    def standby_of(
        cls,
        primary: EmbeddedPostgres,
        data_dir: Path | None = None,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> EmbeddedPostgres:
        """
        Create (but do not start) a hot standby of the running *primary*.

        Runs ``pg_basebackup -R -X stream`` against ``primary.dsn`` with the
        primary's binaries, as the same (unprivileged) account, into
        *data_dir* (``None``: a fresh temporary directory that
        :meth:`cleanup` removes; otherwise it must be empty or absent).
        ``-R`` writes ``standby.signal`` and ``primary_conninfo``, so
        :meth:`start` brings the copy up in recovery, streaming from the
        primary; ``pg_is_in_recovery()`` is true there. The replication
        connection relies on the ``host replication all 127.0.0.1/32 trust``
        line that ``initdb --auth=trust`` writes.

        The standby gets the primary's extra *settings* (a hot standby
        refuses to start with, say, a lower ``max_locks_per_transaction``),
        updated with *settings*. *port* ``None`` picks a free port.
        *timeout* bounds the base backup. Raises
        :exc:`EmbeddedPostgresError` when the primary is not running or the
        backup fails; a temporary data dir is removed then, a caller's kept.
        """
        if not primary.is_running():
            raise EmbeddedPostgresError(
                f"{primary!r} is not running; start it before making a standby of it"
            )
        inherited = {**primary._settings, **(settings or {})}
        standby = cls(data_dir, port=port, settings=inherited)
        try:
            standby._base_backup(primary, timeout)
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
        pid = self._postmaster_pid()
        return pid is not None and self._is_our_postmaster(pid)

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
        bin_dir, account = self._prepare_binaries()
        self._initdb(bin_dir, account, deadline)
        socket_dir = self._ensure_socket_dir(account)

        options: list[str] = []
        parameters = {
            "port": str(self._port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(socket_dir),
            "max_connections": "300",
            "logging_collector": "off",
            **self._settings,
        }
        for name, value in parameters.items():
            options += ["-c", f"{name}={value}"]
        remaining = max(1.0, deadline - time.monotonic())
        log_file = self._data_dir / "server.log"
        code, output = self._run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(self._data_dir),
                "-l",
                str(log_file),
                "-w",
                "-t",
                str(math.ceil(remaining)),
                # pg_ctl hands -o to /bin/sh, hence shell quoting.
                "-o",
                " ".join(shlex.quote(option) for option in options),
                "start",
            ],
            timeout=remaining + _SUBPROCESS_MARGIN_S,
        )
        if code != 0:
            # pg_ctl -w gives up on a slow server without stopping it.
            self._kill_postmaster()
            detail = self._log_tail() or _one_line(output)
            raise EmbeddedPostgresError(
                f"PostgreSQL did not start on 127.0.0.1:{self._port} "
                f"(data dir {self._data_dir}): {detail}"
            )
        logger.info(
            "PostgreSQL started on 127.0.0.1:%d (data dir %s)",
            self._port,
            self._data_dir,
        )

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """
        Stop the server with ``pg_ctl -m <mode>`` and wait for the postmaster to exit.

        *mode* is ``"smart"``, ``"fast"`` or ``"immediate"``. Idempotent when
        not running. Raises :exc:`EmbeddedPostgresError` if pg_ctl fails and
        the server is still up.
        """
        if mode not in _STOP_MODES:
            raise ValueError(f"invalid stop mode {mode!r}; expected one of {sorted(_STOP_MODES)}")
        pid = self._postmaster_pid()
        if pid is None or not self._is_our_postmaster(pid):
            return
        deadline = time.monotonic() + timeout
        bin_dir, _ = self._prepare_binaries()
        code, output = self._run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(self._data_dir),
                "-w",
                "-t",
                str(max(1, math.ceil(timeout))),
                "-m",
                mode,
                "stop",
            ],
            timeout=timeout + _SUBPROCESS_MARGIN_S,
        )
        if code != 0 and self.is_running():
            raise EmbeddedPostgresError(
                f"pg_ctl stop -m {mode} failed (data dir {self._data_dir}): {_one_line(output)}"
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
        Stop the server by any means and remove directories this instance created.

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
            if self._owns_socket_dir and self._socket_dir is not None:
                _remove_tree(self._socket_dir)
                self._socket_dir = None
                self._owns_socket_dir = False
            if self._owns_data_dir and not self._discarded:
                _remove_tree(self._data_dir)
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
        Clean up (stop and remove temporary directories).
        """
        self.cleanup()

    # -- internals ---------------------------------------------------------

    def _prepare_binaries(self) -> tuple[Path, _Account | None]:
        """
        Resolve (once) the bin dir and the account commands run as.
        """
        if self._bin_dir is None:
            account = _unprivileged_account()
            bin_dir = find_postgres_bin_dir()
            if account is not None and not all(
                _tree_world_readable(tree) for tree in _install_trees(bin_dir)
            ):
                bin_dir = _shared_install(bin_dir)
            self._bin_dir, self._account = bin_dir, account
        return self._bin_dir, self._account

    def _initdb(self, bin_dir: Path, account: _Account | None, deadline: float) -> None:
        """
        Create the cluster unless ``PG_VERSION`` shows it already exists.
        """
        if (self._data_dir / "PG_VERSION").exists():
            return
        self._create_data_dir(account)
        started = time.monotonic()
        code, output = self._run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(self._data_dir),
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
                f"initdb failed (data dir {self._data_dir}): {_one_line(output)}"
            )
        logger.info(
            "initialised PostgreSQL cluster in %s (%.2fs, binaries %s)",
            self._data_dir,
            time.monotonic() - started,
            bin_dir,
        )

    def _create_data_dir(self, account: _Account | None) -> None:
        """
        Create the data dir (mode 700) and, under root, hand it to *account*.
        """
        try:
            self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot create data dir {self._data_dir}: {exc}") from exc
        if account is not None:
            if not _ancestors_traversable(self._data_dir, account):
                raise EmbeddedPostgresError(
                    f"data dir {self._data_dir} is not reachable by '{account.name}', "
                    "the account PostgreSQL runs as under root; use a directory "
                    "under a world-searchable path such as /tmp"
                )
            # initdb and pg_basebackup insist on owning the directory; only
            # take over an empty one.
            if not any(self._data_dir.iterdir()):
                os.chown(self._data_dir, account.uid, account.gid)

    def _base_backup(self, primary: EmbeddedPostgres, timeout: float) -> None:
        """
        Fill the (new, empty) data dir with a standby copy of *primary*.
        """
        started = time.monotonic()
        # The primary's binaries (a standby must run the same major version)
        # and the same account, so both data dirs have one owner.
        bin_dir, account = primary._prepare_binaries()
        self._bin_dir, self._account = bin_dir, account
        base_backup = bin_dir / _BASE_BACKUP
        if not (base_backup.is_file() and os.access(base_backup, os.X_OK)):
            raise EmbeddedPostgresError(f"no {_BASE_BACKUP} in {bin_dir}: cannot make a standby")
        if (self._data_dir / "PG_VERSION").exists():
            raise EmbeddedPostgresError(
                f"data dir {self._data_dir} already holds a cluster; a standby needs an empty one"
            )
        self._create_data_dir(account)
        code, output = self._run(
            [
                str(base_backup),
                "-D",
                str(self._data_dir),
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
            timeout=max(1.0, timeout),
        )
        if code != 0:
            raise EmbeddedPostgresError(
                f"{_BASE_BACKUP} from 127.0.0.1:{primary.port} failed "
                f"(data dir {self._data_dir}): {_one_line(output)}"
            )
        # Copied along but describing the primary's server, not this one.
        for stale in ("server.log", f".s.PGSQL.{primary.port}.lock"):
            with contextlib.suppress(FileNotFoundError):
                (self._data_dir / stale).unlink()
        logger.info(
            "copied PostgreSQL cluster 127.0.0.1:%d to standby data dir %s (%.2fs)",
            primary.port,
            self._data_dir,
            time.monotonic() - started,
        )

    def _ensure_socket_dir(self, account: _Account | None) -> Path:
        """
        Return the unix socket directory: the data dir unless its path is too long.
        """
        if self._socket_dir is None:
            if len(str(self._data_dir)) <= _MAX_SOCKET_DIR_LEN:
                self._socket_dir = self._data_dir
            else:
                self._socket_dir = Path(tempfile.mkdtemp(prefix="notifyd-pgsock-"))
                self._owns_socket_dir = True
                if account is not None:
                    os.chown(self._socket_dir, account.uid, account.gid)
        return self._socket_dir

    def _run(self, args: list[str], timeout: float) -> tuple[int, str]:
        """
        Run a PostgreSQL command (as the unprivileged account under root).

        Returns ``(returncode, combined output)``. Output goes through a
        temporary file, not a pipe: the postmaster that ``pg_ctl start``
        leaves behind could otherwise hold the pipe open and hang us.
        """
        account = self._account
        identity: dict[str, object] = {}
        if account is not None:
            identity = {"user": account.uid, "group": account.gid, "extra_groups": []}
        # PGDATA, PGPORT, ... from the caller's shell must not redirect the commands.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        with tempfile.TemporaryFile("w+") as output:
            try:
                result = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    # Our cwd may be unreadable by the unprivileged account.
                    cwd="/",
                    env=env,
                    timeout=timeout,
                    check=False,
                    **identity,  # type: ignore[arg-type]
                )
            except subprocess.TimeoutExpired:
                raise EmbeddedPostgresError(
                    f"{Path(args[0]).name} did not finish within {timeout:.0f}s "
                    f"(data dir {self._data_dir})"
                ) from None
            except OSError as exc:
                raise EmbeddedPostgresError(f"cannot run {args[0]}: {exc}") from exc
            output.seek(0)
            return result.returncode, output.read()

    def _postmaster_pid(self) -> int | None:
        """
        The pid recorded in ``postmaster.pid``, or ``None``.
        """
        try:
            text = (self._data_dir / "postmaster.pid").read_text()
            pid = int(text.split("\n", 1)[0].strip())
        except (OSError, ValueError):
            return None
        return pid if pid > 0 else None

    def _is_our_postmaster(self, pid: int) -> bool:
        """
        Whether *pid* is alive and, where /proc says, a postgres for our data dir.

        Guards against a stale ``postmaster.pid`` whose pid was reused.
        """
        if not _pid_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return True
        return os.fsencode(str(self._data_dir)) in cmdline

    def _kill_postmaster(self) -> None:
        """
        SIGKILL the postmaster and its backends, if one is still alive.
        """
        pid = self._postmaster_pid()
        if pid is None or not self._is_our_postmaster(pid):
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
        return _one_line(text) if text.strip() else ""


def _one_line(text: str) -> str:
    """
    Collapse command output into one line (its last lines, " | "-separated).
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-_LOG_TAIL_LINES:]) or "(no output)"
