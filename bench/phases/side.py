"""
A server under test as one side of the comparison: started with its client
processes, its idle sessions opened (the memory they take), announced to
(notifyd), warmed up; at the end stopped, with its log's warnings and its
collector pauses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..control import Child
from ..measure import gc_pauses, rss_kib, source_fingerprint, wait_quiet
from ..progress import progress
from ..rig import Rig, start_clients, start_server
from ..sessions import open_sessions
from ..step import run_step
from .announcement import announcements

__all__ = ["Side", "close_side", "open_side"]


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


def _warnings(child: Child) -> list[str]:
    """
    The first 20 warning, error and traceback lines of a child's log.
    """
    try:
        lines = child.log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [
        line for line in lines if " WARNING " in line or " ERROR " in line or "Traceback" in line
    ][:20]
