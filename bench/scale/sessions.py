"""
Many sessions on one notifyd process: opened in stages from several client
processes and loopback source addresses (RSS and time at each stage), then
held idle (the server's CPU while only pings flow), announced to, and
written to at a paced rate (commit-to-receipt latency of every row while
they are all connected).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from ..contenders import Contender, close_contender
from ..control import Child
from ..measure import cluster_cpu_seconds, tree_cpu_seconds, tree_rss_kib, wait_quiet
from ..phases.announcement import announcements
from ..phases.pipeline import one_run
from ..progress import progress
from ..rig import Rig, start_server
from ..sessions import open_sessions

__all__ = ["SessionsPlan", "descriptor_cap", "loopback_sources", "sessions_phase"]

# One source address reaches one destination from at most the ephemeral
# port range (about 28,000 ports); each address is given at most this many.
_PER_SOURCE = 20_000
# Descriptors a notifyd process needs besides its sessions' sockets.
_RESERVED_FDS = 500
# Further tries for a session that failed to open (a handshake timed out on
# a busy machine).
_RETRIES = 3


@dataclass(frozen=True)
class SessionsPlan:
    """
    What the sessions phase does.
    """

    sessions: int  # the target
    limit: int  # the descriptor limit of every process
    workers: int  # NOTIFYD_WORKERS of the instance (1: one process)
    client_procs: int
    stages: int  # sessions are opened in this many equal steps
    concurrency: int  # handshakes in flight per client process
    idle_s: float
    rate: int  # commits/s while all sessions are connected
    reps: int  # paced runs at that rate


def descriptor_cap(sessions: int, limit: int, processes: int = 1) -> tuple[int, str | None]:
    """
    How many of ``sessions`` an instance of ``processes`` processes (its
    workers) can hold under a descriptor limit of ``limit`` each (less a
    reserve for database connections, the listening socket and logs), and
    why fewer when it is fewer.
    """
    room = (limit - _RESERVED_FDS) * processes
    if sessions <= room:
        return sessions, None
    return room, (
        f"RLIMIT_NOFILE of {limit:,} descriptors per process"
        + (f" ({processes} worker processes)" if processes > 1 else "")
        + ": the hard limit could not be raised here (raising it takes root with "
        "CAP_SYS_RESOURCE; fs.nr_open is the ceiling)"
    )


def loopback_sources(sessions: int) -> list[str]:
    """
    Enough loopback addresses (127.0.0.2, 127.0.0.3, ...) to give each at
    most :data:`_PER_SOURCE` of ``sessions``, and at least two.
    """
    count = max(2, -(-sessions // _PER_SOURCE))
    if count > 250:
        raise ValueError(f"{sessions} sessions need more than 250 loopback source addresses")
    return [f"127.0.0.{2 + i}" for i in range(count)]


async def _start(rig: Rig, plan: SessionsPlan, users: list[str]) -> Contender:
    settings = {"NOTIFYD_WORKERS": str(plan.workers)} if plan.workers > 1 else {}
    server, port = await start_server(rig, "notifyd", name="notifyd-sessions", settings=settings)
    config = json.dumps({"kind": "notifyd", "url": f"ws://127.0.0.1:{port}", "secret": rig.secret})
    clients: list[Child] = [
        await rig.spawn(
            f"sessions-clients-{k}", [sys.executable, "-m", "bench.receipts", config], control=True
        )
        for k in range(plan.client_procs)
    ]
    return Contender("notifyd", server, port, clients, users)


async def _at_stage(
    rig: Rig, contender: Contender, plan: SessionsPlan, opened: int, clock: str, stage: int
) -> dict[str, Any]:
    """
    One announcement and one paced run with the sessions open so far: how
    the figures grow with the count, measured in the same run.
    """
    announced = await announcements(rig, contender.clients, opened, count=1, first=100 + stage)
    everyone = contender.users
    contender.users = everyone[:opened]
    try:
        run = await one_run(rig, contender, plan.rate, f"st{stage}", clock)
    finally:
        contender.users = everyone
    await wait_quiet(contender.server.pid, timeout=15)
    return {
        "announcement_last_ms": announced["median_last_ms"],
        "p50_ms": run["latency_ms"]["p50"],
        "p99_ms": run["latency_ms"]["p99"],
        "lost": run["lost"],
        "duplicates": run["duplicates"],
        "committed_per_s": run["committed_per_s"],
        "server_cpu_us_per_delivery": run["server_cpu_us_per_delivery"],
    }


async def _open_in_stages(
    rig: Rig,
    contender: Contender,
    plan: SessionsPlan,
    total: int,
    sources: list[str],
    clock: str,
) -> dict[str, Any]:
    """
    Open the plan's sessions stage by stage, reading the server's RSS after
    each; stop at the first stage where more than 1 % failed, and say why.
    """
    server = contender.server
    await wait_quiet(server.pid, timeout=30)
    rss0 = tree_rss_kib(server.pid)
    stages: list[dict[str, Any]] = []
    opened = failed = 0
    open_s = 0.0
    stopped_by: str | None = None
    size = -(-total // plan.stages)
    for first in range(0, total, size):
        users = contender.users[first : first + size]
        started = time.monotonic()
        stage_failed = retried = 0
        errors: list[str] = []
        try:
            # A session that fails to open tries again, as a client would
            # reconnect; only those still failing after the last try count.
            for attempt in range(1 + _RETRIES):
                result = await open_sessions(
                    contender.clients, users, concurrency=plan.concurrency, sources=sources,
                    timeout=3600, failures_allowed=1.0,
                )  # fmt: skip
                opened += result["opened"]
                errors = result["errors"] or errors
                users = result["failed_users"]
                if attempt:
                    retried += result["opened"]
                if not users:
                    break
            stage_failed = len(users)
        except RuntimeError as exc:  # a client process gave up (ran out of something)
            stopped_by = str(exc)[:300]
            break
        seconds = time.monotonic() - started
        open_s += seconds
        failed += stage_failed
        await wait_quiet(server.pid, timeout=60)
        rss = tree_rss_kib(server.pid)
        stages.append(
            {"sessions": opened, "failed": stage_failed, "opened_on_retry": retried,
             "seconds": seconds, "rss_kib": rss}
        )  # fmt: skip
        progress(
            f"  {opened} sessions open ({retried} on a retry, {stage_failed} failed) in "
            f"{seconds:.1f}s; server RSS {rss / 1024:.0f} MiB"
        )
        if stage_failed > size // 100:
            stopped_by = f"{stage_failed} of {size} failed to open, e.g. {errors[:1]}"
            break
        stages[-1].update(await _at_stage(rig, contender, plan, opened, clock, len(stages)))
        if not server.running:
            stopped_by = f"notifyd exited ({server.process.returncode}): {server.log_tail(3)}"
            break
    rss1 = stages[-1]["rss_kib"] if stages else rss0
    return {
        "opened": opened,
        "failed": failed,
        "opened_on_retry": sum(stage["opened_on_retry"] for stage in stages),
        "stopped_by": stopped_by,
        "open_s": open_s,
        "opens_per_s": opened / open_s if open_s else None,
        "stages": stages,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_session": (rss1 - rss0) / opened if opened else None,
        "sources": sources,
        "client_procs": plan.client_procs,
    }


async def _idle(rig: Rig, server: Child, seconds: float) -> dict[str, Any]:
    """
    The server's and Postgres's CPU while the sessions are open and nothing
    is written (the server's pings, the probe, the clients' pongs).
    """
    await wait_quiet(server.pid, timeout=60)
    cpu0, wall0 = tree_cpu_seconds(server.pid), time.monotonic()
    pg0 = None if rig.pg_pid is None else cluster_cpu_seconds(rig.pg_pid)
    await asyncio.sleep(seconds)  # the measuring window itself
    cpu1, wall1 = tree_cpu_seconds(server.pid), time.monotonic()
    pg1 = None if rig.pg_pid is None else cluster_cpu_seconds(rig.pg_pid)
    wall = wall1 - wall0
    return {
        "seconds": wall,
        "server_cpu_share": (cpu1 - cpu0) / wall,
        "postgres_cpu_share": None if pg0 is None or pg1 is None else (pg1 - pg0) / wall,
    }


async def sessions_phase(rig: Rig, plan: SessionsPlan, clock: str) -> dict[str, Any]:
    """
    Every figure of the many-sessions phase (``results["scale"]["sessions"]``).
    """
    held, capped_by = descriptor_cap(plan.sessions, plan.limit, plan.workers)
    if capped_by:
        progress(f"only {held} of {plan.sessions} sessions fit: {capped_by}")
    # Each client process holds its share under the same limit.
    procs = max(plan.client_procs, -(-held // (plan.limit - _RESERVED_FDS)))
    plan = replace(plan, client_procs=procs)
    sources = loopback_sources(held)
    users = [f"user-{i}" for i in range(held)]
    progress(
        f"{held} sessions on one notifyd: {procs} client processes, "
        f"sources {sources[0]}..{sources[-1]}"
    )
    contender = await _start(rig, plan, users)
    try:
        result = await _open_in_stages(rig, contender, plan, held, sources, clock)
        result["target"] = plan.sessions
        result["capped_by"] = capped_by
        result["descriptor_limit"] = plan.limit
        result["workers"] = plan.workers
        held = result["opened"]
        contender.users = users[:held] if result["stopped_by"] else users
        progress(f"idle for {plan.idle_s:.0f}s with {held} sessions")
        result["idle"] = await _idle(rig, contender.server, plan.idle_s)
        progress(
            f"  server {result['idle']['server_cpu_share'] * 100:.1f} % of a core, "
            f"Postgres {(result['idle']['postgres_cpu_share'] or 0) * 100:.1f} %"
        )
        result["announcement"] = await announcements(rig, contender.clients, held)
        runs = []
        for rep in range(plan.reps):
            run = await one_run(rig, contender, plan.rate, f"sc{rep}", clock)
            runs.append(run)
            lat = run["latency_ms"]
            progress(
                f"  {plan.rate}/s with {held} sessions: received {run['received']}/{run['rows']}, "
                f"p50 {lat['p50']} p99 {lat['p99']} ms"
            )
            await wait_quiet(contender.server.pid, timeout=15)
        result["pipeline"] = {"rate": plan.rate, "runs": runs}
        result["server_rss_end_kib"] = tree_rss_kib(contender.server.pid)
    finally:
        await close_contender(rig, contender)
    return result
