"""
Where the PostgreSQL binaries are, and running them as an account PostgreSQL accepts.

The binaries are the ``pgserver`` wheel's (``notifyd[embedded]``), or those
in the directory ``NOTIFYD_PG_BIN`` names. What pgserver lacks, one line per need:

- its bin dir is known only by importing it, which loads psutil, platformdirs
  and fasteners and, as root without XDG_RUNTIME_DIR, prints a warning:
  :func:`find_postgres_bin_dir` locates the package without importing it;
- it runs only its own binaries: ``NOTIFYD_PG_BIN`` selects others (a system
  install, another major version);
- its command wrappers (``pgserver.initdb``, ``pgserver.pg_ctl``) log the
  output and raise without it: :meth:`PostgresBinaries.run` returns it, so
  errors can quote it on one line;
- as root (initdb and postgres refuse root) it creates a ``pgserver`` account
  with useradd and chmods o+rx every ancestor of site-packages and of the data
  dir: here commands run as the existing ``nobody`` account and, when
  ``nobody`` cannot read the install (a venv under ``/root``), from a
  world-readable copy in the temp dir (:func:`_shared_install`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EmbeddedPostgresError", "PostgresBinaries", "find_postgres_bin_dir", "one_line"]

logger = logging.getLogger(__name__)

BIN_ENV_VAR = "NOTIFYD_PG_BIN"
UNPRIVILEGED_ACCOUNT = "nobody"
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_NOT_FOUND = (
    "no PostgreSQL binaries found: pip install 'notifyd[embedded]' "
    f"or set {BIN_ENV_VAR} to a PostgreSQL bin directory"
)
_OUTPUT_TAIL_LINES = 20


class EmbeddedPostgresError(RuntimeError):
    """
    The embedded cluster could not be found, initialised, started or stopped.

    The message is a single line, fit for a log or a CLI error.
    """


def find_postgres_bin_dir() -> Path:
    """
    Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    ``NOTIFYD_PG_BIN`` wins and is not second-guessed: set but lacking the
    binaries, it raises rather than silently using others. Otherwise the
    pgserver wheel's ``pginstall/bin``. Raises :exc:`EmbeddedPostgresError`
    when neither has the binaries.
    """
    override = os.environ.get(BIN_ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if _has_binaries(path):
            return path.resolve()
        raise EmbeddedPostgresError(
            f"{_NOT_FOUND} ({BIN_ENV_VAR}={override} has no initdb/pg_ctl/postgres)"
        )
    # find_spec on a top-level name locates the package without running its
    # __init__ (see the module docstring for what that would do).
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        spec = None
    for location in (spec and spec.submodule_search_locations) or ():
        candidate = Path(location) / "pginstall" / "bin"
        if _has_binaries(candidate):
            return candidate.resolve()
    raise EmbeddedPostgresError(_NOT_FOUND)


def _has_binaries(bin_dir: Path) -> bool:
    """
    Whether *bin_dir* holds executable ``initdb``, ``pg_ctl`` and ``postgres``.
    """
    return all(
        (bin_dir / name).is_file() and os.access(bin_dir / name, os.X_OK)
        for name in _REQUIRED_BINARIES
    )


def one_line(text: str) -> str:
    """
    Collapse command output or a log into one line (its last lines, " | "-separated).
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-_OUTPUT_TAIL_LINES:]) or "(no output)"


@dataclass(frozen=True)
class _Account:
    """
    The unprivileged account commands run as when we are root.
    """

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class PostgresBinaries:
    """
    A bin dir and the account its programs run as (``None``: ourselves).
    """

    bin_dir: Path
    account: _Account | None

    @classmethod
    def locate(cls) -> PostgresBinaries:
        """
        Find the binaries; as root, also the account and binaries it can read.
        """
        account = _unprivileged_account()
        bin_dir = find_postgres_bin_dir()
        if account is not None and not all(
            _tree_world_readable(tree) for tree in _install_trees(bin_dir)
        ):
            bin_dir = _shared_install(bin_dir)
        return cls(bin_dir, account)

    def run(self, program: str, data_dir: Path, args: list[str], timeout: float) -> tuple[int, str]:
        """
        Run ``<program> -D <data_dir> <args>`` as the account; return ``(returncode, output)``.

        Output (stdout and stderr together) goes through a temporary file,
        not a pipe: the postmaster that ``pg_ctl start`` leaves behind would
        otherwise hold the pipe open and hang us. Raises
        :exc:`EmbeddedPostgresError` when the program cannot run or does not
        finish within *timeout* seconds.
        """
        account = self.account
        # PGDATA, PGPORT, ... from the caller's shell must not redirect the commands.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        with tempfile.TemporaryFile("w+") as output:
            try:
                result = subprocess.run(
                    [str(self.bin_dir / program), "-D", str(data_dir), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    # Our cwd may be unreadable by the unprivileged account.
                    cwd="/",
                    env=env,
                    timeout=timeout,
                    check=False,
                    user=account.uid if account else None,
                    group=account.gid if account else None,
                    extra_groups=[] if account else None,
                )
            except subprocess.TimeoutExpired:
                raise EmbeddedPostgresError(
                    f"{program} did not finish within {timeout:.0f}s (data dir {data_dir})"
                ) from None
            except OSError as exc:
                raise EmbeddedPostgresError(f"cannot run {program}: {exc}") from exc
            output.seek(0)
            return result.returncode, output.read()

    def make_data_dir(self, data_dir: Path) -> None:
        """
        Create *data_dir* (mode 700) and, under root, hand it to the account if empty.
        """
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot create data dir {data_dir}: {exc}") from exc
        account = self.account
        if account is None:
            return
        if not all(_can_traverse(parent, account) for parent in data_dir.parents):
            raise EmbeddedPostgresError(
                f"data dir {data_dir} is not reachable by '{account.name}', "
                "the account PostgreSQL runs as under root; use a directory "
                "under a world-searchable path such as /tmp"
            )
        # initdb and pg_basebackup insist on owning the directory; only take
        # over an empty one.
        if not any(data_dir.iterdir()):
            os.chown(data_dir, account.uid, account.gid)


def _unprivileged_account() -> _Account | None:
    """
    Return the account to run PostgreSQL as, or ``None`` when not root.
    """
    if os.geteuid() != 0:
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
    resolve; the hash covers the source path and the ``postgres`` binary's
    size and mtime, so a reinstall gets a fresh copy. The copy is built and
    checked under a temporary name, then renamed into place, so concurrent
    callers either win the rename or use the winner's copy. Raises
    :exc:`EmbeddedPostgresError` if the copy does not run or an existing
    cache dir could have been planted by another user.
    """
    root = bin_dir.parent
    anchor = root.parent.parent
    postgres = (bin_dir / "postgres").stat()
    fingerprint = f"{root}\0{postgres.st_size}\0{postgres.st_mtime_ns}"
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
                why = one_line(check.stderr + check.stdout)
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
