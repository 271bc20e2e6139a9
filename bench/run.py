"""
One run over one database, phase after phase: the schema, both servers' idle
sessions, the interleaved ramps, the session-open times, the profile and the
trigger cost; returns the results (everything ``bench/results.json`` holds
but what ``python -m bench`` measures before and after it).
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg

from notifyd.db import schema_sql

from .measure import machine
from .naive_server import NAIVE_SCHEMA, NAIVE_TABLE
from .phases.profile import profile_phase
from .phases.push import push_phases
from .phases.ramp import ramp
from .phases.session_open import connect_times
from .phases.side import Side, close_side, open_side
from .phases.trigger import trigger_phase
from .plan import NOTIFYD_TABLE, Plan
from .progress import progress
from .rig import Rig, start_writers

__all__ = ["interrupt_on_sigterm", "run"]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """
    Make SIGTERM interrupt this process as Ctrl-C does, so that the run
    cleans up after itself (the child processes, the embedded database).
    """
    signal.signal(signal.SIGTERM, _interrupt)


async def run(
    plan: Plan,
    dsn: str,
    pg_pid: int | None,
    logs: Path,
    notifyd_env: dict[str, str],
    only_push: bool = False,
) -> dict[str, Any]:
    """
    The phases in order on a freshly applied schema (with ``only_push``,
    the push-pipeline phases alone). SIGTERM cancels the run; whatever it
    started is stopped either way.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    rig = Rig(plan, dsn, pg_pid, logs, notifyd_env)
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
        if only_push:
            results["push"] = await push_phases(rig)
            return results
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
        results["push"] = await push_phases(rig)
    finally:
        await rig.close()
        loop.remove_signal_handler(signal.SIGTERM)
        interrupt_on_sigterm()
    return results
