"""
What one single-row commit costs Postgres, piece by piece: the CPU of the
writing backend and of a listening one, for each server's table and trigger
and the steps between them, one commit at a time, no server running.

The pipeline runs give Postgres's CPU per delivery as a whole; this says
which part of a commit's cost is the table (its indexes) and which is the
trigger, so that a difference between the servers there has a measured
cause.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import asyncpg

from ..measure import tree_cpu_by_pid
from ..naive_server import CHANNEL as NAIVE_CHANNEL
from ..naive_server import NAIVE_SCHEMA, NAIVE_TABLE
from ..plan import NOTIFYD_TABLE
from ..progress import progress
from ..rig import Rig
from ..writers import single_row_insert
from .trigger import insert_trigger_on

__all__ = ["CASES", "commit_cost_phase"]

# (key, the server's table it copies, trigger on the copy, what it is): one
# copy per case, so that nothing is altered while a writer holds its plans.
CASES: tuple[tuple[str, str, str | None, str], ...] = (
    ("naive_bare", NAIVE_TABLE, None, "naive relay's table, no trigger"),
    ("naive", NAIVE_TABLE, "row", "naive relay's table and per-row trigger"),
    ("notifyd_bare", NOTIFYD_TABLE, None, "notifyd's table, no trigger"),
    ("notifyd_row_trigger", NOTIFYD_TABLE, "row", "notifyd's table, the naive relay's trigger"),
    ("notifyd", NOTIFYD_TABLE, "notifyd", "notifyd's table and insert trigger"),
)

# The channel of the fence notification (see _Heard).
_FENCE = "bench_cost_fence"


def _copy(key: str) -> str:
    return f"bench_cost_{key}"


async def _prepare(db: asyncpg.Connection) -> None:
    await db.execute(NAIVE_SCHEMA)  # the naive relay's notify function
    for key, source, trigger, _ in CASES:
        copy = _copy(key)
        await db.execute(
            f"DROP TABLE IF EXISTS {copy}; CREATE TABLE {copy} (LIKE {source} INCLUDING ALL)"
        )
        if trigger == "notifyd":
            await db.execute(insert_trigger_on(copy))
        elif trigger == "row":
            await db.execute(
                f"CREATE TRIGGER naive_notify AFTER INSERT ON {copy} "
                "FOR EACH ROW EXECUTE FUNCTION naive_notify()"
            )


async def commit_cost_phase(rig: Rig) -> dict[str, Any]:
    """
    CPU µs per single-row INSERT transaction (synchronous_commit on) of the
    writing backend and of the backend LISTENing on both servers' channels,
    for each of :data:`CASES`, rounds alternating; medians. Measured only
    when the harness runs the cluster (it reads its processes' CPU).
    """
    plan = rig.plan
    if rig.pg_pid is None:
        return {"measured": False}
    await _prepare(rig.db)
    writer = await asyncpg.connect(rig.dsn)
    listener = await asyncpg.connect(rig.dsn)
    heard = _Heard()
    runs: list[dict[str, Any]] = []
    try:
        await writer.execute("SET synchronous_commit = on")
        for channel in ("notifyd", NAIVE_CHANNEL, _FENCE):
            await listener.add_listener(channel, heard.one)
        pids = (
            await writer.fetchval("SELECT pg_backend_pid()"),
            await listener.fetchval("SELECT pg_backend_pid()"),
        )
        n = plan.commit_cost_commits
        warm = max(1, n // 10)  # the backends' caches and plans
        for round_ in range(plan.trigger_rounds):
            for key, _, trigger, _ in CASES:
                insert = single_row_insert(_copy(key))
                for i in range(warm):
                    await writer.execute(insert, f"cost-{i % 1000}", "warm-up")
                await heard.fence(writer)
                before, start = tree_cpu_by_pid(rig.pg_pid), heard.count
                for i in range(n):
                    await writer.execute(insert, f"cost-{i % 1000}", f"cost:{i}")
                # Every notification of those commits has reached the
                # listener, and its backend's CPU for them is in the reading.
                await heard.fence(writer)
                after = tree_cpu_by_pid(rig.pg_pid)
                writer_us, listener_us = ((after[pid] - before[pid]) / n * 1e6 for pid in pids)
                runs.append({"round": round_, "case": key, "writer_us": writer_us,
                             "listener_us": listener_us,
                             "notifications": heard.count - start})  # fmt: skip
                expected = n if trigger else 0
                if runs[-1]["notifications"] != expected:
                    # notifyd's trigger is quiet under a polling lease.
                    raise RuntimeError(
                        f"commit cost, {key}: {n} commits sent {runs[-1]['notifications']} "
                        f"notifications, not {expected}"
                    )
        progress(
            "  commit cost, µs per commit (writer + listener): "
            + ", ".join(f"{key} {_median(runs, key, 'total_us'):.0f}" for key, *_ in CASES)
        )
    finally:
        await writer.close()
        await listener.close()
        await rig.db.execute("DROP TABLE IF EXISTS " + ", ".join(_copy(key) for key, *_ in CASES))
    return {
        "measured": True,
        "commits": plan.commit_cost_commits,
        "rounds": plan.trigger_rounds,
        "cases": {
            key: {
                "what": what,
                "writer_us": _median(runs, key, "writer_us"),
                "listener_us": _median(runs, key, "listener_us"),
                "total_us": _median(runs, key, "total_us"),
            }
            for key, _, _, what in CASES
        },
        "runs": runs,
    }


def _median(runs: list[dict[str, Any]], key: str, figure: str) -> float:
    return float(
        statistics.median(
            r["writer_us"] + r["listener_us"] if figure == "total_us" else r[figure]
            for r in runs
            if r["case"] == key
        )
    )


class _Heard:
    """
    The notifications a listener has been sent, and a fence: a NOTIFY sent
    after a writer's commits arrives after every notification of theirs.
    """

    def __init__(self) -> None:
        self.count = 0
        self._fenced = asyncio.Event()

    def one(self, _connection: object, _pid: int, channel: str, _payload: object) -> None:
        if channel == _FENCE:
            self._fenced.set()
        else:
            self.count += 1

    async def fence(self, writer: asyncpg.Connection) -> None:
        self._fenced.clear()
        await writer.execute(f"SELECT pg_notify('{_FENCE}', '')")
        await asyncio.wait_for(self._fenced.wait(), 30)
