"""
A writer process: inserts messages the way an application would, at a target
rate with the commit time in each row, or as fast as it can.

``python -m bench.writers '<config json>'`` with config
``{"dsn": "...", "conns": 8, "synchronous_commit": "on"|"off"}``. Requests are
JSON lines on stdin, one reply line each:

* ``{"cmd": "single", "table", "rate", "duration", "tag", "online", "offline_share", "seed"}``:
  single-row autocommit INSERTs at ``rate`` rows/s, each to a random online
  user or (``offline_share`` of them) to an offline one;
* ``{"cmd": "batch", "table", "rate", "rows", "duration", "tag", "online", "seed"}``:
  ``rows``-row INSERT statements at ``rate`` statements/s, each to distinct
  online users;
* ``{"cmd": "flood", "table", "rows", "duration"}``: closed loop, as fast as
  the connections go (the trigger-cost runs);
* ``{"cmd": "ping"}``: answered once the connections are open;
* ``{"cmd": "quit"}`` (EOF on stdin also quits).

``content`` is ``"<tag>:<time.time_ns()>"``, taken just before the statement
is sent: each is its own transaction (autocommit), so that is just before its
COMMIT.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from .control import serve_commands

_TABLE = re.compile(r"[a-z_][a-z0-9_]*")
_ONE = "INSERT INTO {table} (to_user, title, content, type, send_user) VALUES ($1, 'Bench message', $2, 'bench', 'bench-writer')"
_MANY = (
    "INSERT INTO {table} (to_user, title, content, type, send_user) "
    "SELECT u, 'Bench message', $2, 'bench', 'bench-writer' FROM unnest($1::text[]) AS u"
)
_OVERRUN = 1.5  # a paced run stops at duration * _OVERRUN + 1 s however far behind


def _sql(template: str, table: str) -> str:
    if not _TABLE.fullmatch(table):
        raise ValueError(f"bad table name {table!r}")
    return template.format(table=table)


def single_row_insert(table: str) -> str:
    """
    The writers' single-row INSERT into ``table`` ($1 the user, $2 the content).
    """
    return _sql(_ONE, table)


class Writers:
    """
    A few connections and the loops that drive them.
    """

    def __init__(self, connections: list[asyncpg.Connection]) -> None:
        self.connections = connections

    async def paced(
        self,
        sql: str,
        rate: float,
        duration: float,
        tag: str,
        pick: Callable[[random.Random], tuple[Any, int, int]],
        seed: int,
    ) -> dict[str, Any]:
        """
        Run ``rate`` statements/s over all connections (open loop: a late
        statement is sent at once, never skipped) for ``duration`` seconds.
        ``pick`` gives (first argument, rows, rows for online users).
        """
        n = len(self.connections)
        interval = n / rate
        start = time.monotonic() + 0.01
        start_ns = time.time_ns() + 10_000_000
        hard_stop = start + duration * _OVERRUN + 1.0
        totals = {"statements": 0, "rows": 0, "online": 0}
        ends: list[int] = []

        async def loop(k: int, connection: asyncpg.Connection) -> None:
            rng = random.Random(seed * 1000 + k)
            due = start + k / rate
            end_ns = start_ns
            while due < start + duration:
                now = time.monotonic()
                if now >= hard_stop:
                    break
                if due > now:
                    await asyncio.sleep(due - now)
                target, rows, online = pick(rng)
                await connection.execute(sql, target, f"{tag}:{time.time_ns()}")
                end_ns = time.time_ns()
                totals["statements"] += 1
                totals["rows"] += rows
                totals["online"] += online
                due += interval
            ends.append(end_ns)

        await asyncio.gather(*(loop(k, c) for k, c in enumerate(self.connections)))
        return {**totals, "start_ns": start_ns, "end_ns": max(ends)}

    async def flood(self, sql: str, rows: int, duration: float) -> dict[str, Any]:
        users = [f"flood-{i}" for i in range(1000)]
        count = 0
        started = time.monotonic()
        stop = started + duration

        async def loop(k: int, connection: asyncpg.Connection) -> None:
            nonlocal count
            rng = random.Random(k)
            while time.monotonic() < stop:
                target: Any = rng.sample(users, rows) if rows > 1 else rng.choice(users)
                await connection.execute(sql, target, f"flood:{time.time_ns()}")
                count += rows

        await asyncio.gather(*(loop(k, c) for k, c in enumerate(self.connections)))
        return {"rows": count, "seconds": time.monotonic() - started}

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["cmd"]
        if command == "single":
            online: list[str] = request["online"]
            share = float(request.get("offline_share", 0.1))

            def pick_one(rng: random.Random) -> tuple[Any, int, int]:
                if rng.random() < share:
                    return f"offline-{rng.randrange(100_000)}", 1, 0
                return rng.choice(online), 1, 1

            return await self.paced(
                _sql(_ONE, request["table"]), request["rate"], request["duration"],
                request["tag"], pick_one, request.get("seed", 1),
            )  # fmt: skip
        if command == "batch":
            online = request["online"]
            rows = int(request["rows"])

            def pick_many(rng: random.Random) -> tuple[Any, int, int]:
                return rng.sample(online, rows), rows, rows

            return await self.paced(
                _sql(_MANY, request["table"]), request["rate"], request["duration"],
                request["tag"], pick_many, request.get("seed", 1),
            )  # fmt: skip
        if command == "flood":
            rows = int(request["rows"])
            sql = _sql(_MANY if rows > 1 else _ONE, request["table"])
            return await self.flood(sql, rows, request["duration"])
        if command == "ping":
            return {"connections": len(self.connections)}
        if command == "quit":
            return {"bye": True}
        raise ValueError(f"unknown command {command!r}")


async def _main(config: dict[str, Any]) -> None:
    settings = {"synchronous_commit": config.get("synchronous_commit", "on")}
    connections = await asyncio.gather(
        *(asyncpg.connect(config["dsn"], server_settings=settings) for _ in range(config["conns"]))
    )
    try:
        await serve_commands(Writers(list(connections)).handle)
    finally:
        await asyncio.gather(*(c.close(timeout=5) for c in connections), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(_main(json.loads(sys.argv[1])))
