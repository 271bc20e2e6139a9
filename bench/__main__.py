"""
``python -m bench``: notifyd against a naive LISTEN/NOTIFY pipeline, same
machine, same run, same load; writes ``docs/performance.md`` and
``bench/results.json``.

Phases (each server in turn, then the profile and the trigger cost):

1. start the server (notifyd: ``python -m notifyd serve``; naive:
   ``python -m bench.naive_server``) and client processes;
2. open the sessions (full: 10,000; quick: 1,000) and read the server's RSS
   before and after;
3. notifyd only: announcements to every session;
4. single-row ramp, then 100-row ramp, until a step fails;
5. session-open time (notifyd: a user with 100,000 messages);
6. notifyd once more under cProfile at its highest single-row step;
7. INSERT throughput with and without the triggers (no server running).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import asyncpg

from notifyd.db import schema_sql
from notifyd.demo.embedded import EmbeddedPostgres

from . import report
from .control import ROOT, Child, free_port, raise_nofile, wait_healthy
from .measure import (
    busy_seconds,
    cpu_seconds,
    fanout_floor,
    gc_pauses,
    loopback_send_cost,
    machine,
    percentiles,
    rss_kib,
    tree_cpu_seconds,
    wait_quiet,
)
from .naive_server import NAIVE_SCHEMA, NAIVE_TABLE

NOTIFYD_TABLE = "t_message_real_time"
TABLES = {"notifyd": NOTIFYD_TABLE, "naive": NAIVE_TABLE}
PG_SETTINGS = {"max_connections": "300", "shared_buffers": "256MB"}
BIG_USER = "bench-big"
COPY_TABLE = "bench_trigger_cost"
_STARTED = time.monotonic()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def progress(text: str) -> None:
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    """
    What one run does; ``--quick`` shrinks every part of it.
    """

    mode: str
    users: int  # online users that messages are addressed to
    sessions: int  # sessions held open during the runs (idle RSS, announcement)
    client_procs: int
    writer_procs: int
    writer_conns: int
    single_steps: tuple[int, ...]  # commits/s
    batch_steps: tuple[int, ...]  # deliveries/s, as 100-row statements
    step_s: float
    drain_s: float
    announcements: int
    hello_rows: int
    hello_connects: int
    trigger_s: float  # per case and round
    trigger_rounds: int
    attempts: int = 3  # a failing step is run up to this many times (shared machine)
    calm_budget_s: float = 120.0  # total time the run may wait for other tenants to calm down
    single_p99_ms: float = 20.0
    batch_p99_ms: float = 100.0
    writers_synchronous_commit: str = "off"


def make_plan(quick: bool, users: int) -> Plan:
    if quick:
        return Plan(
            mode="quick", users=users, sessions=max(users, 1000), client_procs=2,
            writer_procs=2, writer_conns=8, single_steps=(1000, 2000, 4000),
            batch_steps=(10_000, 20_000), step_s=2.0, drain_s=3.0, announcements=2,
            hello_rows=100_000, hello_connects=20, trigger_s=1.5, trigger_rounds=1,
            attempts=2, calm_budget_s=5.0,
        )  # fmt: skip
    return Plan(
        mode="full", users=users, sessions=max(users, 10_000), client_procs=2,
        writer_procs=2, writer_conns=8,
        single_steps=(1000, 2000, 3000, 4000, 5000, 6000, 8000, 10_000, 12_000),
        batch_steps=(10_000, 20_000, 40_000, 60_000, 80_000), step_s=6.0, drain_s=5.0,
        announcements=3, hello_rows=100_000, hello_connects=20, trigger_s=2.0, trigger_rounds=3,
    )  # fmt: skip


class Rig:
    """
    The database, the child processes, and where their logs go.
    """

    def __init__(self, plan: Plan, dsn: str, pg_pid: int | None, logs: Path) -> None:
        self.plan = plan
        self.dsn = dsn
        self.pg_pid = pg_pid
        self.logs = logs
        self.secret = secrets.token_urlsafe(32)
        self.children: list[Child] = []
        self.admin: asyncpg.Connection | None = None
        self.sessions = [f"user-{i}" for i in range(plan.sessions)]
        self.online = self.sessions[: plan.users]
        self.calm_left = plan.calm_budget_s
        self.notifyd_env: dict[str, str] = {}

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
        total = cpu_seconds(os.getpid()) + (self.pg_cpu() or 0.0)
        for child in self.children:
            with contextlib.suppress(OSError):
                total += cpu_seconds(child.pid)
        return total

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


async def start_server(rig: Rig, kind: str, *, profile: Path | None = None) -> tuple[Child, int]:
    port = free_port()
    env = _clean_env()
    if kind == "notifyd":
        env.update(
            NOTIFYD_DSN=rig.dsn, NOTIFYD_HOST="127.0.0.1", NOTIFYD_PORT=str(port),
            NOTIFYD_JWT_SECRET=rig.secret, NOTIFYD_LOG_LEVEL="WARNING",
            NOTIFYD_MAX_SESSIONS_PER_USER="1000",
        )  # fmt: skip
        env.update(rig.notifyd_env)
        argv = [sys.executable]
        if profile is not None:
            argv += ["-m", "cProfile", "-o", str(profile)]
        argv += ["-m", "notifyd", "serve"]
    else:
        argv = [sys.executable, "-m", "bench.naive_server", "--dsn", rig.dsn, "--port", str(port)]
    name = kind + ("-profiled" if profile else "")
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
    config = json.dumps({"kind": kind, "url": f"ws://127.0.0.1:{port}", "secret": rig.secret})
    return [
        await rig.spawn(
            f"{kind}-clients-{k}", [sys.executable, "-m", "bench.clients", config], control=True
        )
        for k in range(rig.plan.client_procs)
    ]


async def start_writers(rig: Rig, name: str, conns: int, synchronous_commit: str) -> list[Child]:
    config = json.dumps({"dsn": rig.dsn, "conns": conns, "synchronous_commit": synchronous_commit})
    writers = [
        await rig.spawn(
            f"{name}-{k}", [sys.executable, "-m", "bench.writers", config], control=True
        )
        for k in range(rig.plan.writer_procs)
    ]
    await asyncio.gather(*(w.request({"cmd": "ping"}, timeout=60) for w in writers))
    return writers


async def open_sessions(clients: list[Child], users: list[str]) -> dict[str, Any]:
    k = len(clients)
    replies = await asyncio.gather(
        *(
            c.request({"cmd": "open", "users": users[i::k], "concurrency": 50}, timeout=600)
            for i, c in enumerate(clients)
        )
    )
    result = {
        "opened": sum(r["opened"] for r in replies),
        "failed": sum(r["failed"] for r in replies),
        "seconds": max(r["seconds"] for r in replies),
        "errors": [e for r in replies for e in r["errors"]][:3],
    }
    if result["failed"]:
        progress(f"  {result['failed']} sessions failed to open, e.g. {result['errors'][:1]}")
    if result["failed"] > len(users) // 100:
        raise RuntimeError(
            f"{result['failed']} of {len(users)} sessions failed to open: {result['errors']}"
        )
    return result


async def drain(clients: list[Child], tag: str, expected: int, timeout: float) -> int:
    """
    Poll the clients until ``expected`` messages of ``tag`` arrived or the
    deadline passes; returns how many did.
    """
    deadline = time.monotonic() + timeout
    while True:
        replies = await asyncio.gather(
            *(c.request({"cmd": "count", "tags": [tag]}, timeout=30) for c in clients)
        )
        got = int(sum(r["counts"][tag] for r in replies))
        if got >= expected or time.monotonic() >= deadline:
            return got
        await asyncio.sleep(0.05)


async def take(clients: list[Child], tag: str) -> tuple[list[int], int, float]:
    """
    All latencies (µs) of ``tag``, the last receipt time, and the longest
    collector pause of any client since the previous take.
    """
    replies = await asyncio.gather(
        *(c.request({"cmd": "take", "tag": tag}, timeout=60) for c in clients)
    )
    latencies = [x for r in replies for x in r["latencies_us"]]
    return latencies, max(r["last_ns"] for r in replies), max(r["gc"]["max_ms"] for r in replies)


async def run_step(
    rig: Rig,
    server: Child,
    clients: list[Child],
    writers: list[Child],
    kind: str,
    mode: str,
    target: int,
    tag: str,
    seed: int,
    duration: float | None = None,
) -> dict[str, Any]:
    """
    One rate step: writers insert for ``duration`` seconds, clients drain;
    latencies, rates, loss and the server's CPU for it.
    """
    plan = rig.plan
    duration = plan.step_s if duration is None else duration
    n = len(writers)
    request: dict[str, Any] = {
        "table": TABLES[kind],
        "duration": duration,
        "tag": tag,
        "online": rig.online,
    }
    if mode == "single":
        request.update(cmd="single", rate=target / n, offline_share=0.1)
        p99_limit = plan.single_p99_ms
    else:
        request.update(cmd="batch", rate=target / 100 / n, rows=100)
        p99_limit = plan.batch_p99_ms
    cpu0, pg0 = cpu_seconds(server.pid), rig.pg_cpu()
    clients0, writers0 = _children_cpu(clients), _children_cpu(writers)
    busy0, own0, wall0, unix0 = busy_seconds(), rig.own_cpu(), time.monotonic(), time.time()
    replies = await asyncio.gather(
        *(
            w.request({**request, "seed": seed * 100 + k}, timeout=duration * 2 + 60)
            for k, w in enumerate(writers)
        )
    )
    rows = sum(r["rows"] for r in replies)
    expected = sum(r["online"] for r in replies)
    start_ns, end_ns = min(r["start_ns"] for r in replies), max(r["end_ns"] for r in replies)
    await drain(clients, tag, expected, plan.drain_s)
    cpu1, pg1 = cpu_seconds(server.pid), rig.pg_cpu()
    clients1, writers1 = _children_cpu(clients), _children_cpu(writers)
    busy1, own1, wall1 = busy_seconds(), rig.own_cpu(), time.monotonic()
    server_gc = gc_pauses(server.gc_log, unix0, time.time())
    latencies, last_ns, client_gc = await take(clients, tag)
    stats = percentiles(latencies)
    delivered = len(latencies)
    sent_rate = rows / max(1e-9, (end_ns - start_ns) / 1e9)
    delivery_rate = delivered / max(1e-9, (last_ns - start_ns) / 1e9) if delivered else 0.0
    lost = max(0, expected - delivered)
    p99_ms = None if stats["p99"] is None else float(stats["p99"]) / 1000
    ok = (
        sent_rate >= 0.9 * target
        and lost == 0
        and delivered == expected
        and p99_ms is not None
        and p99_ms <= p99_limit
    )
    why = []
    if sent_rate < 0.9 * target:
        why.append(f"writers reached {sent_rate:.0f}/s < 90%")
    if lost:
        why.append(f"{lost} not delivered within {plan.drain_s:.0f}s")
    if delivered > expected:
        why.append(f"{delivered - expected} duplicates")
    if p99_ms is None or p99_ms > p99_limit:
        why.append(f"p99 > {p99_limit:.0f} ms")
    return {
        "mode": mode,
        "target": target,
        "duration_s": duration,
        "rows": rows,
        "statements": sum(r["statements"] for r in replies),
        "sent_per_s": sent_rate,
        "expected": expected,
        "delivered": delivered,
        "lost": lost,
        "deliveries_per_s": delivery_rate,
        "latency_ms": {
            k: (None if v is None else (v / 1000 if k != "n" else v)) for k, v in stats.items()
        },
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_ms_per_1000": (cpu1 - cpu0) / delivered * 1e6 if delivered else None,
        "pg_cpu_ms_per_1000": ((pg1 - pg0) / delivered * 1e6)
        if (delivered and pg0 is not None and pg1 is not None)
        else None,
        "other_load_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / max(1e-9, wall1 - wall0),
        # Cores used during the step (writing and draining), by process group.
        "cores": {
            "server": (cpu1 - cpu0) / max(1e-9, wall1 - wall0),
            "postgres": None
            if pg0 is None or pg1 is None
            else (pg1 - pg0) / max(1e-9, wall1 - wall0),
            "clients": (clients1 - clients0) / max(1e-9, wall1 - wall0),
            "writers": (writers1 - writers0) / max(1e-9, wall1 - wall0),
        },
        "client_gc_max_ms": client_gc,
        "server_gc_max_ms": max((ms for _, ms in server_gc), default=0.0)
        if server.gc_log
        else None,
        "server_gc_full": sum(1 for gen, _ in server_gc if gen == 2),
        "ok": ok,
        "why": "; ".join(why),
    }


def _children_cpu(children: list[Child]) -> float:
    total = 0.0
    for child in children:
        with contextlib.suppress(OSError):
            total += cpu_seconds(child.pid)
    return total


def _step_line(kind: str, step: dict[str, Any]) -> str:
    lat = step["latency_ms"]
    p = (
        "n/a"
        if lat["p50"] is None
        else f"p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} max {lat['max']:.1f} ms"
    )
    cpu = step["server_cpu_ms_per_1000"]
    return (
        f"  {kind} {step['mode']} {step['target']}/s{' (try ' + str(step['attempt']) + ')' if step.get('attempt', 1) > 1 else ''}: sent {step['sent_per_s']:.0f}/s, "
        f"delivered {step['delivered']}/{step['expected']} ({step['deliveries_per_s']:.0f}/s), {p}, "
        f"cpu {'n/a' if cpu is None else f'{cpu:.1f}'} ms/1000, other load {step['other_load_cores']:.2f} cores, "
        f"server GC max {step['server_gc_max_ms'] or 0:.0f} ms "
        f"-> {'ok' if step['ok'] else 'FAIL: ' + step['why']}"
    )


@dataclass
class Side:
    """
    One server under test with its client processes and its results.
    """

    kind: str
    server: Child
    port: int
    clients: list[Child]
    result: dict[str, Any]


async def ramp(rig: Rig, sides: list[Side], writers: list[Child], mode: str) -> None:
    """
    Step the rate up for every server, interleaved: at each target each
    server still in the race runs its step (the order alternating), so both
    meet the same moments of a noisy machine. A server leaves the race when
    every attempt at a target failed.
    """
    plan = rig.plan
    steps = plan.single_steps if mode == "single" else plan.batch_steps
    results: dict[str, list[dict[str, Any]]] = {side.kind: [] for side in sides}
    racing = list(sides)
    for index, target in enumerate(steps):
        order = list(racing) if index % 2 == 0 else racing[::-1]
        for side in order:
            for attempt in range(plan.attempts):
                if attempt:
                    # The machine is shared: a failed step is tried again once
                    # the server has worked off its backlog.
                    await wait_quiet(side.server.pid, timeout=15)
                calm = await rig.wait_calm()
                tag = f"{mode[0]}{index}" + (f"r{attempt}" if attempt else "")
                step = await run_step(
                    rig, side.server, side.clients, writers, side.kind, mode, target, tag,
                    seed=index + 1 + 50 * attempt,
                )  # fmt: skip
                step["attempt"] = attempt + 1
                step["other_load_before_cores"] = calm
                progress(_step_line(side.kind, step))
                results[side.kind].append(step)
                if step["ok"]:
                    break
            if not step["ok"]:
                racing.remove(side)
        if not racing:
            break
    for side in sides:
        good = [s for s in results[side.kind] if s["ok"]]
        side.result[mode] = {
            "steps": results[side.kind],
            "last_good": good[-1]["target"] if good else None,
            "ceiling_reached": bool(good) and good[-1]["target"] == steps[-1],
        }
        if not await wait_quiet(side.server.pid, timeout=30):
            progress(f"  {side.kind} still busy 30 s after the {mode} ramp")


async def announcements(rig: Rig, clients: list[Child], sessions: int) -> dict[str, Any]:
    reps: list[dict[str, Any]] = []
    for r in range(rig.plan.announcements):
        tag = f"ann{r}"
        await rig.db.execute(
            f"INSERT INTO {NOTIFYD_TABLE} (to_user, title, content, type, send_user) "
            "VALUES ('*', 'Announcement', $1, 'bench', 'bench-writer')",
            f"{tag}:{time.time_ns()}",
        )
        await drain(clients, tag, sessions, 60.0)
        latencies, _, _ = await take(clients, tag)
        stats = percentiles(latencies)
        reps.append(
            {
                "sessions": sessions,
                "received": len(latencies),
                "last_ms": None if stats["max"] is None else stats["max"] / 1000,
                "p50_ms": None if stats["p50"] is None else stats["p50"] / 1000,
            }
        )
        progress(
            f"  announcement {r}: {len(latencies)}/{sessions} sessions, last after {reps[-1]['last_ms']} ms"
        )
    lasts = sorted(
        r["last_ms"] for r in reps if r["last_ms"] is not None and r["received"] == sessions
    )
    return {"reps": reps, "median_last_ms": lasts[len(lasts) // 2] if lasts else None}


async def connect_times(rig: Rig, clients: list[Child], kind: str) -> dict[str, Any]:
    """
    notifyd: open a session (connect + hello) for a user with
    ``hello_rows`` messages, half unread; naive: connect only.
    """
    plan = rig.plan
    result: dict[str, Any] = {}
    n = plan.hello_connects
    if kind == "notifyd":
        started = time.monotonic()
        await rig.db.execute(
            f"INSERT INTO {NOTIFYD_TABLE} (to_user, title, content, type, send_user, is_read) "
            "SELECT $1, 'Old message ' || g, 'content ' || g, 'bench', 'bench-writer', "
            "CASE WHEN g % 2 = 0 THEN '1' ELSE '0' END FROM generate_series(1, $2) AS g",
            BIG_USER,
            plan.hello_rows,
        )
        inserted = time.monotonic()
        # Joining sessions are admitted after the delivery window that holds
        # the big INSERT: the first hello measures that catch-up.
        await clients[0].request(
            {"cmd": "hello_times", "user": "bench-probe", "n": 1, "timeout": 300}, timeout=330
        )
        result["insert_s"] = inserted - started
        result["catch_up_s"] = time.monotonic() - inserted
        progress(
            f"  {plan.hello_rows}-row INSERT: {result['insert_s']:.1f}s, delivery caught up {result['catch_up_s']:.1f}s later"
        )
        await rig.db.execute(f"VACUUM ANALYZE {NOTIFYD_TABLE}")
    reply = await clients[0].request(
        {"cmd": "hello_times", "user": BIG_USER, "n": n + 1, "timeout": 60}, timeout=300
    )
    times = reply["ms"][1:]  # the first one warms up
    result["big_user_ms"] = percentiles([round(t * 1000) for t in times])
    result["big_user_median_ms"] = sorted(times)[len(times) // 2]
    fresh = (
        await clients[0].request(
            {"cmd": "hello_times", "user": "bench-fresh", "n": n + 1, "timeout": 60}, timeout=300
        )
    )["ms"][1:]
    result["fresh_user_median_ms"] = sorted(fresh)[len(fresh) // 2]
    progress(
        f"  {kind} session open: user with {plan.hello_rows if kind == 'notifyd' else 0} messages "
        f"median {result['big_user_median_ms']:.2f} ms, fresh user {result['fresh_user_median_ms']:.2f} ms"
    )
    return result


def _warnings(child: Child) -> list[str]:
    try:
        lines = child.log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [
        line for line in lines if " WARNING " in line or " ERROR " in line or "Traceback" in line
    ][:20]


async def open_side(rig: Rig, writers: list[Child], kind: str) -> Side:
    """
    Start a server and its clients, open every session (RSS before and
    after), announce (notifyd), warm up.
    """
    plan = rig.plan
    progress(f"{kind}: starting server and {plan.client_procs} client processes")
    server, port = await start_server(rig, kind)
    clients = await start_clients(rig, kind, port)
    side = Side(kind, server, port, clients, {})
    if kind == "notifyd":
        side.result["source"] = source_fingerprint()  # what this process imported
    await wait_quiet(server.pid)
    rss0 = rss_kib(server.pid)
    opened = await open_sessions(clients, rig.sessions)
    await wait_quiet(server.pid)
    rss1 = rss_kib(server.pid)
    side.result["idle"] = {
        **opened,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_session": (rss1 - rss0) / max(1, opened["opened"]),
    }
    progress(
        f"  {opened['opened']} sessions open in {opened['seconds']:.1f}s; RSS {rss0} -> {rss1} KiB "
        f"= {side.result['idle']['kib_per_session']:.1f} KiB/session"
    )
    if kind == "notifyd":
        side.result["announcement"] = await announcements(rig, clients, opened["opened"])
    await run_step(
        rig, server, clients, writers, kind, "single", 500, "warm", seed=999, duration=1.0
    )
    await wait_quiet(server.pid)
    return side


async def close_side(rig: Rig, side: Side) -> None:
    """
    Close the sessions, stop the clients and the server.
    """
    await asyncio.gather(
        *(c.request({"cmd": "close"}, timeout=120) for c in side.clients if c.running),
        return_exceptions=True,
    )
    for client in side.clients:
        await rig.retire(client)
    if side.server in rig.children:
        side.result["server_rss_end_kib"] = (
            rss_kib(side.server.pid) if side.server.running else None
        )
        side.result["exit_code"] = await rig.retire(side.server)
    side.result["log_warnings"] = _warnings(side.server)
    pauses = gc_pauses(side.server.gc_log, 0.0, float("inf"))
    full = sorted(ms for gen, ms in pauses if gen == 2)
    side.result["server_gc"] = {
        "full_passes": len(full),
        "full_median_ms": full[len(full) // 2] if full else None,
        "max_ms": max((ms for _, ms in pauses), default=None),
    }
    progress(f"{side.kind}: stopped (exit {side.result.get('exit_code')})")


def _profile_text(path: Path, key: str, limit: int = 15, only: str | None = None) -> str:
    """
    pstats' top ``limit`` by ``key``; with ``only``, just functions whose
    file path contains it (with that prefix shortened).
    """
    stream = StringIO()
    stats = pstats.Stats(str(path), stream=stream)
    if only is None:
        stats.strip_dirs().sort_stats(key).print_stats(limit)
    else:
        stats.sort_stats(key).print_stats(only, limit)
    text = stream.getvalue()
    if only is not None:
        text = text.replace(str(ROOT) + "/", "")
    # Keep the table, drop pstats' header lines about the file.
    start = text.find("   ncalls")
    return text[start:].rstrip() if start >= 0 else text.rstrip()


async def profile_phase(rig: Rig, writers: list[Child], rate: int) -> dict[str, Any]:
    path = rig.logs / "notifyd.prof"
    progress(
        f"profile: notifyd under cProfile, {rig.plan.users} sessions, single-row step at {rate}/s"
    )
    server, port = await start_server(rig, "notifyd", profile=path)
    clients = await start_clients(rig, "notifyd", port)
    result: dict[str, Any] = {
        "rate": rate,
        "sessions": rig.plan.users,
        "source": source_fingerprint(),
    }
    try:
        await open_sessions(clients, rig.online)
        await run_step(
            rig, server, clients, writers, "notifyd", "single", 500, "pwarm", seed=998, duration=1.0
        )
        step = await run_step(
            rig, server, clients, writers, "notifyd", "single", rate, "prof", seed=997
        )
        progress(_step_line("notifyd (cProfile)", step))
        result["step"] = step
    finally:
        await asyncio.gather(
            *(c.request({"cmd": "close"}, timeout=120) for c in clients if c.running),
            return_exceptions=True,
        )
        for client in clients:
            await rig.retire(client)
        result["exit_code"] = await rig.retire(server, signal.SIGINT, timeout=30)
    if not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(
            f"cProfile wrote no profile (exit {result['exit_code']}): {server.log_tail()}"
        )
    result["profile_bytes"] = path.stat().st_size
    result["cumulative"] = _profile_text(path, "cumulative")
    result["tottime"] = _profile_text(path, "tottime")
    result["notifyd_cumulative"] = _profile_text(
        path, "cumulative", only=str(ROOT / "notifyd") + "/"
    )
    progress(f"profile: written ({result['profile_bytes']} bytes, exit {result['exit_code']})")
    return result


async def trigger_phase(rig: Rig) -> dict[str, Any]:
    """
    Rows/s of 4 connections inserting into a fresh copy of the table with
    notifyd's statement trigger, with none, and with the naive per-row one;
    synchronous_commit on.
    """
    plan = rig.plan
    conns = max(1, 4 // plan.writer_procs)
    writers = await start_writers(rig, "trigger-writers", conns, "on")
    runs: list[dict[str, Any]] = []
    try:
        for round_ in range(plan.trigger_rounds):
            for rows in (1, 100):
                for trigger in ("notifyd", "none", "naive"):
                    await rig.db.execute(
                        f"DROP TABLE IF EXISTS {COPY_TABLE}; "
                        f"CREATE TABLE {COPY_TABLE} (LIKE {NOTIFYD_TABLE} INCLUDING ALL); "
                        f"CREATE TRIGGER notifyd_wake_on_insert AFTER INSERT ON {COPY_TABLE} "
                        "FOR EACH STATEMENT EXECUTE FUNCTION notifyd_wake_on_insert()"
                    )
                    if trigger != "notifyd":
                        await rig.db.execute(
                            f"ALTER TABLE {COPY_TABLE} DISABLE TRIGGER notifyd_wake_on_insert"
                        )
                    if trigger == "naive":
                        await rig.db.execute(
                            f"CREATE TRIGGER naive_notify AFTER INSERT ON {COPY_TABLE} "
                            "FOR EACH ROW EXECUTE FUNCTION naive_notify()"
                        )
                    with contextlib.suppress(asyncpg.PostgresError):
                        await rig.db.execute("CHECKPOINT")
                    calm = await rig.wait_calm(longest=5.0)
                    busy0, own0, wall0 = busy_seconds(), rig.own_cpu(), time.monotonic()
                    replies = await asyncio.gather(
                        *(
                            w.request(
                                {
                                    "cmd": "flood",
                                    "table": COPY_TABLE,
                                    "rows": rows,
                                    "duration": plan.trigger_s,
                                },
                                timeout=plan.trigger_s + 120,
                            )
                            for w in writers
                        )
                    )
                    other = ((busy_seconds() - busy0) - (rig.own_cpu() - own0)) / (
                        time.monotonic() - wall0
                    )
                    rate = sum(r["rows"] for r in replies) / max(r["seconds"] for r in replies)
                    runs.append({
                        "round": round_, "rows_per_statement": rows, "trigger": trigger, "rows_per_s": rate,
                        "other_load_before_cores": calm, "other_load_cores": max(0.0, other),
                    })  # fmt: skip
                    progress(
                        f"  trigger cost, round {round_ + 1}: {rows}-row statements, trigger {trigger}: "
                        f"{rate:,.0f} rows/s (other load {max(0.0, other):.2f} cores)"
                    )
    finally:
        for writer in writers:
            await rig.retire(writer)
        with contextlib.suppress(Exception):
            await rig.db.execute(f"DROP TABLE IF EXISTS {COPY_TABLE}")
    cases = []
    for rows in (1, 100):
        for trigger in ("notifyd", "none", "naive"):
            rates = sorted(
                r["rows_per_s"]
                for r in runs
                if r["rows_per_statement"] == rows and r["trigger"] == trigger
            )
            cases.append(
                {
                    "rows_per_statement": rows,
                    "trigger": trigger,
                    "rows_per_s": rates[len(rates) // 2],
                    "rounds": rates,
                }
            )
    return {
        "connections": conns * plan.writer_procs,
        "seconds": plan.trigger_s,
        "rounds": plan.trigger_rounds,
        "cases": cases,
        "runs": runs,
    }


async def run(
    plan: Plan, dsn: str, pg_pid: int | None, logs: Path, notifyd_env: dict[str, str]
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    rig = Rig(plan, dsn, pg_pid, logs)
    rig.notifyd_env = notifyd_env
    results: dict[str, Any] = {"plan": asdict(plan), "machine": machine()}
    try:
        rig.admin = await asyncpg.connect(dsn)
        results["machine"]["postgres"] = await rig.db.fetchval("SHOW server_version")
        results["machine"]["postgres_settings"] = {
            name: await rig.db.fetchval(f"SHOW {name}")
            for name in ("synchronous_commit", "fsync", "shared_buffers", "max_connections")
        }
        await rig.db.execute(schema_sql())
        await rig.db.execute(NAIVE_SCHEMA)
        await rig.db.execute(
            f"TRUNCATE {NOTIFYD_TABLE}, t_message_event, t_message_receipt, {NAIVE_TABLE}"
        )
        progress(f"schema applied; Postgres {results['machine']['postgres']}")
        writers = await start_writers(
            rig, "writers", plan.writer_conns, plan.writers_synchronous_commit
        )
        sides: list[Side] = []
        try:
            for kind in ("notifyd", "naive"):
                sides.append(await open_side(rig, writers, kind))
            for mode in ("single", "batch"):
                progress(f"{mode} ramp, servers interleaved")
                await ramp(rig, sides, writers, mode)
            for side in sides:
                side.result["connect"] = await connect_times(rig, side.clients, side.kind)
        finally:
            for side in sides:
                results[side.kind] = side.result
                await close_side(rig, side)
        await rig.db.execute(
            f"TRUNCATE {NOTIFYD_TABLE}, t_message_event, t_message_receipt, {NAIVE_TABLE}"
        )
        best = results["notifyd"]["single"]["last_good"] or plan.single_steps[0]
        results["profile"] = await profile_phase(rig, writers, best)
        for writer in writers:
            await rig.retire(writer)
        progress("trigger cost (no server running)")
        results["trigger"] = await trigger_phase(rig)
    finally:
        await rig.close()
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _interrupt)
    return results


def source_fingerprint() -> dict[str, str]:
    """
    Which notifyd was measured: a hash of its sources and their newest mtime.
    """
    import datetime
    import hashlib

    files = sorted((ROOT / "notifyd").glob("*.py")) + [ROOT / "notifyd" / "schema.sql"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    newest = max(path.stat().st_mtime for path in files)
    when = datetime.datetime.fromtimestamp(newest, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )
    return {"sha256": digest.hexdigest()[:16], "newest_file": when}


def _postmaster_pid(embedded: EmbeddedPostgres) -> int | None:
    try:
        return int((embedded.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes)")
    parser.add_argument(
        "--users", type=int, default=1000, help="online users messages go to (default 1000)"
    )
    parser.add_argument(
        "--dsn",
        help="use this PostgreSQL (superuser, scratch database: the bench TRUNCATEs the message "
        "tables) instead of an embedded one",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--report-only", action="store_true", help="re-render --out from --results")
    parser.add_argument("--keep-logs", action="store_true", help="keep the child processes' logs")
    parser.add_argument(
        "--notifyd-env",
        action="append",
        default=[],
        metavar="NOTIFYD_X=VALUE",
        help="a setting for the notifyd server under test (repeatable), e.g. NOTIFYD_EVENT_LOOP=asyncio",
    )
    args = parser.parse_args()
    if args.users < 100:
        parser.error("--users must be at least 100 (100-row statements go to distinct users)")
    if args.report_only:
        args.out.write_text(report.render(json.loads(args.results.read_text())))
        return 0
    notifyd_env = dict(item.partition("=")[::2] for item in args.notifyd_env)
    if any(not key.startswith("NOTIFYD_") for key in notifyd_env):
        parser.error("--notifyd-env takes NOTIFYD_NAME=VALUE")
    limit = raise_nofile()
    plan = make_plan(args.quick, args.users)
    floor = loopback_send_cost()
    fanout = fanout_floor(connections=plan.sessions, readers=plan.client_procs)
    source = source_fingerprint()
    command = "python -m bench" + "".join(
        f" {a}"
        for a in (["--quick"] if args.quick else [])
        + ([f"--users {args.users}"] if args.users != 1000 else [])
        + [f"--notifyd-env {key}={value}" for key, value in notifyd_env.items()]
    )
    logs = Path(tempfile.mkdtemp(prefix="notifyd-bench-"))
    progress(f"{plan.mode} run, logs in {logs}, RLIMIT_NOFILE {limit}")
    embedded: EmbeddedPostgres | None = None
    ok = False
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.dsn:
            dsn, pg_pid = args.dsn, None
        else:
            embedded = EmbeddedPostgres(settings=PG_SETTINGS)
            progress("starting embedded PostgreSQL")
            embedded.start(timeout=120)
            dsn, pg_pid = embedded.dsn, _postmaster_pid(embedded)
        results = asyncio.run(run(plan, dsn, pg_pid, logs, notifyd_env))
        results["machine"]["loopback_send"] = floor
        results["machine"]["fanout_floor"] = fanout
        results["notifyd_source"] = source
        if source_fingerprint() != source:
            results["notifyd_source"]["changed_during_run"] = True
            progress("warning: notifyd's sources changed during the run")
        results["command"] = command
        results["notifyd_env"] = notifyd_env
        results["runtime_s"] = time.monotonic() - _STARTED
        results["postgres"] = (
            "external (--dsn)" if args.dsn else f"embedded, settings {PG_SETTINGS}"
        )
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1, default=str) + "\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report.render(results))
        progress(f"done in {results['runtime_s']:.0f}s: {args.out} and {args.results}")
        ok = True
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress("interrupted; cleaning up")
    finally:
        if embedded is not None:
            embedded.cleanup()
        if ok and not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            progress(f"logs kept in {logs}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
