"""
Pushing rows ahead of their window, the pure part: reading the insert
trigger's payloads, and the log that decides which session may be pushed
which row (notifyd/ahead.py).
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from notifyd.ahead import AheadLog, Carried, parse_payload
from notifyd.cursor import Snapshot


def carried_row(**overrides: object) -> list[object]:
    values: dict[str, object] = {
        "id": "m-1",
        "title": "t",
        "send_user": "sys",
        "to_user": "alice",
        "type": "comment",
        "content": "c",
        "send_time": "2026-12-07T14:40:00.123456+08:00",
        "skip_url": None,
        "is_read": "0",
        "seq": 41,
        "expire_at": None,
    }
    values.update(overrides)
    return list(values.values())


def payload(xact: int, *rows: list[object]) -> str:
    return f"r{xact}:" + orjson.dumps(list(rows)).decode()


def test_a_carried_row_reads_as_the_window_would_return_it():
    carried = parse_payload(payload(733, carried_row()))
    assert carried is not None and carried.xact == 733 and carried.rows is not None
    [row] = carried.rows
    assert row["xact_id"] == 733 and row["seq"] == 41 and row["to_user"] == "alice"
    # asyncpg reads a timestamptz in UTC, whatever the writer's time zone.
    assert row["send_time"] == datetime(2026, 12, 7, 6, 40, 0, 123456, tzinfo=UTC)
    assert row["expire_at"] is None


def test_a_timestamp_without_a_zone_stays_without_one():
    carried = parse_payload(payload(7, carried_row(send_time="2026-12-07T06:40:00.5")))
    assert carried is not None and carried.rows is not None
    assert carried.rows[0]["send_time"] == datetime(2026, 12, 7, 6, 40, 0, 500000)


def test_several_rows_of_one_statement_keep_their_order():
    carried = parse_payload(payload(9, carried_row(seq=3), carried_row(seq=4, to_user="bob")))
    assert carried is not None and carried.rows is not None
    assert [(row["seq"], row["to_user"]) for row in carried.rows] == [(3, "alice"), (4, "bob")]


def test_rows_listed_out_of_seq_order_come_out_in_seq_order():
    # The trigger lists them as its statement inserted them, without sorting.
    carried = parse_payload(
        payload(9, carried_row(seq=5), carried_row(seq=3, to_user="bob"), carried_row(seq=4))
    )
    assert carried is not None and carried.rows is not None
    assert [row["seq"] for row in carried.rows] == [3, 4, 5]


@pytest.mark.parametrize("text", ["m733", "e733"])
def test_rows_not_carried_and_events_name_their_transaction(text):
    assert parse_payload(text) == Carried(733, None)


@pytest.mark.parametrize(
    "text", ["m", "e", "poll", "probe:abc", "r:[]", "rx:[]", "r12", "m-1", "e1.5", "r٣:[]", ""]
)
def test_other_notifications_are_not_read_as_rows(text):
    assert parse_payload(text) is None


@pytest.mark.parametrize(
    "body",
    [
        "[[1, 2]]",  # the wrong shape
        "not json",
        orjson.dumps([carried_row(seq="41")]).decode(),
        orjson.dumps([carried_row(send_time="infinity")]).decode(),
        orjson.dumps([carried_row(to_user=None)]).decode(),
    ],
)
def test_a_payload_that_cannot_be_read_leaves_its_transaction_to_the_window(body):
    assert parse_payload(f"r12:{body}") == Carried(12, None)


def test_a_session_is_pushed_a_transactions_rows_only_while_it_has_every_earlier_one():
    log = AheadLog()
    # The first row of transaction 5 to alice: any session without a claim.
    assert log.may_push(5, "alice", None)
    log.carried(5, "alice", 10, None)
    # The next row: only a session that was pushed the first.
    assert log.may_push(5, "alice", 10)
    assert not log.may_push(5, "alice", None)  # joined since: it lacks row 10
    assert not log.may_push(5, "alice", 7)  # a claim from elsewhere, not row 10
    # Another user's rows of the same transaction are counted apart.
    assert log.may_push(5, "bob", None)


def test_unread_rows_pushed_ahead_count_until_a_window_routes_them():
    log = AheadLog()
    log.carried(5, "alice", 10, "comment")
    log.carried(5, "alice", 11, "comment")
    log.carried(6, "alice", 12, "")
    log.carried(6, "alice", 13, None)  # read already: counts nothing
    assert log.adds("alice") == {"comment": 2, "": 1}
    assert log.counting
    log.routed(10)
    log.routed(13)
    assert log.adds("alice") == {"comment": 1, "": 1}
    log.routed(11)
    log.routed(12)
    assert log.adds("alice") is None and not log.counting


def test_a_new_watermark_forgets_the_transactions_it_sees():
    log = AheadLog()
    log.carried(5, "alice", 10, "comment")  # deleted by its transaction: never routed
    log.carried(8, "alice", 11, "like")
    log.block(6)
    log.block(9)
    log.hold()
    assert log.holding_back
    log.forget(Snapshot(8, 8).visible)  # sees 5 and 6, not 8 and 9
    assert log.adds("alice") == {"like": 1}
    assert not log.blocked(6) and log.blocked(9)
    assert log.holding_back  # 9 still waits for its window
    assert not log.may_push(8, "alice", None)
    log.forget(Snapshot(10, 10).visible)
    assert not log.holding_back and not log
    assert log.may_push(8, "alice", None)


def test_a_held_log_holds_back_until_the_next_window():
    log = AheadLog()
    assert not log.holding_back
    log.hold()
    assert log.holding_back
    log.forget(Snapshot(1, 1).visible)
    assert not log.holding_back
