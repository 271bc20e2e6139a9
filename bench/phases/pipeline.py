"""
The pipeline phase: pgbench writers commit single-row INSERTs
(synchronous_commit on) at a paced rate to random connected users, into
notifyd's table or the naive relay's, runs alternating between the two;
per run, commit-to-receipt latency of every row, rows lost or received
twice, and the CPU the server and the whole Postgres cluster spent per
delivery.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from ..accounting import account, tagged_rows
from ..contenders import Contender, take_receipts
from ..control import http_get
from ..measure import (
    BACKEND_PARTS,
    backend_cpu_by_part,
    cluster_cpu_seconds,
    tree_cpu_seconds,
    wait_quiet,
)
from ..pgbench import Writes, pgbench
from ..progress import progress
from ..rig import Rig

__all__ = ["one_run", "pipeline_runs", "summarise"]

# notifyd's counters that say how it learned of the run's commits: rows
# pushed from their NOTIFY's payload, window reads, polling leases started.
COUNTERS = {
    "pushed_ahead": "notifyd_pushed_ahead_total",
    "window_reads": "notifyd_window_reads_total",
    "polling_leases": "notifyd_polling_leases_total",
}


async def notifyd_counters(contender: Contender) -> dict[str, float] | None:
    """
    :data:`COUNTERS` as notifyd's ``/metrics`` gives them now; None for the
    naive relay, or when they cannot be read.
    """
    if contender.kind != "notifyd":
        return None
    answer = await http_get(contender.port, "/metrics", timeout=5.0)
    if answer is None or answer[0] != 200:
        return None
    values: dict[str, float] = {}
    for line in answer[1].decode().splitlines():
        name, _, value = line.partition(" ")
        if name in COUNTERS.values():
            values[name] = float(value)
    return {key: values[name] for key, name in COUNTERS.items() if name in values}


_PREFIX = "user-"


async def one_run(
    rig: Rig, contender: Contender, rate: int, tag: str, clock: str
) -> dict[str, Any]:
    """
    One paced pgbench run into ``contender``: its rows accounted for, the
    commit-to-receipt latencies, the server's (with its worker processes, if
    any) and Postgres's CPU per delivery.
    """
    plan = rig.plan
    server = contender.server
    calm = await rig.wait_calm()
    counters0 = await notifyd_counters(contender)
    cpu0, wall0 = tree_cpu_seconds(server.pid), time.monotonic()
    pg0 = None if rig.pg_pid is None else cluster_cpu_seconds(rig.pg_pid)
    parts0 = None if rig.pg_pid is None else await backend_cpu_by_part(rig.db, rig.pg_pid)
    writes = Writes(contender.table, tag, _PREFIX, len(contender.users))
    summary = await pgbench(
        rig.dsn, writes, clients=plan.pipeline_clients, threads=2, seconds=plan.pipeline_s,
        rate=rate,
    )  # fmt: skip
    rows = await tagged_rows(rig.db, contender.table, tag, clock)
    receipts = await take_receipts(contender, tag, len(rows), plan.drain_s)
    cpu1, wall1 = tree_cpu_seconds(server.pid), time.monotonic()
    pg1 = None if rig.pg_pid is None else cluster_cpu_seconds(rig.pg_pid)
    parts1 = None if rig.pg_pid is None else await backend_cpu_by_part(rig.db, rig.pg_pid)
    counters1 = await notifyd_counters(contender)
    counts = account(rows, receipts)
    delivered = counts["received"]
    by_part = (
        {part: (parts1[part] - parts0[part]) / delivered * 1e6 for part in parts1}
        if delivered and parts0 is not None and parts1 is not None
        else None
    )
    return {
        "kind": contender.kind,
        "sessions": len(contender.users),
        "rate": rate,
        "tag": tag,
        "committed_per_s": len(rows) / plan.pipeline_s,
        "pgbench": summary,
        **counts,
        "server_cpu_us_per_delivery": (cpu1 - cpu0) / delivered * 1e6 if delivered else None,
        "pg_cpu_us_per_delivery": (pg1 - pg0) / delivered * 1e6
        if delivered and pg0 is not None and pg1 is not None
        else None,
        "pg_cpu_us_per_delivery_by_part": by_part,
        "wall_s": wall1 - wall0,
        "other_load_before_cores": calm,
        "notifyd": {key: counters1[key] - counters0[key] for key in counters0 if key in counters1}
        if counters0 and counters1
        else None,
    }


def _line(run: dict[str, Any]) -> str:
    lat = run["latency_ms"]
    p = "n/a" if lat["p50"] is None else f"p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} ms"
    cpu, pg = run["server_cpu_us_per_delivery"], run["pg_cpu_us_per_delivery"]
    return (
        f"  {run['kind']} {run['sessions']} sessions {run['rate']}/s: committed "
        f"{run['committed_per_s']:.0f}/s, received {run['received']}/{run['rows']} "
        f"(lost {run['lost']}, twice {run['duplicates']}), {p}, server "
        f"{'n/a' if cpu is None else f'{cpu:.0f}'} us, Postgres "
        f"{'n/a' if pg is None else f'{pg:.0f}'} us per delivery"
    )


async def pipeline_runs(
    rig: Rig, contenders: list[Contender], clock: str, first_tag: int
) -> list[dict[str, Any]]:
    """
    The plan's alternating runs at each rate, every contender in turn (the
    order flips each time, so neither always meets the same moment of a
    shared machine).
    """
    plan = rig.plan
    runs: list[dict[str, Any]] = []
    turn = 0
    for rep in range(plan.pipeline_reps):
        for rate in plan.pipeline_rates:
            order = contenders if turn % 2 == 0 else contenders[::-1]
            turn += 1
            for contender in order:
                tag = f"pl{first_tag + len(runs)}"
                run = await one_run(rig, contender, rate, tag, clock)
                run["rep"] = rep
                runs.append(run)
                progress(_line(run))
                await wait_quiet(contender.server.pid, timeout=15)
    return runs


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Per (sessions, rate, server): medians over the runs of p50, p99, server
    and Postgres CPU per delivery, and the totals of rows, losses and
    duplicates.
    """
    keys = sorted({(r["sessions"], r["rate"], r["kind"]) for r in runs})
    out = []
    for sessions, rate, kind in keys:
        mine = [r for r in runs if (r["sessions"], r["rate"], r["kind"]) == (sessions, rate, kind)]
        out.append(
            {
                "sessions": sessions,
                "rate": rate,
                "kind": kind,
                "runs": len(mine),
                "p50_ms": _median([r["latency_ms"]["p50"] for r in mine]),
                "p99_ms": _median([r["latency_ms"]["p99"] for r in mine]),
                "insert_p50_ms": _median([r["insert_latency_ms"]["p50"] for r in mine]),
                "insert_p99_ms": _median([r["insert_latency_ms"]["p99"] for r in mine]),
                "server_cpu_us": _median([r["server_cpu_us_per_delivery"] for r in mine]),
                "pg_cpu_us": _median([r["pg_cpu_us_per_delivery"] for r in mine]),
                "pg_cpu_us_by_part": {
                    part: _median(
                        [(r.get("pg_cpu_us_per_delivery_by_part") or {}).get(part) for r in mine]
                    )
                    for part in BACKEND_PARTS
                },
                "committed_per_s": _median([r["committed_per_s"] for r in mine]),
                "rows": sum(r["rows"] for r in mine),
                "lost": sum(r["lost"] for r in mine),
                "duplicates": sum(r["duplicates"] for r in mine),
            }
        )
    return out
