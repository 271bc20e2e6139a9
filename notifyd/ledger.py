"""
Unread counts of the users with live sessions, kept exact without a query
per message.

Pure bookkeeping. Each user's count is taken from Postgres when their first
session joins (in the same snapshot as their replay) and when a window
carries a read or delete event of theirs (recounted at the window's end
snapshot); between those, a window's new unread rows and announcements are
added to it. :meth:`UnreadLedger.settle` applies one window and says whose
count changed, so that exactly those users are sent an ``unread`` event.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence

__all__ = ["UnreadLedger"]


class UnreadLedger:
    """
    user -> unread count, for users with at least one live session here.
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __contains__(self, user: object) -> bool:
        return user in self._counts

    def __len__(self) -> int:
        return len(self._counts)

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def get(self, user: str) -> int | None:
        """
        The user's count, or None when they have no live session here.
        """
        return self._counts.get(user)

    def set(self, user: str, count: int) -> None:
        """
        The exact count of a user whose session just joined.
        """
        self._counts[user] = count

    def forget(self, user: str) -> None:
        """
        The user's last session left.
        """
        self._counts.pop(user, None)

    def settle(
        self,
        *,
        recounted: Mapping[str, int],
        new_unread: Mapping[str, int],
        announcements: int,
        deleted_announcements: Sequence[Collection[str]],
    ) -> list[tuple[str, int]]:
        """
        Apply one window; return ``(user, count)`` for each user whose count
        changed, with the new count.

        ``recounted``: exact counts at the window's end (they win);
        ``new_unread``: the window's unread rows per user; ``announcements``:
        how many announcements it inserted (every user gets them);
        ``deleted_announcements``: for each announcement it deleted that an
        earlier window had counted, the users who had already read it (for
        whom it was not counted).
        """
        counts = self._counts
        everyone = announcements or deleted_announcements
        users: Collection[str] = (
            list(counts)
            if everyone
            else [user for user in {*recounted, *new_unread} if user in counts]
        )
        changed: list[tuple[str, int]] = []
        # Run once per user (per user online, after an announcement): no
        # lookups in the loop that can be hoisted.
        exact, added = recounted.get, new_unread.get
        for user in users:
            old = counts[user]
            new = exact(user)
            if new is None:
                new = old + added(user, 0) + announcements
                if deleted_announcements:
                    new -= sum(1 for readers in deleted_announcements if user not in readers)
            if new != old:
                counts[user] = new
                changed.append((user, new))
        return changed
