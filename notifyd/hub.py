"""
The registry of live sessions, by user: who gets a row.

Pure bookkeeping: adding, removing and finding sessions never awaits, so
delivery can route a whole batch without yielding to the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator

from .protocol import CloseCode
from .session import Session

__all__ = ["Hub"]


class Hub:
    """
    Sessions per user, oldest first, at most ``max_sessions_per_user`` each.
    """

    def __init__(self, max_sessions_per_user: int) -> None:
        self.max_sessions_per_user = max_sessions_per_user
        self._by_user: dict[str, list[Session]] = {}
        self._count = 0
        # Sessions closed because their user went over the limit.
        self.replaced = 0
        # Sessions ever unregistered (for the collector's schedule).
        self.closed_total = 0
        # Unread count of each user with live sessions, kept by delivery.
        self.unread: dict[str, int] = {}

    def add(self, session: Session) -> None:
        """
        Register a session; the user's oldest ones beyond the limit are
        closed with 4409 (replaced) and unregistered.
        """
        sessions = self._by_user.setdefault(session.user, [])
        sessions.append(session)
        self._count += 1
        while len(sessions) > self.max_sessions_per_user:
            oldest = sessions.pop(0)
            self._count -= 1
            self.replaced += 1
            self.closed_total += 1
            oldest.close(CloseCode.REPLACED)

    def discard(self, session: Session) -> None:
        """
        Unregister a session if it is registered; idempotent.
        """
        sessions = self._by_user.get(session.user)
        if sessions is None or session not in sessions:
            return
        sessions.remove(session)
        self._count -= 1
        self.closed_total += 1
        if not sessions:
            del self._by_user[session.user]
            self.unread.pop(session.user, None)

    def sessions_of(self, user: str) -> list[Session] | None:
        """
        The user's live sessions, or None when the user has none here.
        """
        return self._by_user.get(user)

    def __iter__(self) -> Iterator[Session]:
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
