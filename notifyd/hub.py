"""
The registry of live sessions, by user: who gets a row.

Pure bookkeeping: adding, removing and finding sessions never awaits and
never touches a connection, so delivery can route a whole batch without
yielding to the event loop. Only delivery's router changes it
(:mod:`notifyd.router`), which also closes the sessions it evicts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["Hub", "Member"]


class Member(Protocol):
    """
    What the registry needs of a session: whose it is.
    """

    @property
    def user(self) -> str: ...


S = TypeVar("S", bound=Member)


class Hub(Generic[S]):
    """
    Ss per user, oldest first, at most ``max_sessions_per_user`` each.
    """

    def __init__(self, max_sessions_per_user: int) -> None:
        self.max_sessions_per_user = max_sessions_per_user
        self._by_user: dict[str, list[S]] = {}
        self._count = 0
        # Ss ever unregistered (for the collector's schedule).
        self.closed_total = 0

    def add(self, session: S) -> list[S]:
        """
        Register a session. Returns the user's oldest sessions beyond the
        limit, which are unregistered: the caller closes them.
        """
        sessions = self._by_user.setdefault(session.user, [])
        sessions.append(session)
        self._count += 1
        evicted: list[S] = []
        while len(sessions) > self.max_sessions_per_user:
            evicted.append(sessions.pop(0))
            self._count -= 1
            self.closed_total += 1
        return evicted

    def discard(self, session: S) -> bool:
        """
        Unregister a session if it is registered; idempotent. Returns
        whether it was the user's last session here.
        """
        sessions = self._by_user.get(session.user)
        if sessions is None or session not in sessions:
            return False
        sessions.remove(session)
        self._count -= 1
        self.closed_total += 1
        if not sessions:
            del self._by_user[session.user]
            return True
        return False

    def users(self) -> Iterator[str]:
        """
        The users with at least one live session.
        """
        return iter(self._by_user)

    def sessions_of(self, user: str) -> list[S] | None:
        """
        The user's live sessions, or None when the user has none here.
        """
        return self._by_user.get(user)

    def __iter__(self) -> Iterator[S]:
        for sessions in self._by_user.values():
            yield from sessions

    @property
    def session_count(self) -> int:
        """
        Live sessions registered.
        """
        return self._count

    @property
    def user_count(self) -> int:
        """
        Distinct users with at least one live session.
        """
        return len(self._by_user)
