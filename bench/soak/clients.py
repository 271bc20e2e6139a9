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
  resyncs, replays not proven (``recovered: false``), reconnects,
  handshakes the server shed, seconds waited before attempts;
* ``{"cmd": "counts"}``: unique message ids received per user;
* ``{"cmd": "quit"}``.

A session that the server closed or refused comes back when notifyd.js
would (:class:`Comeback`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from typing import Any
from urllib.parse import quote

from notifyd.auth import TokenVerifier
from notifyd.backoff import backoff_delay
from notifyd.settings import Settings

from ..control import run_command_process
from ..raw_session import RawSession, Refused, open_raw

_TOKEN_TTL_S = 7 * 86400

# When to come back, as notifyd.js does (its DEFAULTS): a browser's session
# is what a restart storm consists of.
_INITIAL_DELAY_S = 0.5
_MAX_DELAY_S = 30.0
_RESTART_DELAY_S = 2.0
_STABLE_AFTER_S = 10.0
_RESTART_RETRY_S = 1.0
_RESTART_RETRY_FOR_S = 60.0
_SERVICE_RESTART = 1012
_TRY_AGAIN_LATER = 1013
_RETRY_MS = re.compile(r"retry_ms=(\d+)")


class Comeback:
    """
    How long a session waits before its next attempt, as notifyd.js decides:
    a server restart (1012) spreads the returns over ``_RESTART_DELAY_S``,
    and for ``_RESTART_RETRY_FOR_S`` after it an attempt that nothing
    accepted yet is retried after about ``_RESTART_RETRY_S`` (jittered by
    half either way) instead of the growing backoff; a shed handshake (503
    with Retry-After, 1013 with ``retry_ms``) waits the server's hint plus
    the backoff; any other failure waits the backoff (exponential, full
    jitter), which starts over once a session stayed up ``_STABLE_AFTER_S``.
    """

    def __init__(self) -> None:
        self.attempt = 0
        self.opened_at: float | None = None
        self.restarted_at: float | None = None

    def opened(self, now: float) -> None:
        self.opened_at = now
        self.restarted_at = None

    def after_close(self, code: int | None, reason: str, now: float) -> float:
        if code == _SERVICE_RESTART:
            self.attempt = 0
            self.opened_at = None
            self.restarted_at = now
            return random.uniform(0, _RESTART_DELAY_S)
        if code == _TRY_AGAIN_LATER:
            hint = _RETRY_MS.search(reason)
            return (int(hint.group(1)) / 1000 if hint else 0.0) + self._backoff(now)
        return self._backoff(now)

    def after_unreachable(self, now: float) -> float:
        """
        The wait after an attempt that ended before the upgrade with no
        answer from the server (connection refused or reset, a timeout).
        """
        # While a restarted server's successor is not listening yet, a
        # refused attempt costs next to nothing: a growing backoff would only
        # bring the sessions back long after it listens.
        if self.restarted_at is not None and now - self.restarted_at < _RESTART_RETRY_FOR_S:
            return _RESTART_RETRY_S * random.uniform(0.5, 1.5)
        return self._backoff(now)

    def after_refusal(self, status: int, retry_after: str | None, now: float) -> float:
        hint = float(retry_after) if status == 503 and retry_after and retry_after.isdigit() else 0
        return hint + self._backoff(now)

    def _backoff(self, now: float) -> float:
        if self.opened_at is not None and now - self.opened_at >= _STABLE_AFTER_S:
            self.attempt = 0
        self.opened_at = None
        self.attempt += 1
        return backoff_delay(self.attempt, initial=_INITIAL_DELAY_S, maximum=_MAX_DELAY_S)


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
        self.ws: RawSession | None = None
        self.live = asyncio.Event()
        self.comeback = Comeback()
        # Handshakes the server shed (503 or 1013), and the seconds waited
        # before attempts in all.
        self.shed = 0
        self.waited_s = 0.0

    def url(self, base: str) -> str:
        url = f"{base}/ws/message?token={self.token}"
        if self.cursor is not None:
            url += f"&since={quote(self.cursor, safe='')}"
        return url

    def take_bytes(self, payload: bytes, _now_ns: int) -> None:
        self.take(json.loads(payload))

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
            self.connects += 1
            if self.connects > 1 and frame.get("recovered") is False:
                self.unrecovered += 1
            self.comeback.opened(time.monotonic())
            self.live.set()
        if event in ("hello", "message", "resync") and "cursor" in frame:
            self.cursor = frame["cursor"]

    async def hold(self, base: str, stopping: asyncio.Event) -> None:
        """
        Stay connected until ``stopping``: reconnect (and resume) after any
        close, at once when this side closed, otherwise after the wait
        notifyd.js would make (:class:`Comeback`).

        The sessions are :class:`~bench.raw_session.RawSession`, which cost
        the client processes a fraction of the websockets library's client:
        they share the machine's cores with the server they measure.
        """
        while not stopping.is_set():
            self.asked_to_reconnect = False
            code: int | None = None
            reason = ""
            wait: float | None = None
            try:
                ws = await open_raw(self.url(base), self.take_bytes, True, timeout=60)
            except Refused as exc:
                if exc.status is not None:
                    self.shed += exc.status == 503
                    wait = self.comeback.after_refusal(
                        exc.status, exc.retry_after, time.monotonic()
                    )
                code, reason = exc.close_code, exc.close_reason
            except (OSError, TimeoutError, RuntimeError):
                wait = self.comeback.after_unreachable(time.monotonic())
            else:
                self.ws = ws
                await ws.closed
                code, reason = ws.close_code, ws.close_reason
            finally:
                self.ws = None
                self.live.clear()
            if self.asked_to_reconnect or stopping.is_set():
                continue
            if wait is None:
                self.shed += code == _TRY_AGAIN_LATER
                wait = self.comeback.after_close(code, reason, time.monotonic())
            self.waited_s += wait
            await asyncio.sleep(wait)


class SoakClients:
    def __init__(self, url: str, secret: str, users: list[str]) -> None:
        verifier = TokenVerifier.from_settings(Settings(jwt_secret=secret))
        self.url = url
        self.held = [Held(user, verifier.mint(user, ttl_s=_TOKEN_TTL_S)) for user in users]
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.reconnects_asked = 0
        self._closes: set[asyncio.Task[None]] = set()

    def _closing(self, ws: RawSession) -> None:
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
            "shed": sum(h.shed for h in self.held),
            "waited_s": round(sum(h.waited_s for h in self.held), 1),
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
