"""
What the run asks of its client processes: open the sessions, wait until a
tag's messages have arrived, and collect their latencies.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .control import Child
from .progress import progress

__all__ = ["drain", "open_sessions", "take"]


async def open_sessions(
    clients: list[Child],
    users: list[str],
    *,
    concurrency: int = 50,
    sources: list[str] | None = None,
    timeout: float = 600.0,
    failures_allowed: float = 0.01,
) -> dict[str, Any]:
    """
    One session per user, spread over the client processes (``concurrency``
    handshakes at a time in each, from the ``sources`` addresses in turn
    when given); raises when more than ``failures_allowed`` of them failed
    to open.
    """
    k = len(clients)
    request: dict[str, Any] = {"cmd": "open", "concurrency": concurrency}
    if sources:
        request["sources"] = sources
    replies = await asyncio.gather(
        *(
            c.request({**request, "users": users[i::k]}, timeout=timeout)
            for i, c in enumerate(clients)
        )
    )
    result = {
        "opened": sum(r["opened"] for r in replies),
        "failed": sum(r["failed"] for r in replies),
        "seconds": max(r["seconds"] for r in replies),
        "errors": [e for r in replies for e in r["errors"]][:3],
        "failed_users": [u for r in replies for u in r.get("failed_users", [])],
    }
    if result["failed"]:
        progress(f"  {result['failed']} sessions failed to open, e.g. {result['errors'][:1]}")
    if result["failed"] > len(users) * failures_allowed:
        raise RuntimeError(
            f"{result['failed']} of {len(users)} sessions failed to open: {result['errors']}"
        )
    return result


async def drain(clients: list[Child], tag: str, expected: int, timeout: float) -> int:
    """
    Poll the clients until ``expected`` messages of ``tag`` arrived or the
    deadline passes; returns how many did.
    """
    deadline = time.monotonic() + timeout
    while True:
        replies = await asyncio.gather(
            *(c.request({"cmd": "count", "tags": [tag]}, timeout=30) for c in clients)
        )
        got = int(sum(r["counts"][tag] for r in replies))
        if got >= expected or time.monotonic() >= deadline:
            return got
        await asyncio.sleep(0.05)


async def take(clients: list[Child], tag: str) -> tuple[list[int], int, float]:
    """
    All latencies (µs) of ``tag``, the last receipt time, and the longest
    collector pause of any client since the previous take.
    """
    replies = await asyncio.gather(
        *(c.request({"cmd": "take", "tag": tag}, timeout=60) for c in clients)
    )
    latencies = [x for r in replies for x in r["latencies_us"]]
    return latencies, max(r["last_ns"] for r in replies), max(r["gc"]["max_ms"] for r in replies)
