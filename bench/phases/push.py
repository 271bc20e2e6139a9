"""
The push-pipeline phases in order: what one commit costs Postgres, piece by
piece (no server running); then for each session count: both servers
started with one session per user, the alternating pipeline runs; at the
ceiling's session count also the isolated messages (both servers, nothing
else running), then the commit ceiling (notifyd alone: the naive relay's
idle LISTEN connection would be signalled by every notifying commit).
"""

from __future__ import annotations

from typing import Any

from ..accounting import COMMIT_CLOCKS, commit_clock
from ..contenders import KINDS, Contender, close_contender, open_contender
from ..naive_server import NAIVE_TABLE
from ..plan import NOTIFYD_TABLE
from ..progress import progress
from ..rig import Rig
from .ceiling import ceiling_phase
from .commit_cost import commit_cost_phase
from .isolated import isolated_phase
from .pipeline import pipeline_runs, summarise

__all__ = ["SEEDED_ROWS", "push_phases", "seed_table"]

SEEDED_ROWS = 100_000


async def seed_table(rig: Rig) -> None:
    """
    :data:`SEEDED_ROWS` earlier messages to other users, analyzed: a
    production inbox table is not empty and has statistics, and notifyd
    reuses its window reads' plans only once the table is analyzed.
    """
    await rig.db.execute(
        f"INSERT INTO {NOTIFYD_TABLE} (to_user, title, content, type, send_user) "
        "SELECT 'earlier-' || (g % 10000), 'Earlier message', 'seed', 'bench', 'bench-seed' "
        f"FROM generate_series(1, {SEEDED_ROWS}) AS g"
    )
    await rig.db.execute(f"VACUUM ANALYZE {NOTIFYD_TABLE}")


async def push_phases(rig: Rig) -> dict[str, Any]:
    """
    Every push-pipeline figure of one run (``results["push"]``).
    """
    plan = rig.plan
    clock = await commit_clock(rig.db)
    await rig.db.execute(
        f"TRUNCATE {NOTIFYD_TABLE}, t_message_event, t_message_receipt, {NAIVE_TABLE}"
    )
    await seed_table(rig)
    progress(f"push pipeline: commit time from {COMMIT_CLOCKS[clock]}")
    result: dict[str, Any] = {
        "commit_clock": clock,
        "seeded_rows": SEEDED_ROWS,
        "rates": list(plan.pipeline_rates),
        "session_counts": list(plan.pipeline_sessions),
        "reps": plan.pipeline_reps,
        "seconds": plan.pipeline_s,
        "pgbench_clients": plan.pipeline_clients,
        "runs": [],
    }
    progress("commit cost, piece by piece (no server running)")
    result["commit_cost"] = await commit_cost_phase(rig)
    for sessions in plan.pipeline_sessions:
        users = [f"user-{i}" for i in range(sessions)]
        progress(f"push pipeline with {sessions} sessions per server")
        contenders: list[Contender] = []
        try:
            for kind in KINDS:
                contenders.append(await open_contender(rig, kind, users))
            result["runs"] += await pipeline_runs(rig, contenders, clock, len(result["runs"]))
            if sessions == plan.ceiling_sessions:
                progress("isolated messages")
                result["isolated"] = await isolated_phase(rig, contenders, clock)
                for contender in [c for c in contenders if c.kind != "notifyd"]:
                    contenders.remove(contender)
                    await close_contender(rig, contender)
                progress(f"commit ceiling, {plan.ceiling_clients} pgbench clients")
                result["ceiling"] = await ceiling_phase(rig, contenders[0], clock)
        finally:
            for contender in contenders:
                await close_contender(rig, contender)
    result["summary"] = summarise(result["runs"])
    return result
