"""
A soak client process: holds sessions that resume from their last cursor
whenever they reconnect, and counts every message id each one received.

``python -m bench.soak.clients '<config json>'`` with config
``{"url": "ws://127.0.0.1:PORT", "secret": "...", "users": [...]}``.
Requests are JSON lines on stdin (``bench/control.py``), one reply each:

* ``{"cmd": "open"}``: connect every session; answered once all have their
  ``hello`` (or failed to);
* ``{"cmd": "reconnect", "n": 25, "seed": 1}``: close ``n`` random live
  sessions; each reconnects at once with ``since`` = its last cursor;
* ``{"cmd": "stats"}``: live sessions, unique messages, duplicates,
  resyncs, replays not proven (``recovered: false``), reconnects;
* ``{"cmd": "counts"}``: unique message ids received per user;
* ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from notifyd.auth import TokenVerifier
from notifyd.settings import Settings

from ..control import run_command_process

_TOKEN_TTL_S = 7 * 86400


class Held:
    """
    One user's session across its reconnections.
    """

    def __init__(self, user: str, token: str) -> None:
        self.user = user
        self.token = token
        self.cursor: str | None = None
        self.seen: set[str] = set()
        self.duplicates = 0
        self.resyncs = 0
        self.unrecovered = 0
        self.connects = 0
        self.asked_to_reconnect = False
        self.ws: ClientConnection | None = None
        self.live = asyncio.Event()

    def url(self, base: str) -> str:
        url = f"{base}/ws/message?token={self.token}"
        if self.cursor is not None:
            url += f"&since={quote(self.cursor, safe='')}"
        return url

    def take(self, frame: dict[str, Any]) -> None:
        event = frame.get("event")
        if event == "message":
            if frame["id"] in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(frame["id"])
        elif event == "resync":
            self.resyncs += 1
        elif event == "hello":
            if self.connects > 1 and frame.get("recovered") is False:
                self.unrecovered += 1
            self.live.set()
        if event in ("hello", "message", "resync") and "cursor" in frame:
            self.cursor = frame["cursor"]

    async def hold(self, base: str, stopping: asyncio.Event) -> None:
        """
        Stay connected until ``stopping``: reconnect (and resume) after any
        close, at once when this side closed, after a short random delay
        when the server did or the connection failed.
        """
        while not stopping.is_set():
            self.asked_to_reconnect = False
            try:
                async with connect(
                    self.url(base),
                    open_timeout=60,
                    ping_interval=None,  # the server pings
                    close_timeout=5,
                    max_size=1 << 22,
                    compression=None,
                ) as ws:
                    self.ws = ws
                    self.connects += 1
                    async for raw in ws:
                        self.take(json.loads(raw))
            except (OSError, TimeoutError, WebSocketException):
                pass
            finally:
                self.ws = None
                self.live.clear()
            if not self.asked_to_reconnect and not stopping.is_set():
                await asyncio.sleep(random.uniform(0.2, 1.0))


class SoakClients:
    def __init__(self, url: str, secret: str, users: list[str]) -> None:
        verifier = TokenVerifier.from_settings(Settings(jwt_secret=secret))
        self.url = url
        self.held = [Held(user, verifier.mint(user, ttl_s=_TOKEN_TTL_S)) for user in users]
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.reconnects_asked = 0
        self._closes: set[asyncio.Task[None]] = set()

    def _closing(self, ws: ClientConnection) -> None:
        # The closing handshake runs beside the session's own task, which
        # sees the end of its frames and reconnects (or stops).
        task = asyncio.create_task(ws.close())
        self._closes.add(task)
        task.add_done_callback(self._closes.discard)

    async def open(self) -> dict[str, Any]:
        gate = asyncio.Semaphore(100)

        async def start(held: Held) -> None:
            async with gate:
                self.tasks.append(asyncio.create_task(held.hold(self.url, self.stopping)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(held.live.wait(), 60)

        await asyncio.gather(*(start(h) for h in self.held))
        return {"live": sum(h.live.is_set() for h in self.held)}

    async def reconnect(self, n: int, seed: int) -> dict[str, Any]:
        live = [h for h in self.held if h.ws is not None and h.live.is_set()]
        chosen = random.Random(seed).sample(live, min(n, len(live)))
        for held in chosen:
            assert held.ws is not None
            held.asked_to_reconnect = True
            self._closing(held.ws)
        self.reconnects_asked += len(chosen)
        return {"closed": len(chosen)}

    def stats(self) -> dict[str, Any]:
        return {
            "live": sum(h.live.is_set() for h in self.held),
            "unique": sum(len(h.seen) for h in self.held),
            "duplicates": sum(h.duplicates for h in self.held),
            "resyncs": sum(h.resyncs for h in self.held),
            "unrecovered": sum(h.unrecovered for h in self.held),
            "connects": sum(h.connects for h in self.held),
            "reconnects_asked": self.reconnects_asked,
        }

    async def close(self) -> None:
        self.stopping.set()
        for held in self.held:
            if held.ws is not None:
                self._closing(held.ws)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.gather(*self.tasks, return_exceptions=True)
        for task in self.tasks:
            task.cancel()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["cmd"]
        if command == "open":
            return await self.open()
        if command == "reconnect":
            return await self.reconnect(request["n"], request.get("seed", 0))
        if command == "stats":
            return self.stats()
        if command == "counts":
            return {"counts": {h.user: len(h.seen) for h in self.held}}
        if command == "quit":
            return {"bye": True}
        raise ValueError(f"unknown command {command!r}")


if __name__ == "__main__":
    run_command_process(
        lambda config: SoakClients(config["url"], config["secret"], config["users"])
    )
