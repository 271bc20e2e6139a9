"""
``NOTIFYD_WORKERS=N``: one parent process and N workers that share the port.

Each worker is a whole notifyd (``notifyd serve`` run again with hidden
``--worker-*`` options): its own LISTEN connection, delivery, pool and
sessions, bound to the same port with ``SO_REUSEPORT`` so the kernel spreads
new connections over them. The parent serves nothing itself; it owns the
worker set and is the process systemd sees:

* ``READY=1`` once every worker is ready; ``WATCHDOG=1`` only while every
  worker is healthy (ready, and its heartbeats coming); ``STATUS=`` sums
  them up. Workers never talk to systemd (``NOTIFY_SOCKET`` is not passed on).
* A worker that exits is started again after a backoff; one whose heartbeats
  stop for ``NOTIFYD_WORKER_STALL_S`` (its event loop stuck) gets SIGTERM,
  SIGKILL after a grace, and is replaced. Workers that keep failing before
  they are ever ready (bad settings, missing schema) end the parent with the
  worker's exit code and its one line.
* SIGTERM/SIGINT stop every worker (bounded by ``NOTIFYD_SHUTDOWN_TIMEOUT_S``
  plus a margin, then SIGKILL); SIGHUP is passed to every worker.

The decisions (is a worker stalled, are all healthy, how long before a
restart, when to give up, the status line) are pure functions at the top;
:class:`Workers` does the I/O. The link itself is :mod:`notifyd.fleet`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .backoff import backoff_delay
from .fleet import LINE_LIMIT, decode_line, metrics_file, send_line
from .settings import Settings
from .systemd import SystemdNotifier, watchdog_interval

__all__ = [
    "FIRST_BEAT_S",
    "START_FAILURES_LIMIT",
    "Worker",
    "Workers",
    "WorkersStopped",
    "all_healthy",
    "crashes_after_exit",
    "exit_code_of",
    "heartbeat_interval",
    "is_stalled",
    "restart_delay",
    "status_line",
]

logger = logging.getLogger(__name__)

# Workers that exit before they were ever ready, this many times in a row
# with no worker becoming ready in between, mean the setup is wrong: stop.
START_FAILURES_LIMIT = 3
# A worker that ran this long before exiting restarts at the shortest delay.
STABLE_AFTER_S = 60.0
RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
# Between SIGTERM and SIGKILL for a stalled worker (a stuck loop rarely
# handles SIGTERM; its sessions are already unserved).
KILL_GRACE_S = 2.0
# On top of the workers' own shutdown timeout, before they are killed.
SHUTDOWN_MARGIN_S = 5.0
STATUS_EVERY_S = 5.0
# Before its first heartbeat a worker is starting its interpreter and
# importing, which takes seconds on a busy machine: not a stuck loop.
FIRST_BEAT_S = 30.0
# What systemd's variables a worker must not see: only the parent notifies.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass(slots=True)
class Worker:
    """
    What the parent knows of one running worker (times on the loop's clock).
    """

    index: int
    pid: int
    started_at: float
    last_beat: float | None = None
    ready: bool = False
    ever_ready: bool = False
    sessions: int = 0
    users: int = 0
    killing: bool = False


@dataclass(frozen=True, slots=True)
class WorkersStopped:
    """
    How the parent ended: its exit code, and the failing worker's line.
    """

    code: int
    failure: str | None = None


# -- decisions ---------------------------------------------------------------


def heartbeat_interval(stall_s: float) -> float:
    """
    Seconds between a worker's heartbeats: several fit in the stall time.
    """
    return min(1.0, stall_s / 5)


def is_stalled(worker: Worker, now: float, stall_s: float) -> bool:
    """
    Whether ``worker`` sent no heartbeat for longer than ``stall_s``, or
    none at all within :data:`FIRST_BEAT_S` (at least ``stall_s``) of its start.
    """
    if worker.last_beat is None:
        return now - worker.started_at > max(stall_s, FIRST_BEAT_S)
    return now - worker.last_beat > stall_s


def all_healthy(workers: Sequence[Worker | None], count: int, now: float, stall_s: float) -> bool:
    """
    Whether all ``count`` workers run, say they are ready, and their
    heartbeats are recent: the only state in which systemd's watchdog is fed
    and ``/readyz`` answers 200.
    """
    running = [worker for worker in workers if worker is not None]
    return len(running) == count and all(
        worker.ready and not worker.killing and not is_stalled(worker, now, stall_s)
        for worker in running
    )


def crashes_after_exit(previous: int, lived_s: float) -> int:
    """
    A slot's count of quick exits in a row, after one more exit of a worker
    that lived ``lived_s``: a long life starts the count again.
    """
    return 1 if lived_s >= STABLE_AFTER_S else previous + 1


def restart_delay(crashes: int) -> float:
    """
    Seconds before a slot's worker is started again after ``crashes`` quick
    exits in a row: doubling, so a crash loop does not spin.
    """
    return backoff_delay(crashes, initial=RESTART_INITIAL_S, maximum=RESTART_MAX_S, jitter=0)


def exit_code_of(returncode: int) -> int:
    """
    The parent's exit code for a worker's: its own when it chose one, 1 when
    a signal ended it.
    """
    return returncode if returncode > 0 else 1


def status_line(workers: Sequence[Worker | None], count: int) -> str:
    """
    systemd's ``STATUS=`` for the whole set.
    """
    running = [worker for worker in workers if worker is not None]
    ready = sum(1 for worker in running if worker.ready)
    sessions = sum(worker.sessions for worker in running)
    users = sum(worker.users for worker in running)
    return (
        f"{ready}/{count} workers ready; {sessions} sessions, {users} users online "
        "(a user on two workers counts twice)"
    )


# -- the parent ----------------------------------------------------------------


class Workers:
    """
    Runs ``settings.workers`` workers until SIGTERM/SIGINT.

    ``command`` starts one worker (``notifyd [--env-file F] serve``); the
    parent adds which worker it is and its link.
    """

    def __init__(
        self,
        settings: Settings,
        command: Sequence[str],
        *,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self._settings = settings
        self._count = settings.workers
        self._command = list(command)
        self._environ = dict(environ)
        self._notifier = SystemdNotifier.from_environment(environ)
        self._watchdog_s = watchdog_interval(environ, os.getpid())
        self._stall_s = settings.worker_stall_s
        self._workers: list[Worker | None] = [None] * self._count
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._links: dict[int, asyncio.StreamWriter] = {}
        self._stop = asyncio.Event()
        self._start_failures = 0
        self._result = WorkersStopped(code=0)
        self._directory: Path | None = None
        self._kills: set[asyncio.Task[None]] = set()

    async def run(self) -> WorkersStopped:
        """
        Start the workers and keep them running until a stop signal or a
        setup that keeps failing.
        """
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        self._directory = Path(tempfile.mkdtemp(prefix="notifyd-workers-"))
        logger.info("starting %d workers", self._count)
        try:
            slots = [
                asyncio.create_task(self._keep(index), name=f"worker-{index}")
                for index in range(self._count)
            ]
            ticker = asyncio.create_task(self._tick(), name="workers-tick")
            ticker.add_done_callback(self._supervision_ended)
            await self._stop.wait()
            logger.info("shutting down %d workers", len(self._processes))
            self._notifier.notify("STOPPING=1")
            ticker.cancel()
            self._signal_all(signal.SIGTERM)
            _, late = await asyncio.wait(
                slots, timeout=self._settings.shutdown_timeout_s + SHUTDOWN_MARGIN_S
            )
            if late:
                logger.error("%d workers did not stop in time; killing them", len(late))
                self._signal_all(signal.SIGKILL)
                await asyncio.wait(late)
            return self._result
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            for task in self._kills:
                task.cancel()
            self._notifier.close()
            shutil.rmtree(self._directory, ignore_errors=True)

    def _supervision_ended(self, ticker: asyncio.Task[None]) -> None:
        """
        The tick runs until the stop; if it dies, no stalled worker is
        replaced and systemd's watchdog starves while the workers look
        fine: stop them all with exit code 1 and the reason, loudly.
        """
        if ticker.cancelled() or self._stop.is_set():
            return
        reason = f"supervising the workers failed: {ticker.exception()!r}"
        logger.error("%s; stopping", reason)
        self._result = WorkersStopped(code=1, failure=reason)
        self._stop.set()

    def _signal_all(self, signum: int) -> None:
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    def _reload(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
        self._signal_all(signal.SIGHUP)
        logger.info("reload passed to %d workers", len(self._processes))
        self._notifier.notify("READY=1")

    async def _keep(self, index: int) -> None:
        """
        Keep slot ``index`` filled until the parent stops.
        """
        loop = asyncio.get_running_loop()
        crashes = 0
        while not self._stop.is_set():
            started = loop.time()
            returncode, ever_ready, last_line = await self._run_worker(index)
            if self._stop.is_set():
                return
            if not ever_ready and returncode != 0:
                self._start_failures += 1
                if self._start_failures >= START_FAILURES_LIMIT:
                    logger.error(
                        "workers keep failing before they are ready (%d in a row); stopping",
                        self._start_failures,
                    )
                    self._result = WorkersStopped(exit_code_of(returncode), last_line)
                    self._stop.set()
                    return
            crashes = crashes_after_exit(crashes, loop.time() - started)
            delay = restart_delay(crashes)
            logger.warning(
                "worker %d exited with %d; starting it again in %.1fs", index, returncode, delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _run_worker(self, index: int) -> tuple[int, bool, str | None]:
        """
        Run one worker in slot ``index`` until it exits: its return code,
        whether it was ever ready, and the last line it wrote to stderr.
        """
        assert self._directory is not None
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {k: v for k, v in self._environ.items() if k not in SYSTEMD_VARIABLES}
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command,
                "--worker-index",
                str(index),
                "--worker-count",
                str(self._count),
                "--worker-fd",
                str(theirs.fileno()),
                "--worker-dir",
                str(self._directory),
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            theirs.close()
        worker = Worker(index=index, pid=process.pid, started_at=loop.time())
        self._workers[index] = worker
        self._processes[index] = process
        logger.info("worker %d started (pid %d)", index, process.pid)
        if self._stop.is_set():
            process.send_signal(signal.SIGTERM)
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT)
        self._links[index] = writer
        last_line: list[str] = []
        assert process.stderr is not None
        relay = asyncio.create_task(self._relay(worker, process.stderr, last_line))
        listen = asyncio.create_task(self._listen(worker, reader))
        try:
            returncode = await process.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(relay, 1.0)
        finally:
            relay.cancel()
            listen.cancel()
            writer.close()
            self._links.pop(index, None)
            self._processes.pop(index, None)
            self._workers[index] = None
            metrics_file(self._directory, index).unlink(missing_ok=True)
        return returncode, worker.ever_ready, last_line[-1] if last_line else None

    async def _relay(
        self, worker: Worker, stderr: asyncio.StreamReader, last_line: list[str]
    ) -> None:
        """
        A worker's stderr (its one-line errors) into the parent's log; the
        last line is kept for the parent's own exit.
        """
        while line := await stderr.readline():
            text = line.decode(errors="replace").rstrip()
            if not text:
                continue
            logger.error("worker %d (pid %d): %s", worker.index, worker.pid, text)
            last_line.append(text.removeprefix("notifyd: "))
            del last_line[:-1]

    async def _listen(self, worker: Worker, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while line := await reader.readline():
            beat = decode_line(line).get("beat")
            if not isinstance(beat, dict):
                continue
            worker.last_beat = loop.time()
            worker.ready = bool(beat.get("ready"))
            worker.sessions = int(beat.get("sessions", 0))
            worker.users = int(beat.get("users", 0))
            if worker.ready and not worker.ever_ready:
                worker.ever_ready = True
                self._start_failures = 0
                logger.info("worker %d (pid %d) is ready", worker.index, worker.pid)

    async def _tick(self) -> None:
        """
        Replace stalled workers; tell systemd and the workers whether all are
        healthy.
        """
        loop = asyncio.get_running_loop()
        tick = heartbeat_interval(self._stall_s)
        if self._watchdog_s is not None:
            tick = min(tick, self._watchdog_s)
        ready_sent = False
        last_status = 0.0
        while True:
            now = loop.time()
            for worker in self._workers:
                if worker is not None and not worker.killing:
                    if is_stalled(worker, now, self._stall_s):
                        self._replace_stalled(worker)
            healthy = all_healthy(self._workers, self._count, now, self._stall_s)
            fields = []
            if healthy and not ready_sent:
                ready_sent = True
                fields.append("READY=1")
                logger.info("all %d workers are ready", self._count)
            if healthy and ready_sent and self._watchdog_s is not None:
                fields.append("WATCHDOG=1")
            if now - last_status >= STATUS_EVERY_S or "READY=1" in fields:
                fields.append(f"STATUS={status_line(self._workers, self._count)}")
                last_status = now
            if fields:
                self._notifier.notify(*fields)
            for writer in list(self._links.values()):
                send_line(writer, {"all_ready": healthy})
            await asyncio.sleep(tick)

    def _replace_stalled(self, worker: Worker) -> None:
        process = self._processes.get(worker.index)
        if process is None:
            return
        worker.killing = True
        logger.error(
            "worker %d (pid %d) sent no heartbeat for %.1fs: its loop is stuck; replacing it",
            worker.index,
            worker.pid,
            self._stall_s,
        )
        task = asyncio.create_task(self._kill(process, min(KILL_GRACE_S, self._stall_s)))
        self._kills.add(task)
        task.add_done_callback(self._kills.discard)

    @staticmethod
    async def _kill(process: asyncio.subprocess.Process, grace: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
