"""
The soak run: an embedded PostgreSQL, notifyd as a child process, sessions
in client processes (``clients.py``) and a paced writer, for ``--minutes``;
meanwhile a share of the sessions reconnects every minute, Postgres is
restarted and the LISTEN connection is killed on a schedule, and the server
is sampled. At the end every user's unique message count is compared with
the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from notifyd.db import schema_sql
from notifyd.demo.embedded import EmbeddedPostgres

from ..control import ROOT, Child, free_port, raise_nofile, wait_healthy
from ..measure import anonymous_memory_kib, cpu_seconds, machine, rss_kib, source_fingerprint
from ..progress import progress
from ..rig import PG_SETTINGS
from .report import TRENDED, render
from .trend import fit

__all__ = ["main"]

_INSERT = (
    "INSERT INTO t_message_real_time (to_user, title, content, type, send_user) "
    "VALUES ($1, 'Soak message', $2, $3, 'soak-writer')"
)
_TYPES = ("comment", "like", "system")
_KILL_LISTENER = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%'"
)


# The embedded cluster has no TLS, and notifyd's DSN says so. Without an
# sslmode, asyncpg (like libpq, "prefer") asks for TLS first on every new
# connection; measured, a process's RSS grows with those refused requests by
# up to 1.4 MB over its first 2,500 connections and then holds, and the pool
# reconnects after each restart and kill (docs/deployment.md, "Long runs").
NOTIFYD_SSLMODE = "disable"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    p.add_argument("--sessions", type=int, default=5000, help="one per user (default 5000)")
    p.add_argument("--rate", type=float, default=500.0, help="commits/s (default 500)")
    p.add_argument(
        "--reconnect-share",
        type=float,
        default=0.05,
        help="share of the sessions that reconnect each minute, spread over it (default 0.05)",
    )
    p.add_argument(
        "--warm-up-turnovers",
        type=float,
        default=5.0,
        help="before the clock starts, reconnect this many times the sessions (random ones, as "
        "the soak does, 5 %% of them every 2 s) with the writer running: the allocator's "
        "footprint grows with session turnover for three to four, then holds (default 5; 0: "
        "none)",
    )
    p.add_argument("--pg-restart-every", type=float, default=10.0, help="minutes (default 10)")
    p.add_argument("--listener-kill-every", type=float, default=5.0, help="minutes (default 5)")
    p.add_argument(
        "--notifyd-restart-every",
        type=float,
        default=0.0,
        help="minutes between restarts of notifyd itself, SIGTERM then a new process on the same "
        "port as systemd does (default 0: never)",
    )
    p.add_argument(
        "--notifyd-env",
        action="append",
        default=[],
        metavar="NOTIFYD_X=VALUE",
        help="a setting for notifyd (repeatable), e.g. NOTIFYD_MAX_PENDING_HANDSHAKES=0",
    )
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "soak.md")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "soak.json")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument(
        "--report-only", action="store_true", help="re-render --out from --results, trends refitted"
    )
    return p


@dataclass
class Writer:
    """
    Single-row autocommit INSERTs at ``rate`` to random users, through
    restarts: a failed statement is counted and the connection remade. The
    table, not this count, is what deliveries are checked against.
    """

    dsn: str
    rate: float
    users: list[str]
    connections: int = 4
    attempted: int = 0
    failed: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        await asyncio.gather(*(self._one(k) for k in range(self.connections)))

    async def _one(self, k: int) -> None:
        pick = random.Random(k)
        period = self.connections / self.rate
        conn: asyncpg.Connection | None = None
        due = time.monotonic() + pick.uniform(0, period)
        while not self.stopping.is_set():
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                due = time.monotonic()  # after an outage: the pace, not a burst
            due += period
            self.attempted += 1
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn, timeout=5)
                await conn.execute(
                    _INSERT, pick.choice(self.users), f"{time.time_ns()}", pick.choice(_TYPES)
                )
            except Exception:
                # Anything a restart can cause, asyncpg's InternalClientError
                # ("cannot switch to state") included: a failed commit here is
                # not a failed soak; the table decides what committed.
                self.failed += 1
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(0.2)
        if conn is not None:
            await conn.close()


def _commit() -> str:
    """
    The commit measured, with ``+changes`` when the work tree differs from it.
    """
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "notifyd"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


async def _health(port: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # ?tasks: the running tasks by kind, to name any long-lived one that
        # appears; ?heap: Python's live blocks, to tell objects that
        # accumulate from memory the allocator keeps.
        writer.write(
            b"GET /healthz?tasks&heap HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    body: dict[str, Any] = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    return body


def schedule(minutes: float, every: float, skip_every: float | None = None) -> list[float]:
    """
    Offsets in seconds, ``every`` minutes apart, strictly inside the run;
    those that fall on a multiple of ``skip_every`` are left to that event.
    """
    if every <= 0:
        return []
    offsets = []
    k = 1
    while k * every < minutes:
        at = k * every
        if (
            skip_every is None
            or skip_every <= 0
            or abs(at / skip_every - round(at / skip_every)) > 1e-9
        ):
            offsets.append(at * 60)
        k += 1
    return offsets


async def soak(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    measured_on = machine()  # the load average before the run adds its own
    embedded = EmbeddedPostgres(settings=PG_SETTINGS)
    children: list[Child] = []
    try:
        progress("starting embedded PostgreSQL")
        await asyncio.to_thread(embedded.start, 120)
        dsn = embedded.dsn
        admin = await asyncpg.connect(dsn)
        await admin.execute(schema_sql())
        await admin.close()

        secret = secrets.token_urlsafe(32)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFYD_", "PG"))}
        env.update(
            NOTIFYD_DSN=f"{dsn}?sslmode={NOTIFYD_SSLMODE}", NOTIFYD_HOST="127.0.0.1",
            NOTIFYD_PORT=str(port),
            NOTIFYD_JWT_SECRET=secret, NOTIFYD_LOG_LEVEL="WARNING",
        )  # fmt: skip
        env.update(item.partition("=")[::2] for item in args.notifyd_env)

        async def start_server(name: str) -> Child:
            return await Child.spawn(
                name, [sys.executable, "-m", "notifyd", "serve"], logs / f"{name}.log", env=env
            )

        server = await start_server("notifyd")
        children.append(server)
        await wait_healthy(server, port, 60)

        users = [f"soak-{i}" for i in range(args.sessions)]
        k = args.client_procs
        for i in range(k):
            config = json.dumps(
                {"url": f"ws://127.0.0.1:{port}", "secret": secret, "users": users[i::k]}
            )
            children.append(
                await Child.spawn(
                    f"clients-{i}",
                    [sys.executable, "-m", "bench.soak.clients", config],
                    logs / f"clients-{i}.log",
                    control=True,
                )
            )
        clients = children[1:]
        progress(f"opening {args.sessions} sessions")
        opened = await asyncio.gather(*(c.request({"cmd": "open"}, timeout=900) for c in clients))
        live = sum(r["live"] for r in opened)
        progress(f"  {live} live")

        writer = Writer(dsn, args.rate, users)
        writing = asyncio.create_task(writer.run())
        warm_up = await _warm_up(server, port, clients, args)
        duration = args.minutes * 60
        restarts = schedule(args.minutes, args.pg_restart_every)
        kills = schedule(args.minutes, args.listener_kill_every, args.pg_restart_every)
        server_restarts = schedule(args.minutes, args.notifyd_restart_every)
        events: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        tick = 6.0  # reconnections are spread over the minute in ten steps
        per_tick = args.sessions * args.reconnect_share / 10 / k
        carry = 0.0
        started = time.monotonic()
        next_sample = next_tick = 0.0
        cpu0 = cpu_seconds(server.pid)  # less what earlier processes used, after a restart
        progress(f"soaking for {args.minutes:g} min")
        while (now := time.monotonic() - started) < duration:
            if not server.running:
                raise RuntimeError(f"notifyd exited: {server.log_tail()}")
            if restarts and now >= restarts[0]:
                restarts.pop(0)
                t0 = time.monotonic()
                await asyncio.to_thread(embedded.restart)
                events.append({"at_s": round(now, 1), "what": "postgres restart",
                               "took_s": round(time.monotonic() - t0, 2)})  # fmt: skip
                progress(f"  {now / 60:.1f} min: PostgreSQL restarted")
            if server_restarts and now >= server_restarts[0]:
                server_restarts.pop(0)
                cpu0 -= cpu_seconds(server.pid)
                before = await _restart_counters(clients)
                t0 = time.monotonic()
                code = await server.stop(timeout=60)
                stopped = time.monotonic()
                server = await start_server(f"notifyd-{len(events) + 1}")
                children[0] = server
                cpu0 += cpu_seconds(server.pid)
                await wait_healthy(server, port, 60)
                live_s = await _all_live(clients, args.sessions, timeout=600)
                back = time.monotonic()
                after = await _restart_counters(clients)
                events.append({"at_s": round(now, 1), "what": "notifyd restart", "exit": code,
                               "stop_s": round(stopped - t0, 2),
                               "last_live_after_sigterm_s": round(back - t0, 2),
                               "last_live_after_start_s": round(back - stopped, 2),
                               "all_live": live_s is not None,
                               **{key: round(after[key] - before[key], 2) for key in after},
                               "new_server_cpu_s": round(cpu_seconds(server.pid), 2),
                               "load_average": round(os.getloadavg()[0], 2)})  # fmt: skip
                progress(
                    f"  {now / 60:.1f} min: notifyd restarted; last session live "
                    f"{back - t0:.1f} s after SIGTERM"
                )
            if kills and now >= kills[0]:
                kills.pop(0)
                conn = await asyncpg.connect(dsn)
                try:
                    killed = await conn.fetchval(_KILL_LISTENER)
                finally:
                    await conn.close()
                events.append({"at_s": round(now, 1), "what": "listener killed", "killed": killed})
                progress(f"  {now / 60:.1f} min: LISTEN connection killed ({killed})")
            if now >= next_tick:
                next_tick += tick
                carry += per_tick
                n, carry = int(carry), carry - int(carry)
                if n:
                    seed = int(now * 1000)
                    await asyncio.gather(
                        *(c.request({"cmd": "reconnect", "n": n, "seed": seed + j}, timeout=60)
                          for j, c in enumerate(clients))
                    )  # fmt: skip
            if now >= next_sample:
                next_sample += args.sample_every
                samples.append(await _sample(server, port, clients, now, cpu0))
            await asyncio.sleep(0.2)
        writer.stopping.set()
        await writing
        progress("writer stopped; waiting for the last deliveries")
        accounting = await _account(dsn, clients, users)
        samples.append(await _sample(server, port, clients, time.monotonic() - started, cpu0))
        return {
            "config": {
                key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()
            },
            "machine": measured_on,
            "notifyd_source": source_fingerprint(),
            "commit": _commit(),
            "notifyd_sslmode": NOTIFYD_SSLMODE,
            "sessions_live_at_start": live,
            "warm_up": warm_up,
            "writer": {"attempted": writer.attempted, "failed": writer.failed},
            "events": events,
            "samples": samples,
            "accounting": accounting,
            "trends": _trends(samples, warmup_s=min(120.0, duration / 10)),
        }
    finally:
        for child in reversed(children):
            with contextlib.suppress(Exception):
                await child.stop(timeout=20)
        await asyncio.to_thread(embedded.cleanup)


async def _all_live(clients: list[Child], sessions: int, timeout: float) -> float | None:
    """
    Seconds until every session is live again (has its ``hello``), or None
    when the deadline passes first.
    """
    started = time.monotonic()
    while True:
        stats = await asyncio.gather(*(c.request({"cmd": "stats"}, timeout=60) for c in clients))
        if sum(s["live"] for s in stats) >= sessions:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        await asyncio.sleep(0.1)


def _listen_overflows() -> int:
    """
    The kernel's count of connections refused because a listen backlog was
    full (every listener on the machine: other work counts too).
    """
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(fields.get("ListenOverflows", 0))
    return 0


async def _restart_counters(clients: list[Child]) -> dict[str, float]:
    """
    What a restart is measured by as differences: handshakes shed, seconds
    the clients waited before attempts, the clients' CPU, listen overflows.
    """
    stats = await asyncio.gather(*(c.request({"cmd": "stats"}, timeout=60) for c in clients))
    return {
        "handshakes_shed": sum(s["shed"] for s in stats),
        "clients_cpu_s": sum(cpu_seconds(c.pid) for c in clients),
        "listen_overflows": _listen_overflows(),
    }


async def _warm_up(
    server: Child, port: int, clients: list[Child], args: argparse.Namespace
) -> dict[str, Any]:
    """
    Session turnover before the clock starts: ``--warm-up-turnovers`` times
    the sessions reconnect, 5 % of them every 2 s, with the writer running.
    A fresh process's allocator grows with turnover (sessions' long-lived
    objects land among the short-lived ones of those before them) for three
    to four turnovers, then holds; measured from a fresh start, a
    30-minute soak at 5 % a minute would show that growth as a slope.
    """
    turnovers = args.warm_up_turnovers
    if turnovers <= 0:
        return {"turnovers": 0}
    started = time.monotonic()
    rss_before = rss_kib(server.pid) / 1024
    step = max(1, round(args.sessions * 0.05 / len(clients)))
    steps = math.ceil(turnovers * args.sessions / (step * len(clients)))
    progress(f"warming up: {turnovers:g} turnovers of the sessions, {steps} steps")
    for n in range(steps):
        due = started + 2.0 * n
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        if not server.running:
            raise RuntimeError(f"notifyd exited: {server.log_tail()}")
        await asyncio.gather(
            *(c.request({"cmd": "reconnect", "n": step, "seed": 10_000 * n + j}, timeout=60)
              for j, c in enumerate(clients))
        )  # fmt: skip
    live_s = await _all_live(clients, args.sessions, timeout=600)
    return {
        "turnovers": turnovers,
        "reconnects": steps * step * len(clients),
        "took_s": round(time.monotonic() - started, 1),
        "all_live": live_s is not None,
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_kib(server.pid) / 1024, 1),
    }


def _anonymous_memory(pid: int) -> dict[str, float]:
    # The anonymous memory mapped beside RSS: RSS that grows inside mappings
    # that do not is pages touched for the first time, bounded by them.
    mapped, resident = anonymous_memory_kib(Path(f"/proc/{pid}/smaps").read_text())
    return {
        "anon_mapped_mb": round(mapped / 1024, 2),
        "anon_resident_mb": round(resident / 1024, 2),
    }


async def _sample(
    server: Child, port: int, clients: list[Child], now: float, cpu0: float
) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "t_s": round(now, 1),
        "rss_mb": round(rss_kib(server.pid) / 1024, 2),
        **_anonymous_memory(server.pid),
        "fds": len(os.listdir(f"/proc/{server.pid}/fd")),
        "cpu_s": round(cpu_seconds(server.pid) - cpu0, 2),
    }
    try:
        health = await _health(port)
    except (OSError, TimeoutError, ValueError, IndexError) as exc:
        sample["health_error"] = repr(exc)
    else:
        sample.update(
            tasks=health["tasks"],
            task_kinds=health.get("task_kinds", {}),
            loop_lag_ms=health["loop_lag_ms"],
            sessions=health["sessions"],
            ready=health["status"] == "ok",
        )
        if "full_collections" in health:
            sample["full_collections"] = health["full_collections"]
        heap = health.get("python_heap")
        if heap is not None:
            sample.update(
                python_blocks=heap["allocated_blocks"], frozen_objects=heap["frozen_objects"]
            )
    stats = await asyncio.gather(*(c.request({"cmd": "stats"}, timeout=60) for c in clients))
    sample["client_live"] = sum(s["live"] for s in stats)
    sample["received"] = sum(s["unique"] for s in stats)
    return sample


async def _account(dsn: str, clients: list[Child], users: list[str]) -> dict[str, Any]:
    """
    Wait (up to two minutes) until the clients hold as many unique messages
    as the table has, then compare per user.
    """
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT to_user, count(*) AS n FROM t_message_real_time GROUP BY to_user"
        )
    finally:
        await conn.close()
    committed = {r["to_user"]: int(r["n"]) for r in rows}
    total = sum(committed.get(u, 0) for u in users)
    deadline = time.monotonic() + 120
    while True:
        stats = await asyncio.gather(*(c.request({"cmd": "stats"}, timeout=60) for c in clients))
        unique = sum(s["unique"] for s in stats)
        if unique >= total or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    counts: dict[str, int] = {}
    for c in clients:
        counts.update((await c.request({"cmd": "counts"}, timeout=60))["counts"])
    lost = sum(max(0, committed.get(u, 0) - counts.get(u, 0)) for u in users)
    extra = sum(max(0, counts.get(u, 0) - committed.get(u, 0)) for u in users)
    return {
        "committed": total,
        "received_unique": unique,
        "lost": lost,
        "not_in_table": extra,
        "duplicates": sum(s["duplicates"] for s in stats),
        "resyncs": sum(s["resyncs"] for s in stats),
        "unrecovered_resumes": sum(s["unrecovered"] for s in stats),
        "connects": sum(s["connects"] for s in stats),
        "reconnects_asked": sum(s["reconnects_asked"] for s in stats),
    }


def _trends(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """
    Each sampled figure's trend after the warm-up (sessions opening, caches
    filling), with the warm-up it left out.
    """
    kept = [s for s in samples if s["t_s"] >= warmup_s]
    trends: dict[str, Any] = {"warmup_s": warmup_s}
    for key in TRENDED:
        points = [(float(s["t_s"]), float(s[key])) for s in kept if key in s]
        if len(points) >= 3:
            trends[key] = asdict(fit(points))
        # A slope that is only settling (allocator arenas, caches) flattens
        # in the second half; a leak keeps its slope.
        if len(points) >= 6:
            trends[key]["second_half"] = asdict(fit(points[len(points) // 2 :]))
    return trends


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.report_only:
        results = json.loads(args.results.read_text())
        results["trends"] = _trends(results["samples"], results["trends"]["warmup_s"])
        args.results.write_text(json.dumps(results, indent=1) + "\n")
        args.out.write_text(render(results))
        return 0
    raise_nofile()
    logs = Path(tempfile.mkdtemp(prefix="notifyd-soak-"))
    progress(f"soak: logs in {logs}")
    ok = False
    try:
        results = asyncio.run(soak(args, logs))
        results["command"] = " ".join(["python -m bench soak", *argv])
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1) + "\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(results))
        progress(f"done: {args.out} and {args.results}")
        ok = True
    except KeyboardInterrupt:
        progress("interrupted; cleaning up")
    finally:
        if ok and not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            progress(f"logs kept in {logs}")
    return 0 if ok else 1
