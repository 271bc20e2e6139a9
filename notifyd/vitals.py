"""
One snapshot of how an instance is doing, for everything that reports it.

The daemon builds a :class:`Vitals` on demand from its parts; ``/healthz``,
``/readyz``, ``/metrics`` and systemd's status and watchdog all read that
snapshot, so none of them reaches into the daemon or its parts, and they
never disagree about what "ready" means.
"""

from __future__ import annotations

import asyncio
import gc
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["ListenerVitals", "Vitals", "WakeVitals", "heap_census", "task_census"]

# asyncio's default task names ("Task-123") say nothing of what a task does.
_UNNAMED = re.compile(r"Task-\d+")


def task_census(tasks: Iterable[asyncio.Task[Any]]) -> dict[str, int]:
    """
    How many tasks of each kind run, most numerous first: a task's kind is
    its name when it was given one, else its coroutine's qualified name
    (per-connection tasks then group together, and a long-lived task that
    appears shows up as its own line).
    """
    kinds: Counter[str] = Counter()
    for task in tasks:
        name = task.get_name()
        if _UNNAMED.fullmatch(name):
            coroutine = task.get_coro()
            name = getattr(coroutine, "__qualname__", type(coroutine).__name__)
        kinds[name] += 1
    return dict(sorted(kinds.items(), key=lambda kind: (-kind[1], kind[0])))


def heap_census() -> dict[str, int]:
    """
    What the interpreter holds, to tell live objects that accumulate from an
    allocator that keeps freed memory (RSS alone cannot): the memory blocks
    Python's object allocator has handed out and not had back, and the
    objects the collector keeps frozen (:mod:`notifyd.collector`), which
    include frozen reference cycles not yet collected.
    """
    return {"allocated_blocks": sys.getallocatedblocks(), "frozen_objects": gc.get_freeze_count()}


@dataclass(frozen=True, slots=True)
class ListenerVitals:
    """
    The LISTEN connection: whether it is up and when it last proved itself.
    """

    connected: bool
    probe_age_s: float | None
    probe_rtt_s: float | None
    reconnects: int


@dataclass(frozen=True, slots=True)
class WakeVitals:
    """
    How delivery learns of commits: the ``NOTIFYD_WAKE`` setting and the
    mode in force (``notify``, ``polling`` or ``draining``).
    """

    setting: str
    mode: str


@dataclass(frozen=True, slots=True)
class Vitals:
    """
    ``alive``: no background task died. ``ready``: alive, listening, and the
    last probe round trip recent enough that a NOTIFY would arrive now.
    """

    alive: bool
    ready: bool
    listener: ListenerVitals
    sessions: int
    users: int
    delivered: int
    # The loop's own load: what a soak watches for growth.
    tasks: int = 0
    loop_lag_s: float = 0.0
    wake: WakeVitals | None = None
    # Each one paused the loop (notifyd.collector).
    full_collections: int = 0

    def health_report(self) -> dict[str, Any]:
        """
        The JSON body of ``/healthz`` and ``/readyz``.
        """
        listener = self.listener
        return {
            "status": "ok" if self.ready else "unavailable",
            "alive": self.alive,
            "listener": {
                "connected": listener.connected,
                "probe_age_s": None
                if listener.probe_age_s is None
                else round(listener.probe_age_s, 3),
                "probe_rtt_ms": None
                if listener.probe_rtt_s is None
                else round(listener.probe_rtt_s * 1000, 3),
                "reconnects": listener.reconnects,
            },
            "sessions": self.sessions,
            "users": self.users,
            "delivered": self.delivered,
            "tasks": self.tasks,
            "loop_lag_ms": round(self.loop_lag_s * 1000, 3),
            "full_collections": self.full_collections,
            **(
                {"wake": {"setting": self.wake.setting, "mode": self.wake.mode}}
                if self.wake is not None
                else {}
            ),
        }

    def status_line(self) -> str:
        """
        systemd's ``STATUS=`` text: who is online, and whether LISTEN is up.
        """
        return (
            f"{self.sessions} sessions, {self.users} users online; "
            f"LISTEN {'up' if self.listener.connected else 'down'}"
        )
