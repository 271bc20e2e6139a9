"""
The commit-ceiling phase: 16 pgbench clients insert single-row transactions
as fast as they can into notifyd's table while notifyd runs with its
sessions connected, in three cases, alternating over the reps:

- ``offline``: to users who are not connected, the table's triggers on;
  afterwards every row is accounted for: those users catch up through the
  resume path and get every row exactly once (compared with the table), and
  with the webhook sink on, its dispatch queue holds every row;
- ``no_trigger``: the same with ``ALTER TABLE … DISABLE TRIGGER USER``, the
  throughput the commit path would have without notifyd;
- ``online``: to connected users, triggers on; every row delivered exactly
  once to the sessions.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from ..accounting import account, tagged_rows
from ..catchup import Catchup
from ..contenders import Contender, take_receipts
from ..measure import wait_quiet
from ..pgbench import Writes, pgbench
from ..plan import NOTIFYD_TABLE
from ..progress import progress
from ..rig import Rig

__all__ = ["CASES", "ceiling_phase"]

CASES = ("offline", "no_trigger", "online")


async def _webhook_queue(rig: Rig, tag: str, rows: int, timeout: float) -> int | None:
    """
    How many of the tag's rows the webhook's dispatch table holds once it
    has all of them or ``timeout`` passed; None when the webhook is off.
    """
    sinks = rig.notifyd_env.get("NOTIFYD_SINKS", "")
    if "webhook" not in {s.strip() for s in sinks.split(",")}:
        return None
    deadline = time.monotonic() + timeout
    while True:
        queued = int(
            await rig.db.fetchval(
                "SELECT count(*) FROM t_message_dispatch d JOIN t_message_real_time m "
                "ON m.id = d.message_id WHERE d.sink = 'webhook' AND m.content LIKE $1",
                tag + ":%",
            )
        )
        if queued >= rows or time.monotonic() >= deadline:
            return queued
        await asyncio.sleep(0.2)


async def _flood(rig: Rig, tag: str, prefix: str, users: int) -> dict[str, Any]:
    plan = rig.plan
    writes = Writes(NOTIFYD_TABLE, tag, prefix, users)
    return await pgbench(
        rig.dsn, writes, clients=plan.ceiling_clients, threads=2, seconds=plan.ceiling_s
    )


async def _case(
    rig: Rig, notifyd: Contender, case: str, rep: int, clock: str, catchup: Catchup
) -> dict[str, Any]:
    plan = rig.plan
    tag = f"ce{rep}{case[:3]}"
    calm = await rig.wait_calm()
    out: dict[str, Any] = {"case": case, "rep": rep, "tag": tag, "other_load_before_cores": calm}
    if case == "online":
        summary = await _flood(rig, tag, "user-", len(notifyd.users))
        rows = await tagged_rows(rig.db, NOTIFYD_TABLE, tag, clock)
        receipts = await take_receipts(notifyd, tag, len(rows), max(plan.drain_s, 30.0))
        out["delivery"] = account(rows, receipts)
    elif case == "offline":
        since = await catchup.cursor()
        prefix = f"dark{rep}-"
        summary = await _flood(rig, tag, prefix, plan.ceiling_sessions)
        rows = await tagged_rows(rig.db, NOTIFYD_TABLE, tag, clock)
        by_user: dict[str, list[str]] = {}
        for record in await rig.db.fetch(
            f"SELECT to_user, id FROM {NOTIFYD_TABLE} WHERE content LIKE $1", tag + ":%"
        ):
            by_user.setdefault(record["to_user"], []).append(record["id"])
        out["catchup"] = await catchup.replay_all(by_user, since, timeout=60.0)
        out["webhook_queued"] = await _webhook_queue(rig, tag, len(rows), 60.0)
    else:
        await rig.db.execute(f"ALTER TABLE {NOTIFYD_TABLE} DISABLE TRIGGER USER")
        try:
            summary = await _flood(rig, tag, f"dark{rep}n-", plan.ceiling_sessions)
        finally:
            await rig.db.execute(f"ALTER TABLE {NOTIFYD_TABLE} ENABLE TRIGGER USER")
        rows = await tagged_rows(rig.db, NOTIFYD_TABLE, tag, clock)
    out["pgbench"] = summary
    out["rows"] = len(rows)
    # Rows in the table over the run's length: what committed, not what
    # pgbench believes it sent.
    out["commits_per_s"] = len(rows) / plan.ceiling_s
    await wait_quiet(notifyd.server.pid, timeout=30)
    return out


def _line(run: dict[str, Any]) -> str:
    text = f"  ceiling {run['case']}: {run['commits_per_s']:.0f} commits/s ({run['rows']} rows)"
    if "catchup" in run:
        c = run["catchup"]
        text += (
            f"; catch-up of {c['users']} users: {c['replayed']}/{c['rows']} replayed, "
            f"{c['missing']} missing, {c['twice']} twice, hello unread {c['hello_unread']}"
        )
        if run.get("webhook_queued") is not None:
            text += f"; webhook queue {run['webhook_queued']}"
    if "delivery" in run:
        d = run["delivery"]
        text += (
            f"; delivered {d['received']}/{d['rows']}, lost {d['lost']}, twice {d['duplicates']}"
        )
    return text


async def ceiling_phase(rig: Rig, notifyd: Contender, clock: str) -> dict[str, Any]:
    """
    The three cases, ``ceiling_reps`` times (the order of the first two
    alternating); medians of the throughput, every rep's accounting.
    """
    plan = rig.plan
    catchup = Catchup(notifyd.port, rig.secret)
    runs: list[dict[str, Any]] = []
    for rep in range(plan.ceiling_reps):
        order = ("offline", "no_trigger") if rep % 2 == 0 else ("no_trigger", "offline")
        for case in (*order, "online"):
            run = await _case(rig, notifyd, case, rep, clock, catchup)
            runs.append(run)
            progress(_line(run))
    medians = {
        case: statistics.median(r["commits_per_s"] for r in runs if r["case"] == case)
        for case in CASES
    }
    return {
        "clients": plan.ceiling_clients,
        "sessions": len(notifyd.users),
        "seconds": plan.ceiling_s,
        "reps": plan.ceiling_reps,
        "commits_per_s": medians,
        "runs": runs,
    }
