"""
Unread counts of the users with live sessions, by category, kept exact
without a query per message.

Pure bookkeeping. A message's category is its ``type`` (a NULL type counts
under ``""``); a user's counts are a mapping from category to unread count,
with categories at zero left out, and their total is the bell's number.
Each user's counts are taken from Postgres when their first session joins
(in the same snapshot as their replay) and when a window carries a read or
delete event of theirs (recounted at the window's end snapshot); between
those, a window's new unread rows and announcements are added to them.
:meth:`UnreadLedger.settle` applies one window and says whose counts
changed, so that exactly those users are sent an ``unread`` event.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence

__all__ = ["ByType", "UnreadLedger", "total"]

# category -> unread count, zero counts left out.
ByType = dict[str, int]


def total(by_type: Mapping[str, int]) -> int:
    """
    The unread total of a user's counts by category.
    """
    return sum(by_type.values())


class UnreadLedger:
    """
    user -> unread counts by category, for users with a live session here.
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, ByType] = {}

    def __contains__(self, user: object) -> bool:
        return user in self._counts

    def __len__(self) -> int:
        return len(self._counts)

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def get(self, user: str) -> ByType | None:
        """
        The user's counts, or None when they have no live session here.
        """
        return self._counts.get(user)

    def set(self, user: str, by_type: Mapping[str, int]) -> None:
        """
        The exact counts of a user whose session just joined.
        """
        self._counts[user] = _positive(by_type)

    def after_adding(self, user: str, adds: Mapping[str, int]) -> ByType | None:
        """
        The counts ``user`` will have once a window that only adds
        ``adds`` (new unread rows by category) is settled, as
        :meth:`settle` will make them; the ledger is left as it is. None
        when the user has no counts here.
        """
        old = self._counts.get(user)
        if old is None:
            return None
        # Both hold positive counts only, so their sum needs no _positive.
        after = dict(old)
        for category, n in adds.items():
            after[category] = after.get(category, 0) + n
        return after

    def forget(self, user: str) -> None:
        """
        The user's last session left.
        """
        self._counts.pop(user, None)

    def settle(
        self,
        *,
        recounted: Mapping[str, Mapping[str, int]],
        new_unread: Mapping[str, Mapping[str, int]],
        announcements: Sequence[str],
        deleted_announcements: Sequence[tuple[str, Collection[str]]],
    ) -> list[tuple[str, ByType]]:
        """
        Apply one window; return ``(user, counts)`` for each user whose
        counts changed, with the new counts (the ledger's own mapping: read
        it before the next settle).

        ``recounted``: exact counts at the window's end (they win);
        ``new_unread``: the window's unread rows per user and category;
        ``announcements``: the category of each announcement it inserted
        (every user gets them); ``deleted_announcements``: for each
        announcement it deleted that an earlier window had counted, its
        category and the users who had already read it (for whom it was not
        counted).
        """
        counts = self._counts
        everyone = announcements or deleted_announcements
        users: Collection[str] = (
            list(counts)
            if everyone
            else [user for user in {*recounted, *new_unread} if user in counts]
        )
        changed: list[tuple[str, ByType]] = []
        # Run once per user (per user online, after an announcement): no
        # lookups in the loop that can be hoisted.
        exact, added = recounted.get, new_unread.get
        for user in users:
            old = counts[user]
            fresh = exact(user)
            if fresh is not None:
                new = _positive(fresh)
            elif not deleted_announcements:
                # Only additions (the common case, once per new message):
                # the counts grow in place, and any addition is a change.
                adds = added(user)
                if not adds and not announcements:
                    continue
                if adds:
                    for category, n in adds.items():
                        old[category] = old.get(category, 0) + n
                for category in announcements:
                    old[category] = old.get(category, 0) + 1
                changed.append((user, old))
                continue
            else:
                new = dict(old)
                for category, n in (added(user) or {}).items():
                    new[category] = new.get(category, 0) + n
                for category in announcements:
                    new[category] = new.get(category, 0) + 1
                for category, readers in deleted_announcements:
                    if user not in readers:
                        new[category] = new.get(category, 0) - 1
                new = _positive(new)
            if new != old:
                counts[user] = new
                changed.append((user, new))
        return changed


def _positive(by_type: Mapping[str, int]) -> ByType:
    """
    The counts with categories at zero left out (and never below zero: an
    event recorded before categories were kept cannot make one negative).
    """
    return {category: n for category, n in by_type.items() if n > 0}
