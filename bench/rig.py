"""
The processes of a run: PostgreSQL (embedded unless ``--dsn``), the server
under test, the client and writer processes; started, counted (CPU) and
stopped through one :class:`Rig`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from notifyd.demo.embedded import EmbeddedPostgres

from .control import ROOT, Child, free_port, wait_healthy
from .measure import busy_seconds, cpu_seconds, tree_cpu_seconds
from .plan import Plan
from .progress import progress

__all__ = [
    "PG_SETTINGS",
    "Rig",
    "children_cpu",
    "postgres",
    "postmaster_pid",
    "start_clients",
    "start_server",
    "start_writers",
]

# track_commit_timestamp: the push-pipeline phases measure latency from each
# row's commit timestamp (bench/accounting.py).
PG_SETTINGS = {
    "max_connections": "300",
    "shared_buffers": "256MB",
    "track_commit_timestamp": "on",
}


@contextlib.contextmanager
def postgres(dsn: str | None) -> Iterator[tuple[str, int | None]]:
    """
    The DSN of the database to use and its postmaster's pid (None for an
    external ``dsn``, whose CPU is not counted): ``dsn`` itself, or an
    embedded PostgreSQL with :data:`PG_SETTINGS`, removed on exit.
    """
    if dsn:
        yield dsn, None
        return
    embedded = EmbeddedPostgres(settings=PG_SETTINGS)
    try:
        progress("starting embedded PostgreSQL")
        embedded.start(timeout=120)
        yield embedded.dsn, postmaster_pid(embedded)
    finally:
        embedded.cleanup()


def postmaster_pid(embedded: EmbeddedPostgres) -> int | None:
    """
    The pid of an embedded cluster's postmaster (None if unknown).
    """
    try:
        return int((embedded.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def children_cpu(children: list[Child]) -> float:
    """
    CPU seconds the live ``children`` have used.
    """
    total = 0.0
    for child in children:
        with contextlib.suppress(OSError):
            total += cpu_seconds(child.pid)
    return total


class Rig:
    """
    The database, the child processes, and where their logs go.
    """

    def __init__(
        self,
        plan: Plan,
        dsn: str,
        pg_pid: int | None,
        logs: Path,
        notifyd_env: dict[str, str],
    ) -> None:
        self.plan = plan
        self.dsn = dsn
        self.pg_pid = pg_pid
        self.logs = logs
        self.notifyd_env = notifyd_env
        self.secret = secrets.token_urlsafe(32)
        self.children: list[Child] = []
        self.admin: asyncpg.Connection | None = None
        self.sessions = [f"user-{i}" for i in range(plan.sessions)]
        self.online = self.sessions[: plan.users]
        self.calm_left = plan.calm_budget_s

    @property
    def db(self) -> asyncpg.Connection:
        assert self.admin is not None
        return self.admin

    def pg_cpu(self) -> float | None:
        return None if self.pg_pid is None else tree_cpu_seconds(self.pg_pid)

    async def wait_calm(
        self, below: float = 0.25, window: float = 0.5, longest: float = 10.0
    ) -> float:
        """
        Wait (at most ``longest`` s, and within the run's budget) until other
        tenants use less than ``below`` cores; returns the last reading.
        """
        started = time.monotonic()
        deadline = started + min(longest, self.calm_left)
        while True:
            busy0, own0, wall0 = busy_seconds(), self.own_cpu(), time.monotonic()
            await asyncio.sleep(window)
            other = ((busy_seconds() - busy0) - (self.own_cpu() - own0)) / (
                time.monotonic() - wall0
            )
            if other < below or time.monotonic() >= deadline:
                break
        # The first window is a reading, not a wait.
        self.calm_left = max(0.0, self.calm_left - (time.monotonic() - started - window))
        return max(0.0, other)

    def own_cpu(self) -> float:
        """
        CPU seconds of this process, its children and Postgres.
        """
        return cpu_seconds(os.getpid()) + (self.pg_cpu() or 0.0) + children_cpu(self.children)

    async def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        control: bool = False,
    ) -> Child:
        child = await Child.spawn(name, argv, self.logs / f"{name}.log", env=env, control=control)
        self.children.append(child)
        return child

    async def retire(
        self, child: Child, sig: int = signal.SIGTERM, timeout: float = 20.0
    ) -> int | None:
        try:
            return await child.stop(sig, timeout)
        finally:
            self.children.remove(child)

    async def close(self) -> None:
        for child in reversed(list(self.children)):
            with contextlib.suppress(Exception):
                await self.retire(child, timeout=10.0)
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await self.admin.close(timeout=5)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFYD_", "PG"))}


async def start_server(
    rig: Rig,
    kind: str,
    *,
    profile: Path | None = None,
    name: str | None = None,
    settings: dict[str, str] | None = None,
) -> tuple[Child, int]:
    """
    Start the ``kind`` server (notifyd, or naive) on a free port and wait
    until it is healthy; with ``profile``, notifyd under cProfile writing
    there. ``name`` tells its log from other instances'; ``settings`` are
    notifyd's beyond the run's own.
    """
    port = free_port()
    env = _clean_env()
    if kind == "notifyd":
        env.update(
            NOTIFYD_DSN=rig.dsn, NOTIFYD_HOST="127.0.0.1", NOTIFYD_PORT=str(port),
            NOTIFYD_JWT_SECRET=rig.secret, NOTIFYD_LOG_LEVEL="WARNING",
            NOTIFYD_MAX_SESSIONS_PER_USER="1000",
        )  # fmt: skip
        env.update(rig.notifyd_env)
        env.update(settings or {})
        argv = [sys.executable]
        if profile is not None:
            argv += ["-m", "cProfile", "-o", str(profile)]
        argv += ["-m", "notifyd", "serve"]
    else:
        argv = [sys.executable, "-m", "bench.naive_server", "--dsn", rig.dsn, "--port", str(port)]
    name = name or kind + ("-profiled" if profile else "")
    gc_log = None
    if profile is None:
        # The collector probe (bench/probe/sitecustomize.py); the command
        # line stays the same.
        gc_log = rig.logs / f"{name}.gc"
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT / "bench" / "probe"), env.get("PYTHONPATH")])
        )
        env["BENCH_GC_LOG"] = str(gc_log)
    child = await rig.spawn(name, argv, env=env)
    child.gc_log = gc_log
    await wait_healthy(child, port, 60.0)
    return child, port


async def start_clients(rig: Rig, kind: str, port: int) -> list[Child]:
    """
    The plan's client processes (``bench/clients.py``) for the server on
    ``port``; no sessions open yet.
    """
    config = json.dumps({"kind": kind, "url": f"ws://127.0.0.1:{port}", "secret": rig.secret})
    return [
        await rig.spawn(
            f"{kind}-clients-{k}", [sys.executable, "-m", "bench.clients", config], control=True
        )
        for k in range(rig.plan.client_procs)
    ]


async def start_writers(rig: Rig, name: str, conns: int, synchronous_commit: str) -> list[Child]:
    """
    The plan's writer processes (``bench/writers.py``), ``conns``
    connections each, returned once every connection is open.
    """
    config = json.dumps({"dsn": rig.dsn, "conns": conns, "synchronous_commit": synchronous_commit})
    writers = [
        await rig.spawn(
            f"{name}-{k}", [sys.executable, "-m", "bench.writers", config], control=True
        )
        for k in range(rig.plan.writer_procs)
    ]
    await asyncio.gather(*(w.request({"cmd": "ping"}, timeout=60) for w in writers))
    return writers
