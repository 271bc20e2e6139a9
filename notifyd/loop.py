"""
Which asyncio event loop the CLI runs on.

uvloop (an optional dependency, ``notifyd[fast]``) implements the loop and
its transports in C: every wake-up, socket write and timer costs less.
notifyd already avoids a task or a wake-up per message, so the gain is
small next to the socket writes themselves; ``python -m bench --notifyd-env
NOTIFYD_EVENT_LOOP=asyncio`` measures the standard loop for comparison.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .exceptions import ConfigError

__all__ = ["loop_factory"]


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """
    The event loop factory for ``NOTIFYD_EVENT_LOOP`` (``auto``, ``asyncio``
    or ``uvloop``); None means asyncio's default loop.

    Raises :class:`ConfigError` when ``uvloop`` is asked for and missing.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "NOTIFYD_EVENT_LOOP=uvloop, but uvloop is not installed "
                "(pip install 'notifyd[fast]')"
            ) from None
        return None
    return uvloop.new_event_loop
