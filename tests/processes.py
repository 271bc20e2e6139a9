"""
Helpers for tests that run ``notifyd`` as a real subprocess (``python -m
notifyd``): a free port, a clean environment, one-shot CLI runs, background
processes that are always stopped, and deadline-bounded waits for them.

Plain functions and async context managers, not fixtures, so a test module
only has to import what it uses. Every wait polls with a deadline; every
process started here is killed (after its stop signal and a grace period)
when its context manager exits, whatever the test did.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import IO

import pytest

from notifyd.auth import TokenVerifier
from notifyd.settings import Settings

from .conftest import SECRET, TIMEOUT

# Interpreter start-up plus a database round trip; generous on purpose.
CLI_TIMEOUT = 3 * TIMEOUT

# Prefixes of the variables a subprocess must not inherit from the test runner.
NOTIFYD_PREFIXES: tuple[str, ...] = ("NOTIFYD_",)
# Under systemd-like tests the sd_notify variables must not leak in either.
SYSTEMD_PREFIXES: tuple[str, ...] = ("NOTIFYD_", "NOTIFY_SOCKET", "WATCHDOG_")

# How often the polling waits below look again.
_POLL_S = 0.05


# -- ports, environment, tokens -----------------------------------------------


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on (bound, then released).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(*, strip: tuple[str, ...] = NOTIFYD_PREFIXES, **variables: str) -> dict[str, str]:
    """
    os.environ without the variables whose names start with any of ``strip``
    (by default every ``NOTIFYD_*``), plus ``variables``.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith(strip)}
    env.update(variables)
    return env


def serve_env(
    dsn: str, port: int, *, strip: tuple[str, ...] = NOTIFYD_PREFIXES, **settings: str
) -> dict[str, str]:
    """
    :func:`clean_env` plus ``NOTIFYD_DSN`` and ``NOTIFYD_PORT`` for ``serve``,
    plus ``settings``.
    """
    return clean_env(strip=strip, NOTIFYD_DSN=dsn, NOTIFYD_PORT=str(port), **settings)


def mint(user: str, secret: str = SECRET) -> str:
    """
    A token for ``user`` signed with ``secret`` (the test SECRET by default).
    """
    return TokenVerifier.from_settings(Settings(jwt_secret=secret)).mint(user)


# -- one-shot runs --------------------------------------------------------------


@dataclass
class CliResult:
    """
    A finished run: exit code and decoded output.
    """

    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        """
        The non-blank lines of stderr.
        """
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def stdout_lines(self) -> list[str]:
        """
        The non-blank lines of stdout.
        """
        return [line for line in self.stdout.splitlines() if line.strip()]


async def run_command(*argv: str, env: Mapping[str, str], timeout: float) -> CliResult:
    """
    Run ``argv`` to completion with stdin closed and stdout/stderr captured;
    fail the test (after killing it) if it outlives ``timeout``.
    """
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout}s")
    finally:
        await _kill(process)
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


async def run_cli(*args: str, env: Mapping[str, str], timeout: float = CLI_TIMEOUT) -> CliResult:
    """
    Run ``python -m notifyd ARGS`` to completion (killed and failed on timeout).
    """
    return await run_command(sys.executable, "-m", "notifyd", *args, env=env, timeout=timeout)


# -- background processes -------------------------------------------------------


