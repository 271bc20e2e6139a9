"""
The two servers the push-pipeline phases compare, started the same way:
notifyd (``python -m notifyd serve`` with the run's ``--notifyd-env``
settings) and the naive relay (``python -m bench.naive_server``), each with
receipt-taking client processes (``bench/receipts.py``) holding one session
per user; and what the phases ask of those clients.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any

from .control import Child
from .measure import wait_quiet
from .plan import TABLES
from .progress import progress
from .rig import Rig, start_server
from .sessions import drain, open_sessions

__all__ = ["KINDS", "Contender", "close_contender", "open_contender", "take_receipts"]

KINDS = ("notifyd", "naive")


@dataclass
class Contender:
    """
    One server with its client processes and the users they hold sessions for.
    """

    kind: str
    server: Child
    port: int
    clients: list[Child]
    users: list[str]

    @property
    def table(self) -> str:
        return TABLES[self.kind]


async def open_contender(rig: Rig, kind: str, users: list[str]) -> Contender:
    """
    Start ``kind`` (notifyd gets ``rig.notifyd_env``) and its client
    processes, open one session per user, wait until the server is idle.
    """
    server, port = await start_server(rig, kind)
    config = json.dumps({"kind": kind, "url": f"ws://127.0.0.1:{port}", "secret": rig.secret})
    clients = [
        await rig.spawn(
            f"{kind}-receipts-{k}", [sys.executable, "-m", "bench.receipts", config], control=True
        )
        for k in range(rig.plan.client_procs)
    ]
    contender = Contender(kind, server, port, clients, users)
    opened = await open_sessions(clients, users)
    await wait_quiet(server.pid)
    progress(f"  {kind}: {opened['opened']} sessions open in {opened['seconds']:.1f}s")
    return contender


async def close_contender(rig: Rig, contender: Contender) -> None:
    """
    Close the sessions, stop the clients and the server.
    """
    await asyncio.gather(
        *(c.request({"cmd": "close"}, timeout=120) for c in contender.clients if c.running),
        return_exceptions=True,
    )
    for client in contender.clients:
        await rig.retire(client)
    if contender.server in rig.children:
        await rig.retire(contender.server)


async def take_receipts(
    contender: Contender, tag: str, expected: int, timeout: float
) -> list[tuple[str, int]]:
    """
    Wait (at most ``timeout`` s) until ``expected`` messages of ``tag``
    arrived, then every (row id, receipt ns) of the tag.
    """
    await drain(contender.clients, tag, expected, timeout)
    replies: list[dict[str, Any]] = await asyncio.gather(
        *(c.request({"cmd": "receipts", "tag": tag}, timeout=60) for c in contender.clients)
    )
    return [(str(i), int(at)) for r in replies for i, at in r["receipts"]]
