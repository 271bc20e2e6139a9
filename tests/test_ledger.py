"""
Unit tests for :mod:`notifyd.ledger`: unread counts kept exact from one
window to the next without a count query per message.
"""

from __future__ import annotations

from notifyd.ledger import UnreadLedger


def ledger(**counts: int) -> UnreadLedger:
    result = UnreadLedger()
    for user, count in counts.items():
        result.set(user, count)
    return result


def test_new_unread_rows_are_added_to_the_users_count() -> None:
    """A window's unread rows raise exactly their users' counts, and only theirs change."""
    counts = ledger(alice=2, bob=5)
    changed = counts.settle(
        recounted={}, new_unread={"alice": 3}, announcements=0, deleted_announcements=[]
    )
    assert changed == [("alice", 5)]
    assert counts.get("alice") == 5
    assert counts.get("bob") == 5


def test_a_recount_wins_over_what_the_window_added() -> None:
    """A user with a read event is recounted at the window's end; the recount is the count."""
    counts = ledger(alice=4)
    changed = counts.settle(
        recounted={"alice": 1}, new_unread={"alice": 2}, announcements=0, deleted_announcements=[]
    )
    assert changed == [("alice", 1)]


def test_an_unchanged_count_is_not_reported() -> None:
    """A recount equal to the count sends no unread event."""
    counts = ledger(alice=4)
    assert (
        counts.settle(
            recounted={"alice": 4}, new_unread={}, announcements=0, deleted_announcements=[]
        )
        == []
    )


def test_users_without_a_live_session_are_not_counted() -> None:
    """Counts of users who are not online here are neither kept nor reported."""
    counts = ledger(alice=0)
    changed = counts.settle(
        recounted={"carol": 9}, new_unread={"bob": 1}, announcements=0, deleted_announcements=[]
    )
    assert changed == []
    assert "bob" not in counts and "carol" not in counts


def test_an_announcement_counts_for_every_user_online() -> None:
    """Each announcement adds one to every live user's count, on top of their own rows."""
    counts = ledger(alice=0, bob=2)
    changed = counts.settle(
        recounted={}, new_unread={"bob": 1}, announcements=2, deleted_announcements=[]
    )
    assert sorted(changed) == [("alice", 2), ("bob", 5)]


def test_a_deleted_announcement_is_taken_back_only_from_those_who_had_not_read_it() -> None:
    """Deleting a counted announcement lowers the count of users who had it unread, not of readers."""
    counts = ledger(alice=3, bob=3)
    changed = counts.settle(
        recounted={}, new_unread={}, announcements=0, deleted_announcements=[{"bob"}]
    )
    assert changed == [("alice", 2)]
    assert counts.get("bob") == 3


def test_forget_drops_a_user_whose_last_session_left() -> None:
    """A forgotten user is no longer counted, and forgetting twice is harmless."""
    counts = ledger(alice=3)
    counts.forget("alice")
    counts.forget("alice")
    assert counts.get("alice") is None
    assert len(counts) == 0
