"""
The profile phase: notifyd once more, under cProfile, at its highest
sustained single-row step; the profile's top functions as text.
"""

from __future__ import annotations

import asyncio
import pstats
import signal
from io import StringIO
from pathlib import Path
from typing import Any

from ..control import ROOT, Child
from ..measure import source_fingerprint
from ..progress import progress
from ..rig import Rig, start_clients, start_server
from ..sessions import open_sessions
from ..step import run_step, step_line

__all__ = ["profile_phase"]


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
        progress(step_line("notifyd (cProfile)", step))
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
