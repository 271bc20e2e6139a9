"""
When the soak's clients come back: as notifyd.js does, so that a restart
storm in the bench is the one browsers make. A restart (1012) spreads the
returns over 2 s; a shed handshake waits the server's hint plus the
backoff; other failures wait the growing, jittered backoff, which starts
over once a session stayed up 10 s.
"""

from __future__ import annotations

import random

from bench.soak.clients import Comeback


def test_a_restart_close_brings_the_client_back_within_two_seconds_and_resets_the_backoff() -> None:
    random.seed(1)
    comeback = Comeback()
    for _ in range(6):
        comeback.after_close(None, "", now=0.0)  # refused while the server was down
    waits = [
        comeback.after_close(1012, "service restart; retry_ms=4000", now=0.0) for _ in range(200)
    ]
    assert all(0 <= w <= 2.0 for w in waits)
    assert max(waits) > 1.5  # spread over the whole window, not bunched at its start
    assert comeback.attempt == 0


def test_a_1013_waits_its_retry_hint_plus_the_backoff() -> None:
    random.seed(2)
    waits = [
        Comeback().after_close(1013, "try again later; retry_ms=1500", now=0.0) for _ in range(200)
    ]
    assert all(1.5 <= w <= 2.0 for w in waits)
    assert min(waits) < 1.6 and max(waits) > 1.9  # the first backoff is jittered over 0.5 s


def test_a_503_waits_its_retry_after_plus_the_backoff_and_other_statuses_only_the_backoff() -> None:
    random.seed(3)
    assert all(2.0 <= Comeback().after_refusal(503, "2", now=0.0) <= 2.5 for _ in range(200))
    assert all(0 <= Comeback().after_refusal(429, "2", now=0.0) <= 0.5 for _ in range(200))


def test_repeated_failures_grow_the_backoff_up_to_thirty_seconds() -> None:
    random.seed(4)
    comeback = Comeback()
    caps = [0.5, 1, 2, 4, 8, 16, 30, 30]
    for cap in caps:
        wait = comeback.after_close(None, "", now=0.0)
        assert 0 <= wait <= cap
    assert comeback.attempt == len(caps)


def test_a_session_that_stayed_up_ten_seconds_starts_its_backoff_over() -> None:
    comeback = Comeback()
    for _ in range(5):
        comeback.after_close(None, "", now=0.0)
    comeback.opened(now=100.0)
    comeback.after_close(1006, "", now=109.0)
    assert comeback.attempt == 6  # dropped within 10 s: the backoff keeps growing
    comeback.opened(now=200.0)
    comeback.after_close(1006, "", now=210.0)
    assert comeback.attempt == 1
