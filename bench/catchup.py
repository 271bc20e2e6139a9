"""
Catch-up through notifyd's resume path, as a client that was offline does
it: a cursor taken from a ``hello`` before the writes, then one session per
user with ``?since=<cursor>``, reading its ``hello`` (``recovered``, the
unread count) and the replayed messages. What each user got, by row id.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import connect

from notifyd.auth import TokenVerifier
from notifyd.settings import Settings

__all__ = ["Catchup", "cursor_now"]


class Catchup:
    """
    Sessions to one notifyd, authenticated with tokens signed by ``secret``.
    """

    def __init__(self, port: int, secret: str) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws/message"
        self.verifier = TokenVerifier.from_settings(Settings(jwt_secret=secret))

    def _url(self, user: str, since: str | None) -> str:
        url = f"{self.url}?token={self.verifier.mint(user, ttl_s=3600)}"
        return url + (f"&since={quote(since, safe='')}" if since is not None else "")

    async def cursor(self, user: str = "bench-cursor") -> str:
        """
        The cursor of a fresh session's ``hello``: "now".
        """
        async with connect(self._url(user, None), compression=None, open_timeout=30) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
        return str(hello["cursor"])

    async def replay(self, user: str, since: str, expected: int, timeout: float) -> dict[str, Any]:
        """
        One session of ``user`` resuming from ``since``: its hello's
        ``recovered`` and ``unread``, and the ids of the messages replayed,
        read until ``expected`` arrived or ``timeout`` passed.
        """
        ids: list[str] = []
        async with connect(
            self._url(user, since), compression=None, open_timeout=timeout, max_size=1 << 22
        ) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            resynced = False
            try:
                async with asyncio.timeout(timeout):
                    while len(ids) < expected:
                        frame = json.loads(await ws.recv())
                        if frame.get("event") == "message":
                            ids.append(str(frame["id"]))
                        elif frame.get("event") == "resync":
                            resynced = True
                            break
            except TimeoutError:
                pass
        return {
            "recovered": hello.get("recovered"),
            "unread": hello.get("unread"),
            "ids": ids,
            "resync": resynced,
        }

    async def replay_all(
        self, expected: dict[str, list[str]], since: str, timeout: float, concurrency: int = 20
    ) -> dict[str, Any]:
        """
        Every user of ``expected`` (user -> the ids the table holds for
        them) resumed from ``since``: rows replayed, missing, received twice
        or not in the table; users not ``recovered``, resynced; the sum of
        their hellos' unread counts.
        """
        semaphore = asyncio.Semaphore(concurrency)

        async def one(user: str) -> dict[str, Any]:
            async with semaphore:
                return await self.replay(user, since, len(expected[user]), timeout)

        users = sorted(expected)
        results = await asyncio.gather(*(one(u) for u in users))
        rows = replayed = missing = twice = unknown = 0
        unread = 0
        not_recovered = resynced = 0
        for user, got in zip(users, results, strict=True):
            want = set(expected[user])
            rows += len(want)
            replayed += len(got["ids"])
            missing += len(want - set(got["ids"]))
            twice += len(got["ids"]) - len(set(got["ids"]))
            unknown += len(set(got["ids"]) - want)
            unread += int(got["unread"] or 0)
            not_recovered += got["recovered"] is not True
            resynced += bool(got["resync"])
        return {
            "users": len(users),
            "rows": rows,
            "replayed": replayed,
            "missing": missing,
            "twice": twice,
            "not_in_table": unknown,
            "hello_unread": unread,
            "not_recovered": not_recovered,
            "resynced": resynced,
        }


async def cursor_now(port: int, secret: str) -> str:
    """
    A cursor for "now" from the notifyd on ``port``.
    """
    return await Catchup(port, secret).cursor()
