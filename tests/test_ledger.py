"""
Unit tests for :mod:`notifyd.ledger`: unread counts by category kept exact
from one window to the next without a count query per message.
"""

from __future__ import annotations

from notifyd.ledger import UnreadLedger, total


def ledger(**counts: dict[str, int]) -> UnreadLedger:
    result = UnreadLedger()
    for user, by_type in counts.items():
        result.set(user, by_type)
    return result


def settle(counts: UnreadLedger, **window: object) -> list[tuple[str, dict[str, int]]]:
    arguments: dict[str, object] = {
        "recounted": {},
        "new_unread": {},
        "announcements": [],
        "deleted_announcements": [],
    }
    arguments.update(window)
    return counts.settle(**arguments)  # type: ignore[arg-type]


def test_new_unread_rows_are_added_to_their_category() -> None:
    """A window's unread rows raise exactly their users' categories, and only theirs change."""
    counts = ledger(alice={"comment": 2}, bob={"system": 5})
    changed = settle(counts, new_unread={"alice": {"comment": 1, "like": 2}})
    assert changed == [("alice", {"comment": 3, "like": 2})]
    assert counts.get("bob") == {"system": 5}


def test_a_recount_wins_over_what_the_window_added() -> None:
    """A user with a read event is recounted at the window's end; the recount is the counts."""
    counts = ledger(alice={"comment": 4})
    changed = settle(
        counts, recounted={"alice": {"comment": 1}}, new_unread={"alice": {"comment": 2}}
    )
    assert changed == [("alice", {"comment": 1})]


def test_categories_at_zero_are_left_out() -> None:
    """A category read to zero disappears from the counts (and a zero recount never shows)."""
    counts = ledger(alice={"comment": 1, "system": 2})
    changed = settle(counts, recounted={"alice": {"comment": 0, "system": 2}})
    assert changed == [("alice", {"system": 2})]
    assert ledger(bob={"x": 0}).get("bob") == {}


def test_unchanged_counts_are_not_reported() -> None:
    """A recount equal to the counts sends no unread event."""
    counts = ledger(alice={"comment": 4})
    assert settle(counts, recounted={"alice": {"comment": 4}}) == []


def test_users_without_a_live_session_are_not_counted() -> None:
    """Counts of users who are not online here are neither kept nor reported."""
    counts = ledger(alice={})
    changed = settle(counts, recounted={"carol": {"a": 9}}, new_unread={"bob": {"a": 1}})
    assert changed == []
    assert "bob" not in counts and "carol" not in counts


def test_an_announcement_counts_in_its_category_for_every_user_online() -> None:
    """Each announcement adds one to its category for every live user, on top of their own rows."""
    counts = ledger(alice={}, bob={"system": 2})
    changed = settle(counts, new_unread={"bob": {"": 1}}, announcements=["system", "system"])
    assert sorted(changed) == [("alice", {"system": 2}), ("bob", {"": 1, "system": 4})]
    assert total(counts.get("bob") or {}) == 5


def test_a_deleted_announcement_is_taken_back_only_from_those_who_had_not_read_it() -> None:
    """Deleting a counted announcement lowers its category for users who had it unread, not readers."""
    counts = ledger(alice={"system": 3}, bob={"system": 3})
    changed = settle(counts, deleted_announcements=[("system", {"bob"})])
    assert changed == [("alice", {"system": 2})]
    assert counts.get("bob") == {"system": 3}


def test_a_take_back_never_makes_a_category_negative() -> None:
    """An announcement whose category is unknown (recorded before categories) cannot go below zero."""
    counts = ledger(alice={"system": 1})
    changed = settle(counts, deleted_announcements=[("", set())])
    assert changed == []
    assert counts.get("alice") == {"system": 1}


def test_forget_drops_a_user_whose_last_session_left() -> None:
    """A forgotten user is no longer counted, and forgetting twice is harmless."""
    counts = ledger(alice={"a": 3})
    counts.forget("alice")
    counts.forget("alice")
    assert counts.get("alice") is None
    assert len(counts) == 0


def test_after_adding_previews_what_settling_the_additions_makes_and_changes_nothing() -> None:
    """The counts a message frame may carry are the ones settle then reports, taken ahead."""
    counts = ledger(alice={"comment": 2})
    preview = counts.after_adding("alice", {"comment": 1, "like": 2})
    assert preview == {"comment": 3, "like": 2}
    assert counts.get("alice") == {"comment": 2}
    assert settle(counts, new_unread={"alice": {"comment": 1, "like": 2}}) == [("alice", preview)]
    assert counts.after_adding("bob", {"comment": 1}) is None
