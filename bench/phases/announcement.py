"""
The announcement phase (notifyd only): one row for every user, committed
while all sessions are open; the time until the last session received it.
"""

from __future__ import annotations

import time
from typing import Any

from ..control import Child
from ..measure import percentiles
from ..plan import NOTIFYD_TABLE
from ..progress import progress
from ..rig import Rig
from ..sessions import drain, take

__all__ = ["announcements"]


async def announcements(
    rig: Rig, clients: list[Child], sessions: int, count: int | None = None, first: int = 0
) -> dict[str, Any]:
    """
    The plan's announcements (or ``count`` of them), one after the other,
    to ``sessions`` open sessions; each rep's receipts and the median time
    to the last one. ``first`` numbers their tags after earlier ones.
    """
    reps: list[dict[str, Any]] = []
    for r in range(first, first + (rig.plan.announcements if count is None else count)):
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
