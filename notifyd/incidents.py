"""
What hostile or broken clients trip: rejected authentications and limits
that said no, counted for ``/metrics`` and logged without flooding the log.

One place for both, so every part that refuses a client (the handshake, the
session's first frame, the actions) counts and logs it the same way.
"""

from __future__ import annotations

import logging
import math
import time

from websockets.asyncio.server import ServerConnection

from .stats import Stats

__all__ = ["Incidents", "peer_address", "tcp_peer_address"]

logger = logging.getLogger(__name__)

# A limit that keeps tripping (a flood) is logged at most this often.
_TRIP_LOG_INTERVAL_S = 10.0


class Incidents:
    """
    Counts into :class:`Stats`; logs each limit at most once per interval.
    """

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._trip_logged: dict[str, float] = {}

    def auth_failed(self, connection: object, reason: str) -> None:
        """
        Count and log a rejected authentication; never the token itself.
        ``connection`` gives the log line its peer address.
        """
        self._stats.auth_failures[reason] += 1
        logger.info("auth failed: reason=%s", reason, extra={"websocket": connection})

    def limit_tripped(self, limit: str, address: str) -> None:
        """
        Count a limit that said no; log it, at most once per interval per
        limit, so a flood cannot flood the log too.
        """
        trips = self._stats.limit_trips
        trips[limit] += 1
        now = time.monotonic()
        if now - self._trip_logged.get(limit, -math.inf) >= _TRIP_LOG_INTERVAL_S:
            self._trip_logged[limit] = now
            logger.warning(
                "limit %s reached: remote=%s (%d times so far)", limit, address, trips[limit]
            )


def peer_address(connection: ServerConnection) -> str:
    """
    The client's IP address as text: the one a trusted proxy forwarded
    (:class:`notifyd.handshake.PeerConnection`), else the TCP peer's, or
    ``?`` when the socket has none.
    """
    forwarded: str | None = getattr(connection, "forwarded_client", None)
    return tcp_peer_address(connection) if forwarded is None else forwarded


def tcp_peer_address(connection: ServerConnection) -> str:
    """
    The TCP peer's IP address as text (a proxy's, behind one), or ``?``
    when the socket has none.
    """
    try:
        return str(connection.remote_address[0])
    except (TypeError, IndexError):
        return "?"