@dataclass
class NotifydProcess:
    """
    A long-running ``python -m notifyd ARGS``. Its log (stdout) and its
    stderr go to one file that can be read at any time; started with
    ``stdout_pipe=True``, stdout is ``process.stdout`` instead.
    """

    args: tuple[str, ...]
    process: asyncio.subprocess.Process
    output_file: IO[bytes]

    def output(self) -> str:
        """
        Everything written to the file so far: the log and stderr, or only
        stderr when stdout is a pipe.
        """
        # pread: the child shares this file's offset, so never seek it.
        fd = self.output_file.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    async def wait_for_output(self, *fragments: str, timeout: float) -> str:
        """
        Poll until one output line contains every fragment; return that line.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in self.output().splitlines():
                if all(fragment in line for fragment in fragments):
                    return line
            assert self.process.returncode is None, (
                f"notifyd {' '.join(self.args)} exited ({self.process.returncode}): {self.output()}"
            )
            assert time.monotonic() < deadline, (
                f"no output line with {fragments} within {timeout}s: {self.output()}"
            )
            await asyncio.sleep(_POLL_S)

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 2 * TIMEOUT) -> int:
        """
        Send ``signum``, then return the exit code; killed and failed if it
        does not exit within ``timeout``.
        """
        self.process.send_signal(signum)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            await _kill(self.process)
            pytest.fail(
                f"notifyd {' '.join(self.args)} ignored signal {signum} for {timeout}s: {self.output()}"
            )


@contextlib.asynccontextmanager
async def running_notifyd(
    *args: str,
    env: Mapping[str, str],
    stdout_pipe: bool = False,
    stop_signal: int = signal.SIGTERM,
    grace: float = 2 * TIMEOUT,
    sigint_ignored: bool = False,
) -> AsyncIterator[NotifydProcess]:
    """
    Start ``python -m notifyd ARGS`` in the background (stdin closed; stdout,
    where ``serve`` and ``demo`` log, and stderr to one temporary file, or
    stdout to a pipe with ``stdout_pipe``). On exit, if it still runs, it gets ``stop_signal``, then SIGKILL
    if it has not exited within ``grace`` seconds. With ``sigint_ignored`` it
    starts as a background job of a shell script would, with SIGINT ignored.
    """
    output_file = tempfile.TemporaryFile()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "notifyd",
            *args,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if stdout_pipe else output_file,
            stderr=output_file,
            preexec_fn=_ignore_sigint if sigint_ignored else None,
        )
        try:
            yield NotifydProcess(args, process, output_file)
        finally:
            await _stop(process, stop_signal, grace)
    finally:
        output_file.close()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


async def _stop(process: asyncio.subprocess.Process, signum: int, grace: float) -> None:
    """
    If ``process`` still runs: ``signum``, up to ``grace`` seconds, then SIGKILL.
    """
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        await _kill(process)


async def _kill(process: asyncio.subprocess.Process) -> None:
    """
    SIGKILL ``process`` if it still runs, and reap it.
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


# -- waiting on a process's ports -------------------------------------------------


async def _accepts(
    port: int, refused: tuple[type[OSError], ...] = (ConnectionRefusedError, TimeoutError)
) -> bool:
    """
    Whether something accepts a TCP connection on 127.0.0.1:port right now;
    ``refused`` are the errors that mean no (no answer within a second is a
    TimeoutError); any other error propagates.
    """
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    except refused:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def wait_until_listening(port: int, server: NotifydProcess, timeout: float = TIMEOUT) -> None:
    """
    Poll until ``server`` accepts TCP connections on 127.0.0.1:port; fail if
    it exits first or ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    while not await _accepts(port, refused=(OSError,)):
        assert server.process.returncode is None, f"notifyd serve exited: {server.output()}"
        assert time.monotonic() < deadline, (
            f"notifyd serve did not listen on {port} within {timeout}s: {server.output()}"
        )
        await asyncio.sleep(_POLL_S)


async def wait_until_refused(port: int, timeout: float) -> None:
    """
    Poll until nothing accepts TCP connections on 127.0.0.1:port.
    """
    deadline = time.monotonic() + timeout
    while await _accepts(port):
        assert time.monotonic() < deadline, f"something still listens on port {port}"
        await asyncio.sleep(_POLL_S)


async def wait_until_healthy(
    port: int, server: NotifydProcess, timeout: float = 3 * TIMEOUT, path: str = "/healthz"
) -> None:
    """
    Poll GET ``path`` (/healthz, or /readyz) on 127.0.0.1:port until it
    answers 200; fail if ``server`` exits first or ``timeout`` passes.
    """

    def get() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    deadline = time.monotonic() + timeout
    while True:
        status = await asyncio.to_thread(get)
        if status == 200:
            return
        assert server.process.returncode is None, server.output()
        assert time.monotonic() < deadline, (
            f"{path} never answered 200 within {timeout}s (last {status}): {server.output()}"
        )
        await asyncio.sleep(_POLL_S)
