"""
The session-open phase: how long a session takes to open (notifyd: connect
and hello) for a user with a large history and for one with none, and how
long one large INSERT stalls delivery.
"""

from __future__ import annotations

import time
from typing import Any

from ..control import Child
from ..measure import percentiles
from ..plan import NOTIFYD_TABLE
from ..progress import progress
from ..rig import Rig

__all__ = ["BIG_USER", "connect_times"]

BIG_USER = "bench-big"


async def connect_times(rig: Rig, clients: list[Child], kind: str) -> dict[str, Any]:
    """
    notifyd: open a session (connect + hello) for a user with
    ``hello_rows`` messages, half unread; naive: connect only.
    """
    plan = rig.plan
    result: dict[str, Any] = {}
    n = plan.hello_connects
    if kind == "notifyd":
        started = time.monotonic()
        await rig.db.execute(
            f"INSERT INTO {NOTIFYD_TABLE} (to_user, title, content, type, send_user, is_read) "
            "SELECT $1, 'Old message ' || g, 'content ' || g, 'bench', 'bench-writer', "
            "CASE WHEN g % 2 = 0 THEN '1' ELSE '0' END FROM generate_series(1, $2) AS g",
            BIG_USER,
            plan.hello_rows,
        )
        inserted = time.monotonic()
        # Joining sessions are admitted after the delivery window that holds
        # the big INSERT: the first hello measures that catch-up.
        await clients[0].request(
            {"cmd": "hello_times", "user": "bench-probe", "n": 1, "timeout": 300}, timeout=330
        )
        result["insert_s"] = inserted - started
        result["catch_up_s"] = time.monotonic() - inserted
        progress(
            f"  {plan.hello_rows}-row INSERT: {result['insert_s']:.1f}s, delivery caught up {result['catch_up_s']:.1f}s later"
        )
        await rig.db.execute(f"VACUUM ANALYZE {NOTIFYD_TABLE}")
    reply = await clients[0].request(
        {"cmd": "hello_times", "user": BIG_USER, "n": n + 1, "timeout": 60}, timeout=300
    )
    times = reply["ms"][1:]  # the first one warms up
    result["big_user_ms"] = percentiles([round(t * 1000) for t in times])
    result["big_user_median_ms"] = sorted(times)[len(times) // 2]
    fresh = (
        await clients[0].request(
            {"cmd": "hello_times", "user": "bench-fresh", "n": n + 1, "timeout": 60}, timeout=300
        )
    )["ms"][1:]
    result["fresh_user_median_ms"] = sorted(fresh)[len(fresh) // 2]
    progress(
        f"  {kind} session open: user with {plan.hello_rows if kind == 'notifyd' else 0} messages "
        f"median {result['big_user_median_ms']:.2f} ms, fresh user {result['fresh_user_median_ms']:.2f} ms"
    )
    return result
