"""
The sd_notify protocol: readiness, watchdog and status for ``Type=notify``.

Without ``NOTIFY_SOCKET`` (not started by systemd) every call is a no-op.
The watchdog is only fed while the LISTEN path proves itself: a daemon whose
listener is wedged stops sending ``WATCHDOG=1`` and systemd restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

from .vitals import Vitals

__all__ = ["SystemdNotifier", "supervise", "watchdog_interval"]

logger = logging.getLogger(__name__)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds between ``WATCHDOG=1`` messages (half of ``WATCHDOG_USEC``), or
    None when systemd asked for no watchdog or asked another process.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    target = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if target and target != str(pid):
        return None
    return int(usec) / 2 / 1_000_000


class SystemdNotifier:
    """
    Sends sd_notify datagrams to ``NOTIFY_SOCKET``. Never raises.
    """

    def __init__(self, address: str | None) -> None:
        self._address: str | None = None
        self._socket: socket.socket | None = None
        if address:
            # A leading "@" names a socket in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A receiver that does not read (its queue holds ten datagrams)
            # must cost a dropped message, never a stopped event loop.
            self._socket.setblocking(False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SystemdNotifier:
        """
        The notifier systemd asked for, or a disabled one.
        """
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """
        Whether there is a socket to notify.
        """
        return self._socket is not None

    def notify(self, *fields: str) -> None:
        """
        Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram.
        """
        if self._socket is None or self._address is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            logger.warning("sd_notify failed: %s", exc)

    def close(self) -> None:
        """
        Release the socket; idempotent.
        """
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def supervise(
    vitals: Callable[[], Vitals],
    notifier: SystemdNotifier,
    proven: asyncio.Event,
    *,
    status_every: float = 5.0,
) -> None:
    """
    Tell systemd the instance is ready once its LISTEN path is ``proven``,
    then feed the watchdog while it stays ready (probes keep succeeding)
    and refresh the status.

    Runs until cancelled.
    """
    await proven.wait()
    notifier.notify("READY=1", f"STATUS={vitals().status_line()}")
    interval = watchdog_interval(os.environ, os.getpid())
    tick = min(interval, status_every) if interval is not None else status_every
    last_status = 0.0
    loop = asyncio.get_running_loop()
    while True:
        now = vitals()
        fields = []
        if interval is not None and now.ready:
            fields.append("WATCHDOG=1")
        if loop.time() - last_status >= status_every:
            fields.append(f"STATUS={now.status_line()}")
            last_status = loop.time()
        if fields:
            notifier.notify(*fields)
        await asyncio.sleep(tick)
