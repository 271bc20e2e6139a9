"""
A client process: holds many WebSocket sessions to one server and notes, for
every message frame, when it arrived.

``python -m bench.clients '<config json>'`` with config
``{"kind": "notifyd"|"naive", "url": "ws://127.0.0.1:PORT", "secret": "..."}``.
Requests are JSON lines on stdin, one JSON reply line each on stdout:

* ``{"cmd": "open", "users": [...], "concurrency": 50, "timeout": 60,
  "sources": ["127.0.0.2", ...]}``: open one session per user (notifyd:
  ``?counts=inline&token=``, then wait for ``hello``; naive:
  ``/ws/message/{user}``), from the ``sources`` addresses in turn when given;
* ``{"cmd": "count", "tags": [...]}``: messages received per tag so far;
* ``{"cmd": "take", "tag": "..."}``: their latencies (µs) and last receipt
  time, forgotten afterwards;
* ``{"cmd": "hello_times", "user": "...", "n": 20}``: sequential
  connect (+ hello) times in ms;
* ``{"cmd": "close"}``, ``{"cmd": "quit"}`` (EOF on stdin also quits).

The held sessions are :class:`~bench.raw_session.RawSession`, not the
websockets library's client (``bench/raw_session.py`` says why); timed
session opens (``hello_times``) use websockets, as an application would.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect

from notifyd.auth import TokenVerifier
from notifyd.settings import Settings

from .control import run_command_process
from .raw_session import RawSession, Tally, open_raw

_OPEN_TIMEOUT = 60.0


class GcWatch:
    """
    Collector pauses of this process (the instrument must not stall).
    """

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif info.get("generation") == 2 or time.perf_counter() - self._started > 0.005:
            self.pauses_ms.append((time.perf_counter() - self._started) * 1000)

    def take(self) -> dict[str, float]:
        pauses, self.pauses_ms = self.pauses_ms, []
        return {"count": len(pauses), "max_ms": max(pauses, default=0.0), "total_ms": sum(pauses)}


class Clients:
    """
    The sessions of this process.
    """

    def __init__(self, kind: str, url: str, secret: str) -> None:
        self.kind = kind
        self.url = url
        self.verifier = (
            TokenVerifier.from_settings(Settings(jwt_secret=secret)) if kind == "notifyd" else None
        )
        self.tally = Tally()
        self.gc = GcWatch()
        self.sessions: list[RawSession] = []

    def url_for(self, user: str) -> str:
        if self.verifier is not None:
            return (
                f"{self.url}/ws/message?counts=inline&token={self.verifier.mint(user, ttl_s=86400)}"
            )
        return f"{self.url}/ws/message/{quote(user, safe='')}"

    async def _connect(self, user: str, timeout: float) -> ClientConnection:
        """
        One session, ready for live messages (notifyd: after its hello).
        """
        ws = await connect(
            self.url_for(user),
            compression=None,
            open_timeout=timeout,
            ping_interval=None,  # the server pings
            close_timeout=5,
            max_size=1 << 20,
        )
        if self.kind == "notifyd":
            try:
                async with asyncio.timeout(timeout):
                    first = await ws.recv()
            except BaseException:
                await ws.close()
                raise
            if not isinstance(first, str) or '"event":"hello"' not in first:
                await ws.close()
                raise RuntimeError(f"first frame is not hello: {first[:100]!r}")
        return ws

    async def open(
        self, users: list[str], concurrency: int, timeout: float, sources: list[str] | None = None
    ) -> dict[str, Any]:
        semaphore = asyncio.Semaphore(concurrency)
        errors: list[str] = []
        failed: list[str] = []
        started = time.perf_counter()

        async def one(index: int, user: str) -> None:
            source = sources[index % len(sources)] if sources else None
            async with semaphore:
                try:
                    session = await open_raw(
                        self.url_for(user),
                        self.tally.record_bytes,
                        self.kind == "notifyd",
                        timeout,
                        source,
                    )
                except Exception as exc:
                    errors.append(f"{user}: {exc!r}")
                    failed.append(user)
                    return
            self.sessions.append(session)

        await asyncio.gather(*(one(i, user) for i, user in enumerate(users)))
        # The sessions live until the end: keep the collector from walking
        # them again and again (the instrument must not stall).
        gc.collect()
        gc.freeze()
        return {
            "opened": len(users) - len(errors),
            "failed": len(errors),
            "errors": errors[:3],
            "failed_users": failed,
            "seconds": time.perf_counter() - started,
        }

    async def hello_times(self, user: str, n: int, timeout: float) -> dict[str, Any]:
        times: list[float] = []
        for _ in range(n):
            started = time.perf_counter()
            ws = await self._connect(user, timeout)
            times.append((time.perf_counter() - started) * 1000)
            await ws.close()
        return {"ms": times}

    async def close(self) -> dict[str, Any]:
        sessions, self.sessions = self.sessions, []
        semaphore = asyncio.Semaphore(200)

        async def one(session: RawSession) -> None:
            async with semaphore:
                await session.close()

        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)
        except TimeoutError:
            for session in sessions:
                if session.transport is not None:
                    session.transport.abort()
        return {"closed": len(sessions)}

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["cmd"]
        if command == "open":
            return await self.open(
                request["users"],
                request.get("concurrency", 50),
                request.get("timeout", _OPEN_TIMEOUT),
                request.get("sources"),
            )
        if command == "count":
            return {
                "counts": {tag: len(self.tally.latencies.get(tag, ())) for tag in request["tags"]}
            }
        if command == "take":
            tag = request["tag"]
            return {
                "latencies_us": self.tally.latencies.pop(tag, []),
                "last_ns": self.tally.last_ns.pop(tag, 0),
                "gc": self.gc.take(),
            }
        if command == "hello_times":
            return await self.hello_times(
                request["user"], request["n"], request.get("timeout", _OPEN_TIMEOUT)
            )
        if command == "close":
            return await self.close()
        if command == "quit":
            return {"bye": True}
        raise ValueError(f"unknown command {command!r}")


if __name__ == "__main__":
    run_command_process(
        lambda config: Clients(config["kind"], config["url"], config.get("secret", ""))
    )
