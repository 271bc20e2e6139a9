"""
More instances on one database: 0, 1, 2 and 4 notifyd processes (or one
process with that many workers) each serving a share of the connected users
while pgbench commits at a paced rate; per run, the CPU the primary (and the
standby, when the instances read from one) spent per committed message, and
every row accounted for. Zero instances is the baseline: what the writes
alone cost the database in the same run.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ..accounting import account, tagged_rows
from ..contenders import Contender, close_contender
from ..control import Child
from ..measure import cluster_cpu_seconds, tree_cpu_by_pid, tree_cpu_seconds, wait_quiet
from ..pgbench import Writes, pgbench
from ..plan import NOTIFYD_TABLE
from ..progress import progress
from ..rig import Rig, start_server
from ..sessions import drain, open_sessions

__all__ = ["BASELINE", "InstancesPlan", "Variant", "instances_phase", "summarise_instances"]

_PREFIX = "user-"
# The variant name of the runs with no instance: the writes alone.
BASELINE = "writes alone"


@dataclass(frozen=True)
class Variant:
    """
    How the instances are deployed: separate processes, or one process with
    ``NOTIFYD_WORKERS``; reading from the primary, or from a standby.
    """

    name: str
    workers: bool = False  # N workers in one process instead of N processes
    replica: bool = False  # NOTIFYD_READ_DSN names the standby
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """
        The name as it can go into a log file's name.
        """
        return "-".join(self.name.replace(",", " ").split())


@dataclass(frozen=True)
class InstancesPlan:
    """
    What the instances phase does.
    """

    counts: tuple[int, ...]  # instances (or workers); 0 is the writes alone
    rate: int  # commits/s
    users: int  # connected users, spread over the instances
    reps: int
    seconds: float
    drain_s: float = 10.0
    pgbench_clients: int = 16


@dataclass
class _Fleet:
    servers: list[Child]
    contenders: list[Contender]

    @property
    def clients(self) -> list[Child]:
        return [c for contender in self.contenders for c in contender.clients]


async def _open_fleet(rig: Rig, variant: Variant, count: int, users: list[str]) -> _Fleet:
    """
    ``count`` instances of ``variant`` with one receipt-taking client
    process each, every user connected to one of them.
    """
    if count == 0:
        return _Fleet([], [])
    processes = 1 if variant.workers else count
    contenders: list[Contender] = []
    servers: list[Child] = []
    try:
        for k in range(processes):
            # Polling at this rate whatever the NOTIFY lock's queue, as the
            # report describes: the cost per second of the reads is the figure.
            settings = {"NOTIFYD_POLL_ABOVE": "200", **variant.settings}
            if variant.workers:
                settings["NOTIFYD_WORKERS"] = str(count)
            server, port = await start_server(
                rig, "notifyd", name=f"notifyd-{variant.slug}-{count}-{k}", settings=settings
            )
            servers.append(server)
            config = json.dumps(
                {"kind": "notifyd", "url": f"ws://127.0.0.1:{port}", "secret": rig.secret}
            )
            mine = users[k::processes]
            # With workers, one client process per worker: the port spreads
            # the connections over them.
            clients = [
                await rig.spawn(
                    f"receipts-{variant.slug}-{count}-{k}-{j}",
                    [sys.executable, "-m", "bench.receipts", config],
                    control=True,
                )
                for j in range(count if variant.workers else 1)
            ]
            contender = Contender("notifyd", server, port, clients, mine)
            contenders.append(contender)
            await open_sessions(clients, mine)
    except BaseException:
        for contender in contenders:
            await close_contender(rig, contender)
        raise
    return _Fleet(servers, contenders)


_INSTANCE_BACKENDS = """
    SELECT pid FROM pg_stat_activity
    WHERE backend_type = 'client backend' AND application_name <> 'pgbench'
      AND pid <> pg_backend_pid() AND NOT pid = ANY($1::int[])"""


async def _instance_backends(dsn: str, exclude: list[int]) -> list[int]:
    """
    The pids of the backends the instances hold on the server at ``dsn``:
    every client backend but pgbench's, the bench's own and ``exclude``.
    """
    conn = await asyncpg.connect(dsn)
    try:
        return [r["pid"] for r in await conn.fetch(_INSTANCE_BACKENDS, exclude)]
    finally:
        await conn.close()


def _backends_cpu(before: dict[int, float], after: dict[int, float], pids: list[int]) -> float:
    """
    CPU seconds ``pids`` used between the two readings (all of it for a
    backend that started in between).
    """
    return sum(after.get(pid, 0.0) - before.get(pid, 0.0) for pid in pids)


async def _hold_lease(rig: Rig, seconds: float) -> None:
    """
    Hold the polling lease for ``seconds`` from now (0: end it), as a
    polling instance does: the triggers skip their NOTIFY meanwhile. The
    writes alone are measured so, the way they run while instances poll at
    the phase's rate; with a NOTIFY each, commits would queue for the
    notify lock and fall short of the rate.
    """
    await rig.db.execute(
        "SELECT setval('notifyd_poll_lease', "
        "floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint + $1::bigint)",
        int(seconds * 1000),
    )


def _tree_cpu(pids: list[int]) -> float:
    """
    CPU seconds of these processes and of their live children (workers).
    """
    return sum(tree_cpu_seconds(pid) for pid in pids)


async def _one_run(
    rig: Rig,
    plan: InstancesPlan,
    variant: Variant,
    count: int,
    tag: str,
    clock: str,
    standby_pid: int | None,
) -> dict[str, Any]:
    users = [f"{_PREFIX}{i}" for i in range(plan.users)]
    fleet = await _open_fleet(rig, variant, count, users)
    try:
        pids = [s.pid for s in fleet.servers]
        for pid in pids:
            await wait_quiet(pid, timeout=15)
        calm = await rig.wait_calm()
        cpu0, wall0 = _tree_cpu(pids), time.monotonic()
        pg0 = None if rig.pg_pid is None else cluster_cpu_seconds(rig.pg_pid)
        sb0 = None if standby_pid is None else cluster_cpu_seconds(standby_pid)
        backends0 = {} if rig.pg_pid is None else tree_cpu_by_pid(rig.pg_pid)
        standby_backends0 = {} if standby_pid is None else tree_cpu_by_pid(standby_pid)
        writes = Writes(NOTIFYD_TABLE, tag, _PREFIX, plan.users)
        if count == 0:
            await _hold_lease(rig, plan.seconds + 60)
        try:
            summary = await pgbench(
                rig.dsn, writes, clients=plan.pgbench_clients, threads=2, seconds=plan.seconds,
                rate=plan.rate,
            )  # fmt: skip
        finally:
            if count == 0:
                await _hold_lease(rig, 0)
        processed = int(summary["processed"] or 0)
        if fleet.clients:
            await drain(fleet.clients, tag, processed, plan.drain_s)
        cpu1, wall1 = _tree_cpu(pids), time.monotonic()
        pg1 = None if rig.pg_pid is None else cluster_cpu_seconds(rig.pg_pid)
        sb1 = None if standby_pid is None else cluster_cpu_seconds(standby_pid)
        backends1 = {} if rig.pg_pid is None else tree_cpu_by_pid(rig.pg_pid)
        standby_backends1 = {} if standby_pid is None else tree_cpu_by_pid(standby_pid)
        own = [rig.db.get_server_pid()]
        mine = _backends_cpu(backends0, backends1, await _instance_backends(rig.dsn, own))
        mine_standby = (
            _backends_cpu(
                standby_backends0,
                standby_backends1,
                await _instance_backends(variant.settings["NOTIFYD_READ_DSN"], []),
            )
            if variant.replica and count
            else None
        )
        rows = await tagged_rows(rig.db, NOTIFYD_TABLE, tag, clock)
        receipts: list[tuple[str, int]] = []
        if fleet.clients:
            replies = await asyncio.gather(
                *(c.request({"cmd": "receipts", "tag": tag}, timeout=60) for c in fleet.clients)
            )
            receipts = [(str(i), int(at)) for r in replies for i, at in r["receipts"]]
    finally:
        for contender in fleet.contenders:
            await close_contender(rig, contender)
    committed = len(rows)
    counts = account(rows, receipts) if count else {"rows": committed}

    def per_message(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or not committed else (b - a) / committed * 1e6

    return {
        "variant": variant.name if count else BASELINE,
        "instances": count,
        "rate": plan.rate,
        "tag": tag,
        "committed_per_s": committed / plan.seconds,
        **counts,
        "pg_cpu_us_per_message": per_message(pg0, pg1),
        "standby_cpu_us_per_message": per_message(sb0, sb1),
        "server_cpu_us_per_message": per_message(cpu0, cpu1) if count else None,
        # The instances' own backends alone: less noisy than the whole cluster.
        "backends_cpu_us_per_message": per_message(0.0, mine) if count else None,
        "standby_backends_cpu_us_per_message": per_message(0.0, mine_standby),
        "wall_s": wall1 - wall0,
        "other_load_before_cores": calm,
    }


async def instances_phase(
    rig: Rig,
    plan: InstancesPlan,
    variants: list[Variant],
    clock: str,
    standby_pid: int | None,
) -> dict[str, Any]:
    """
    Each variant's runs, the counts alternating forward and backward from
    one rep to the next (so neither end always meets the same moment of a
    shared machine), then their medians.
    """
    runs: list[dict[str, Any]] = []
    for rep in range(plan.reps):
        for variant in variants:
            counts = plan.counts if rep % 2 == 0 else plan.counts[::-1]
            for count in counts:
                if count == 0 and variant != variants[0]:
                    continue  # the writes alone, once per rep: every variant's baseline
                tag = f"in{len(runs)}"
                run = await _one_run(rig, plan, variant, count, tag, clock, standby_pid)
                run["rep"] = rep
                runs.append(run)
                lat = run.get("latency_ms") or {}
                progress(
                    f"  {variant.name} x{count}: {run['committed_per_s']:.0f} commits/s, Postgres "
                    f"{_fmt(run['pg_cpu_us_per_message'])} us/message, standby "
                    f"{_fmt(run['standby_cpu_us_per_message'])}, instances' backends "
                    f"{_fmt(run['backends_cpu_us_per_message'])} + "
                    f"{_fmt(run['standby_backends_cpu_us_per_message'])} on the standby, "
                    f"p99 {lat.get('p99')} ms, "
                    f"lost {run.get('lost', 0)}, twice {run.get('duplicates', 0)}"
                )
    return {
        "counts": list(plan.counts),
        "rate": plan.rate,
        "users": plan.users,
        "reps": plan.reps,
        "seconds": plan.seconds,
        "variants": [
            {"name": v.name, "workers": v.workers, "replica": v.replica} for v in variants
        ],
        "runs": runs,
        "summary": summarise_instances(runs),
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarise_instances(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Per (variant, instances): medians of the CPU per message and of p99,
    and the totals of rows, losses and duplicates. The zero-instance runs
    (the writes alone) are the baseline row of every variant.
    """
    out = []
    keys = sorted({(r["variant"], r["instances"]) for r in runs}, key=lambda k: (k[0], k[1]))
    for variant, count in keys:
        mine = [r for r in runs if (r["variant"], r["instances"]) == (variant, count)]
        out.append(
            {
                "variant": variant,
                "instances": count,
                "runs": len(mine),
                "pg_cpu_us": _median([r["pg_cpu_us_per_message"] for r in mine]),
                "standby_cpu_us": _median([r["standby_cpu_us_per_message"] for r in mine]),
                "server_cpu_us": _median([r["server_cpu_us_per_message"] for r in mine]),
                "backends_cpu_us": _median([r.get("backends_cpu_us_per_message") for r in mine]),
                "standby_backends_cpu_us": _median(
                    [r.get("standby_backends_cpu_us_per_message") for r in mine]
                ),
                "p99_ms": _median([(r.get("latency_ms") or {}).get("p99") for r in mine]),
                "committed_per_s": _median([r["committed_per_s"] for r in mine]),
                "rows": sum(r["rows"] for r in mine),
                "lost": sum(r.get("lost", 0) for r in mine),
                "duplicates": sum(r.get("duplicates", 0) for r in mine),
            }
        )
    return out
