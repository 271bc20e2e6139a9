"""
The replica policy (notifyd.replica), pure: WAL positions, where a read
goes, the lag bound, read-your-writes.
"""

from __future__ import annotations

import pytest

from notifyd.replica import (
    LsnError,
    ReplicaPolicy,
    Route,
    Switch,
    format_lsn,
    parse_lsn,
    replayable,
)

BLOCK = 8192
SEGMENT = 16 * 1024 * 1024


def test_lsn_text_round_trips_and_orders_like_postgres() -> None:
    assert parse_lsn("0/3000148") == 0x3000148
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    assert parse_lsn("1/0") > parse_lsn("0/FFFFFFFF")
    with pytest.raises(LsnError):
        parse_lsn("16-B374D848")


def test_an_insert_position_just_past_a_page_header_targets_the_page_boundary() -> None:
    page = 5 * BLOCK
    assert replayable(page + 24, block_size=BLOCK, segment_size=SEGMENT) == page
    assert replayable(SEGMENT + 40, block_size=BLOCK, segment_size=SEGMENT) == SEGMENT
    assert replayable(page + 100, block_size=BLOCK, segment_size=SEGMENT) == page + 100
    assert replayable(page, block_size=BLOCK, segment_size=SEGMENT) == page


def test_a_standby_in_use_serves_what_it_replayed_and_is_waited_for_beyond() -> None:
    policy = ReplicaPolicy(max_lag_s=2.0, in_use=True)
    policy.observed(100)
    assert policy.route(100, now=0.0) is Route.STANDBY
    assert policy.route(101, now=0.0) is Route.WAIT
    assert policy.wait_limit(Route.WAIT) == 2.0


def test_a_missed_target_bypasses_the_standby_until_its_recheck_finds_it_caught_up() -> None:
    policy = ReplicaPolicy(max_lag_s=2.0, recheck_s=1.0, in_use=True)
    assert policy.missed(2.0, now=10.0) is Switch.BYPASSED
    assert policy.missed(0.0, now=10.5) is None  # logged once
    assert policy.fallbacks == 2
    assert policy.route(1, now=10.9) is Route.PRIMARY
    assert policy.route(1, now=11.5) is Route.CHECK
    assert policy.wait_limit(Route.CHECK) == 0.0
    assert policy.reached(0.0) is Switch.RESUMED
    assert policy.reached(0.0) is None
    assert policy.in_use


def test_a_users_own_write_raises_their_target_until_the_standby_replays_it() -> None:
    policy = ReplicaPolicy(max_lag_s=2.0, in_use=True)
    policy.observed(100)
    policy.wrote("ann", 150, now=0.0)
    assert policy.target_for("ann", 120, now=0.0) == 150
    assert policy.target_for("bob", 120, now=0.0) == 120
    policy.observed(150)
    assert policy.target_for("ann", 120, now=0.0) == 120
    policy.wrote("ann", 90, now=0.0)  # already replayed
    assert policy.target_for("ann", 120, now=0.0) == 120


def test_a_write_whose_position_is_unknown_sends_that_users_reads_to_the_primary_for_a_while() -> (
    None
):
    policy = ReplicaPolicy(max_lag_s=2.0, in_use=True)
    policy.wrote("ann", None, now=0.0)
    assert policy.target_for("ann", 5, now=1.0) is None
    assert policy.target_for("ann", 5, now=2.5) == 5
