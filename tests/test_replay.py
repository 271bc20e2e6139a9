"""
Unit tests for :mod:`notifyd.replay`: what a joining session is sent first.
Pure planning over made-up snapshots and rows; the end-to-end resume tests
(tests/test_resume.py) prove the same plans against a real database.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from notifyd.cursor import Cursor, Snapshot
from notifyd.exceptions import CursorError
from notifyd.replay import plan_fresh, plan_resume, plan_unusable, usable_cursor

# Transactions 100..119 have run; the watermark sees all of them.
END = Snapshot(120, 120)


def row(seq: int, xact_id: int, user: str = "u") -> dict[str, Any]:
    return {
        "seq": seq,
        "xact_id": xact_id,
        "id": f"m{seq}",
        "title": f"t{seq}",
        "content": None,
        "type": None,
        "send_user": None,
        "to_user": user,
        "send_time": datetime(2026, 1, 1, tzinfo=UTC),
        "skip_url": None,
        "is_read": "0",
    }


def frames(greeting: Any) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame, _ in greeting.replay]


def test_a_session_without_cursor_starts_live_at_the_watermark() -> None:
    """No cursor: hello at the watermark with the unread count, nothing replayed, no 'recovered'."""
    greeting = plan_fresh("u", END, {"comment": 4, "": 3})
    hello = json.loads(greeting.hello)
    assert hello["cursor"] == Cursor(END).encode()
    assert hello["unread"] == 7
    assert hello["unreadByType"] == {"comment": 4, "": 3}
    assert "recovered" not in hello
    assert list(greeting.replay) == []
    assert greeting.resync is False


def test_an_unusable_cursor_gets_recovered_false_and_a_resync_at_the_watermark() -> None:
    """A cursor that cannot be used: hello says recovered false, then one resync to the watermark."""
    greeting = plan_unusable("u", END, {"system": 3})
    hello = json.loads(greeting.hello)
    position = Cursor(END).encode()
    assert hello["recovered"] is False
    assert hello["cursor"] == position
    assert [
        (frame["event"], cursor)
        for frame, (_, cursor) in zip(frames(greeting), greeting.replay, strict=True)
    ] == [("resync", position)]
    assert greeting.resync is True


@pytest.mark.parametrize("text", ["", "garbage", "1-2_3", "~5"])
def test_a_malformed_cursor_is_not_usable(text: str) -> None:
    """Text that is no cursor raises CursorError, never anything else."""
    with pytest.raises(CursorError):
        usable_cursor(text, END)


def test_a_cursor_from_the_future_is_not_usable() -> None:
    """A cursor ahead of this database (another database, a restored backup) is refused."""
    ahead = Cursor(Snapshot(150, 150)).encode()
    with pytest.raises(CursorError):
        usable_cursor(ahead, END)


def test_a_cursor_this_database_has_reached_is_usable() -> None:
    """A cursor the watermark covers decodes to itself."""
    cursor = Cursor(Snapshot(110, 112, frozenset({110})))
    assert usable_cursor(cursor.encode(), END) == cursor


def test_nothing_missed_gives_recovered_true_at_the_watermark() -> None:
    """A resume with nothing to replay: recovered true and the watermark as the new position."""
    since = Cursor(Snapshot(110, 110))
    greeting = plan_resume("u", since, [], END, {"": 0}, replay_limit=10)
    hello = json.loads(greeting.hello)
    assert hello["recovered"] is True
    assert hello["cursor"] == Cursor(END).encode()
    assert list(greeting.replay) == []


def test_missed_rows_are_replayed_oldest_first_and_the_last_one_carries_the_watermark() -> None:
    """Rows after a plain cursor come in seq order; each but the last stays inside the window."""
    since = Cursor(Snapshot(110, 110))
    newest_first = [row(3, 115), row(2, 112), row(1, 111)]
    greeting = plan_resume("u", since, newest_first, END, {"": 3}, replay_limit=10)
    hello = json.loads(greeting.hello)
    assert hello["recovered"] is True
    # The hello keeps the client's own position until the replay moves it.
    assert hello["cursor"] == since.encode()
    assert [frame["id"] for frame in frames(greeting)] == ["m1", "m2", "m3"]
    cursors = [cursor for _, cursor in greeting.replay]
    assert cursors == [
        Cursor(since.base, END, 1).encode(at_seq=1),
        Cursor(since.base, END, 2).encode(at_seq=2),
        Cursor(END).encode(at_seq=3),
    ]
    assert [frame["cursor"] for frame in frames(greeting)] == cursors


def test_a_client_cut_mid_batch_gets_the_rest_of_that_batch_before_later_rows() -> None:
    """
    A cursor inside a batch (base, end, seq): the batch's remaining rows
    (those its end saw) come first under the batch's own cursors, then
    the rows committed after it.
    """
    batch_end = Snapshot(113, 113)
    since = Cursor(Snapshot(110, 110), batch_end, 1)
    # seq 4 committed after the batch (xact 116), seq 2 and 3 belong to it.
    newest_first = [row(4, 116), row(3, 112), row(2, 111)]
    greeting = plan_resume("u", since, newest_first, END, {"": 0}, replay_limit=10)
    assert [frame["id"] for frame in frames(greeting)] == ["m2", "m3", "m4"]
    assert [cursor for _, cursor in greeting.replay] == [
        Cursor(since.base, batch_end, 2).encode(at_seq=2),
        Cursor(since.base, batch_end, 3).encode(at_seq=3),
        Cursor(END).encode(at_seq=4),
    ]


def test_more_than_the_replay_limit_sends_the_newest_then_asks_for_a_resync() -> None:
    """
    Over replay_limit: the newest rows (oldest of them first) claim no
    progress, then a resync moves the client to the watermark; hello says
    recovered false.
    """
    since = Cursor(Snapshot(100, 100))
    newest_first = [row(seq, 100 + seq) for seq in range(5, 0, -1)]
    greeting = plan_resume("u", since, newest_first, END, {"": 5}, replay_limit=3)
    hello = json.loads(greeting.hello)
    assert hello["recovered"] is False
    assert hello["cursor"] == since.encode()
    replayed = frames(greeting)
    assert [frame.get("id") for frame in replayed[:-1]] == ["m3", "m4", "m5"]
    assert [cursor for _, cursor in greeting.replay[:-1]] == [since.encode()] * 3
    assert replayed[-1]["event"] == "resync"
    assert greeting.replay[-1][1] == Cursor(END).encode()
    assert greeting.resync is True


def test_rows_a_cursor_claims_ahead_are_not_replayed_and_its_claims_follow_the_client() -> None:
    """
    A client that was pushed rows ahead of their window (claims {xact: seq}
    in its cursor) is replayed only what it lacks; the replay's cursors
    keep claiming what it has, and the claims the watermark does not yet
    see are handed on for the session's windows to skip.
    """
    base = Snapshot(110, 110)
    since = Cursor(base, ahead=((111, 2), (125, 9)))
    # 111 committed and claimed up to seq 2; its seq 3 came later (not
    # claimed); 125 is past the watermark END (still to be routed).
    newest_first = [row(4, 113), row(3, 111), row(2, 111), row(1, 111)]
    greeting = plan_resume("u", since, newest_first, END, {"": 2}, replay_limit=10)
    assert [frame["id"] for frame in frames(greeting)] == ["m3", "m4"]
    assert [cursor for _, cursor in greeting.replay] == [
        Cursor(base, END, 3, since.ahead).encode(at_seq=3),
        Cursor(END, ahead=((125, 9),)).encode(at_seq=4),
    ]
    assert greeting.claims == {125: 9}


def test_a_client_whose_claims_cover_everything_missed_is_recovered_at_the_watermark() -> None:
    since = Cursor(Snapshot(110, 110), ahead=((111, 2),))
    greeting = plan_resume("u", since, [row(2, 111), row(1, 111)], END, {}, replay_limit=10)
    assert greeting.replay == []
    hello = json.loads(greeting.hello)
    assert hello["recovered"] is True and hello["cursor"] == Cursor(END).encode()
    assert greeting.claims == {}
