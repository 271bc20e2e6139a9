"""
The isolated-message phase: no writers running, one single-row INSERT
(autocommit, synchronous_commit on) every ``isolated_gap_s`` to each server,
interleaved (the other server's message half a gap later); commit-to-receipt
latency of each.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..accounting import account, tagged_rows
from ..contenders import Contender, take_receipts
from ..progress import progress
from ..rig import Rig

__all__ = ["isolated_phase"]


async def isolated_phase(rig: Rig, contenders: list[Contender], clock: str) -> dict[str, Any]:
    """
    ``isolated_messages`` messages to each contender, ``isolated_gap_s``
    apart, each to the next of its users.
    """
    plan = rig.plan
    calm = await rig.wait_calm()
    tags = {c.kind: f"iso{c.kind[:2]}" for c in contenders}
    slot = plan.isolated_gap_s / len(contenders)
    start = time.monotonic()
    for i in range(plan.isolated_messages):
        for k, contender in enumerate(contenders):
            due = start + (i * len(contenders) + k) * slot
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await rig.db.execute(
                f"INSERT INTO {contender.table} (to_user, title, content, type, send_user) "
                "VALUES ($1, 'Bench message', $2 || ':' || "
                "((extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 1000), "
                "'bench', 'bench-writer')",
                contender.users[i % len(contender.users)],
                tags[contender.kind],
            )
    out: dict[str, Any] = {
        "messages": plan.isolated_messages,
        "gap_s": plan.isolated_gap_s,
        "other_load_before_cores": calm,
    }
    for contender in contenders:
        tag = tags[contender.kind]
        rows = await tagged_rows(rig.db, contender.table, tag, clock)
        receipts = await take_receipts(contender, tag, len(rows), plan.drain_s)
        out[contender.kind] = account(rows, receipts)
        lat = out[contender.kind]["latency_ms"]
        progress(
            f"  isolated messages, {contender.kind}: {out[contender.kind]['received']}/{len(rows)}, "
            f"p50 {lat['p50']} ms, p99 {lat['p99']} ms"
        )
    return out
