"""
One rate step: the writers insert at a target rate for a while, the clients
drain; its latencies, rates, losses, CPU by process group and collector
pauses, and whether it passed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .control import Child
from .measure import busy_seconds, cpu_seconds, gc_pauses, percentiles
from .plan import TABLES
from .rig import Rig, children_cpu
from .sessions import drain, take

__all__ = ["run_step", "step_line"]


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
    clients0, writers0 = children_cpu(clients), children_cpu(writers)
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
    clients1, writers1 = children_cpu(clients), children_cpu(writers)
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


def step_line(kind: str, step: dict[str, Any]) -> str:
    """
    A step's progress line: its rates, latencies, CPU and verdict.
    """
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
