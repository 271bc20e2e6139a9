"""
The one backoff schedule behind every retry loop.
"""

from __future__ import annotations

import pytest

from notifyd.backoff import backoff_delay


def test_without_jitter_the_delay_doubles_from_the_initial_delay_up_to_the_maximum():
    """1, 2, 4, 8 ... capped; huge attempt numbers do not overflow; attempt 0 waits nothing."""
    delays = [backoff_delay(n, initial=1.0, maximum=10.0, jitter=0) for n in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_delay(10_000, initial=1.0, maximum=10.0, jitter=0) == 10.0
    assert backoff_delay(0, initial=1.0, maximum=10.0, jitter=0) == 0.0


@pytest.mark.parametrize("attempt", [1, 3, 10_000])
def test_full_jitter_draws_between_zero_and_the_delay_and_varies(attempt):
    """The default, full jitter, spreads waits over [0, delay] so clients cut off together return apart."""
    ceiling = backoff_delay(attempt, initial=0.5, maximum=4.0, jitter=0)
    draws = [backoff_delay(attempt, initial=0.5, maximum=4.0) for _ in range(200)]
    assert all(0.0 <= draw <= ceiling for draw in draws)
    assert len(set(draws)) > 100


def test_partial_jitter_takes_at_most_that_share_off_the_delay():
    """jitter=0.25 waits between 75 % and 100 % of the delay."""
    draws = [backoff_delay(4, initial=1.0, maximum=100.0, jitter=0.25) for _ in range(200)]
    assert all(6.0 <= draw <= 8.0 for draw in draws)
    assert len(set(draws)) > 100
