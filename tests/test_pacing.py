"""
The pacer alone (no database, no clock of its own): when delivery polls,
when it takes, extends and lets go of the polling lease, and how it drains
the transactions a lease's end may have left behind.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from notifyd.cursor import Snapshot
from notifyd.pacing import (
    CONTENDED_HITS,
    DRAIN_MAX_INTERVAL,
    READ_BURST,
    RELEASE_SHARE,
    RENEW_RETRY_S,
    SAMPLE_ABOVE,
    SAMPLE_EVERY_S,
    SAMPLE_SOON_S,
    Lease,
    Mode,
    Pacer,
    ReadBudget,
    Renewal,
)

INTERVAL = 0.002
T0_MS = 1_700_000_000_000


def snap(xmax: int = 100, *in_progress: int) -> Snapshot:
    """A snapshot: nothing finished at or past ``xmax``, ``in_progress`` below it."""
    return Snapshot(min((*in_progress, xmax)), xmax, frozenset(in_progress))


NOTHING = snap()


def over(now_ms: int = T0_MS) -> Lease:
    """A lease that was never taken (or ended long ago), seen at ``now_ms``."""
    return Lease(0, now_ms)


def busy(pacer: Pacer, *, per_s: float, seconds: float, start: float = 0.0) -> float:
    """Reads every 10 ms, each seeing ``per_s`` / 100 transactions; returns the end time."""
    now = start
    for _ in range(round(seconds * 100)):
        now += 0.01
        pacer.observed(now, over(T0_MS + round(now * 1000)), NOTHING, round(per_s / 100))
        if pacer.horizon_needed:
            pacer.horizon(NOTHING.xmax)
    return now


def test_a_quiet_instance_waits_for_notify_and_asks_for_no_lease():
    """Below poll_above: NOTIFY mode, no timed read, no renewal."""
    pacer = Pacer(200, INTERVAL)
    now = busy(pacer, per_s=100, seconds=3)
    assert pacer.mode is Mode.NOTIFY
    assert pacer.next_read_in() is None
    assert pacer.renewal(now) is None


def test_a_busy_instance_starts_a_lease_then_polls_every_interval():
    """Above poll_above a START is asked for; once renewed the mode is POLLING."""
    pacer = Pacer(200, INTERVAL)
    now = busy(pacer, per_s=1000, seconds=1)
    assert pacer.rate(now) > 200
    assert pacer.renewal(now) is Renewal.START
    pacer.renewed(now, Lease(T0_MS + 2000, T0_MS + 1000))
    assert pacer.mode is Mode.POLLING
    assert pacer.next_read_in() == INTERVAL
    assert pacer.renewal(now) is None  # a whole second left


def test_the_lease_is_extended_once_less_than_three_quarters_remain():
    """EXTEND only once under 0.75 s is left, not before."""
    pacer = Pacer(200, INTERVAL)
    now = busy(pacer, per_s=1000, seconds=1)
    pacer.renewed(now, Lease(T0_MS + 1000, T0_MS))
    assert pacer.renewal(now + 0.2) is None
    pacer.observed(now + 0.3, Lease(T0_MS + 1000, T0_MS + 300), NOTHING, 300)
    assert pacer.renewal(now + 0.3) is Renewal.EXTEND


def test_hysteresis_keeps_extending_above_half_the_threshold_but_never_starts_there():
    """At 150/s with poll_above 200: an in-force lease is extended, none is started."""
    pacer = Pacer(200, INTERVAL)
    now = busy(pacer, per_s=150, seconds=5)
    assert pacer.renewal(now) is None
    pacer.renewed(now, Lease(T0_MS + 500, T0_MS))
    assert pacer.renewal(now) is Renewal.EXTEND
    quiet = busy(pacer, per_s=0, seconds=2, start=now)
    assert pacer.rate(quiet) < 100
    pacer.renewed(quiet, Lease(T0_MS + 500, T0_MS))
    assert pacer.renewal(quiet) is None


def test_another_instances_lease_makes_a_non_renewing_instance_poll():
    """poll_above None never renews, but a lease seen in a read means POLLING."""
    pacer = Pacer(None, INTERVAL)
    pacer.observed(1.0, Lease(T0_MS + 800, T0_MS), NOTHING, 0)
    assert pacer.mode is Mode.POLLING
    assert pacer.next_read_in() == INTERVAL
    assert pacer.renewal(1.0) is None
    busy(pacer, per_s=10_000, seconds=1, start=1.0)
    assert pacer.renewal(2.0) is None


def test_draining_waits_out_every_transaction_in_progress_at_the_lease_end():
    """The first read after the end takes its in-progress set; later reads shrink it; then NOTIFY."""
    pacer = Pacer(None, INTERVAL)
    pacer.observed(1.0, Lease(T0_MS + 1000, T0_MS), snap(10, 5, 6), 0)
    assert pacer.mode is Mode.POLLING
    pacer.observed(2.0, Lease(T0_MS + 1000, T0_MS + 1001), snap(10, 7, 8, 9), 0)
    assert pacer.mode is Mode.DRAINING
    assert pacer.horizon_needed
    pacer.horizon(10)
    assert [x for x in range(20) if pacer.waits_for(x)] == [7, 8, 9]
    # 12 started after the lease's end: it did send its NOTIFY, not waited for.
    pacer.observed(2.1, Lease(T0_MS + 1000, T0_MS + 1100), snap(13, 8, 9, 12), 1)
    assert pacer.mode is Mode.DRAINING
    assert [x for x in range(20) if pacer.waits_for(x)] == [8, 9]
    pacer.observed(2.2, Lease(T0_MS + 1000, T0_MS + 1200), snap(13, 9, 12), 1)
    assert [x for x in range(20) if pacer.waits_for(x)] == [9]
    pacer.observed(2.3, Lease(T0_MS + 1000, T0_MS + 1300), snap(13, 12), 1)
    assert pacer.mode is Mode.NOTIFY
    assert pacer.next_read_in() is None


def test_a_transaction_past_the_snapshots_xmax_is_waited_for_up_to_the_horizon():
    """Running but newer than every finished one (so in no list): waited for all the same."""
    pacer = Pacer(None, INTERVAL)
    pacer.observed(1.0, Lease(T0_MS + 1000, T0_MS), NOTHING, 0)
    # 50 is running: xmax stops at 50 (one past the newest finished), xip is empty.
    pacer.observed(2.0, Lease(T0_MS + 1000, T0_MS + 1001), snap(50), 0)
    assert pacer.waits_for(50) and pacer.waits_for(10**9)  # horizon not known yet
    pacer.observed(2.1, Lease(T0_MS + 1000, T0_MS + 1100), snap(50), 0)
    assert pacer.mode is Mode.DRAINING  # no horizon, no end
    pacer.horizon(52)
    assert [x for x in range(60) if pacer.waits_for(x)] == [50, 51]
    pacer.observed(2.2, Lease(T0_MS + 1000, T0_MS + 1200), snap(50), 0)
    assert pacer.mode is Mode.DRAINING  # still nothing newer finished: 50 may be running
    pacer.observed(2.3, Lease(T0_MS + 1000, T0_MS + 1300), snap(53, 50), 0)
    assert [x for x in range(60) if pacer.waits_for(x)] == [50]
    pacer.observed(2.4, Lease(T0_MS + 1000, T0_MS + 1400), snap(53), 0)
    assert pacer.mode is Mode.NOTIFY


def test_a_lease_end_with_nothing_in_progress_needs_only_the_horizon():
    """Nothing in progress at the first read after the end: back to NOTIFY with the horizon."""
    pacer = Pacer(None, INTERVAL)
    pacer.observed(1.0, Lease(T0_MS + 1000, T0_MS), snap(10, 5), 0)
    pacer.observed(2.0, Lease(T0_MS + 1000, T0_MS + 1500), snap(10), 0)
    assert pacer.mode is Mode.DRAINING
    pacer.horizon(10)
    assert pacer.mode is Mode.NOTIFY


def test_draining_reads_ever_less_often_up_to_a_tenth_of_a_second():
    """The wait between drain reads doubles from the interval and stops at 0.1 s."""
    pacer = Pacer(None, INTERVAL)
    pacer.observed(1.0, Lease(T0_MS + 1000, T0_MS), NOTHING, 0)
    pacer.observed(2.0, Lease(T0_MS + 1000, T0_MS + 1001), snap(100, 42), 0)
    pacer.horizon(100)
    waits = [pacer.next_read_in()]
    for step in range(12):
        pacer.observed(2.0 + step, Lease(T0_MS + 1000, T0_MS + 2000 + step), snap(100, 42), 0)
        waits.append(pacer.next_read_in())
    assert waits[:4] == [INTERVAL, 2 * INTERVAL, 4 * INTERVAL, 8 * INTERVAL]
    assert max(w for w in waits if w is not None) == DRAIN_MAX_INTERVAL
    assert waits[-1] == DRAIN_MAX_INTERVAL
    assert pacer.mode is Mode.DRAINING


def test_a_lease_that_came_and_went_between_two_reads_is_drained_too():
    """A lease end never seen in force (another instance's, between reads) still drains."""
    pacer = Pacer(None, INTERVAL)
    pacer.observed(1.0, over(), NOTHING, 0)
    pacer.horizon(100)
    assert pacer.mode is Mode.NOTIFY
    pacer.observed(1.5, over(T0_MS + 500), NOTHING, 0)
    assert pacer.mode is Mode.NOTIFY
    # Someone held the lease until T0+2000; this instance only sees it over.
    pacer.observed(3.0, Lease(T0_MS + 2000, T0_MS + 3000), snap(100, 11), 0)
    assert pacer.mode is Mode.DRAINING
    assert pacer.waits_for(11)


def test_the_first_read_of_an_instance_drains_what_an_earlier_lease_may_have_left():
    """At start the lease's history is unknown: whatever is in progress is waited out."""
    pacer = Pacer(200, INTERVAL)
    pacer.observed(1.0, Lease(T0_MS - 10, T0_MS), snap(10, 3), 0)
    assert pacer.mode is Mode.DRAINING
    assert pacer.waits_for(3)


def test_a_new_lease_during_draining_polls_again_and_its_end_drains_anew():
    """DRAINING -> POLLING on a new lease; its end takes a fresh in-progress set."""
    pacer = Pacer(None, INTERVAL)
    pacer.observed(1.0, Lease(T0_MS + 1000, T0_MS), NOTHING, 0)
    pacer.observed(2.0, Lease(T0_MS + 1000, T0_MS + 1001), snap(10, 1), 0)
    pacer.horizon(10)
    assert pacer.mode is Mode.DRAINING
    pacer.observed(2.1, Lease(T0_MS + 2500, T0_MS + 1100), snap(10, 1), 0)
    assert pacer.mode is Mode.POLLING
    assert not pacer.waits_for(1)
    pacer.observed(3.6, Lease(T0_MS + 2500, T0_MS + 2600), snap(20, 1, 2), 0)
    assert pacer.mode is Mode.DRAINING
    assert pacer.horizon_needed
    pacer.horizon(20)
    assert [x for x in range(30) if pacer.waits_for(x)] == [1, 2]


def test_a_failed_renewal_is_not_retried_at_once():
    """After renewal_failed, no renewal for RENEW_RETRY_S, then again."""
    pacer = Pacer(200, INTERVAL)
    now = busy(pacer, per_s=2000, seconds=1)
    assert pacer.renewal(now) is Renewal.START
    pacer.renewal_failed(now)
    assert pacer.renewal(now + RENEW_RETRY_S / 2) is None
    assert pacer.renewal(now + RENEW_RETRY_S) is Renewal.START
    assert pacer.mode is not Mode.POLLING


def test_the_rate_counts_transactions_per_second_and_decays():
    """1,000 transactions a second read in 10 ms windows reads as about 1,000/s, then decays."""
    pacer = Pacer(200, INTERVAL)
    now = busy(pacer, per_s=1000, seconds=5)
    assert pacer.rate(now) == pytest.approx(1000, rel=0.05)
    assert pacer.rate(now + 1) == pytest.approx(1000 / 2.718281828, rel=0.05)


def test_a_zero_interval_is_refused():
    """The interval is a wait between reads: it must be positive."""
    with pytest.raises(ValueError):
        Pacer(200, 0.0)


def sampled_load(
    pacer: Pacer,
    *,
    per_s: float,
    seconds: float,
    lock: Callable[[int], int],
    start: float = 0.0,
) -> float:
    """
    Reads every 10 ms as in :func:`busy`, and a look at the NOTIFY lock
    whenever the pacer asks, the n-th seeing ``lock(n)`` writers waiting;
    returns the end time.
    """
    now, looks = start, 0
    for _ in range(round(seconds * 100)):
        now += 0.01
        pacer.observed(now, over(T0_MS + round(now * 1000)), NOTHING, round(per_s / 100))
        if pacer.horizon_needed:
            pacer.horizon(NOTHING.xmax)
        if pacer.next_sample_in(now) == 0:
            pacer.sampled(now, lock(looks))
            looks += 1
    return now


def test_commits_that_rarely_meet_at_the_notify_lock_start_no_lease():
    """500/s with a writer waiting in 1 look of 20 (as measured at that rate): NOTIFY stays."""
    pacer = Pacer(None, INTERVAL, contention=True)
    now = sampled_load(pacer, per_s=500, seconds=10, lock=lambda n: int(n % 20 == 0))
    assert pacer.renewal(now) is None
    assert pacer.mode is Mode.NOTIFY


def test_writers_queueing_at_the_notify_lock_start_a_lease_within_a_few_looks():
    """A writer waiting at every look: START once CONTENDED_HITS looks saw it, not before."""
    pacer = Pacer(None, INTERVAL, contention=True)
    looks: list[float] = []

    def queued(n: int) -> int:
        looks.append(n)
        return 4

    now = 0.0
    while pacer.renewal(now) is None:
        assert now < 1.0, "no lease after a second of queueing"
        now = sampled_load(pacer, per_s=2000, seconds=0.01, lock=queued, start=now)
    assert len(looks) == CONTENDED_HITS
    # The first look after SAMPLE_ABOVE is reached, the next ones sooner.
    assert now <= SAMPLE_EVERY_S + (CONTENDED_HITS - 1) * SAMPLE_SOON_S + 0.03


def test_a_lease_started_by_a_queue_is_kept_while_the_rate_stays_near_the_queues_rate():
    """
    A queue seen at 2,000/s: the lease is kept above RELEASE_SHARE of that
    (1,000/s), however much faster commits go once they stop queueing, and
    let go below it.
    """
    pacer = Pacer(None, INTERVAL, contention=True)
    now = sampled_load(pacer, per_s=2000, seconds=0.5, lock=lambda n: 3)
    assert pacer.renewal(now) is Renewal.START
    pacer.renewed(now, Lease(T0_MS + 500, T0_MS))
    keep = RELEASE_SHARE * 2000
    assert pacer.keep_above == pytest.approx(keep, rel=0.1)
    for rate, wanted in (
        (10_000, Renewal.EXTEND),
        (keep * 1.2, Renewal.EXTEND),
        (keep * 0.8, None),
    ):
        later = busy(pacer, per_s=rate, seconds=5, start=now)
        pacer.renewed(later, Lease(T0_MS + 500, T0_MS))  # half a second left
        assert pacer.renewal(later) is wanted, rate
        now = later


@pytest.mark.parametrize("offset_ms", range(0, 50, 7))
def test_the_rate_a_lease_is_kept_above_comes_from_the_reads_not_from_when_the_looks_began(
    offset_ms: int,
):
    """
    Rows pushed ahead of their window are read once every 50 ms: a queue
    seen at 2,000/s still keeps the lease above RELEASE_SHARE of 2,000/s,
    whenever the looks that saw it fall between two reads (a rate taken
    from the first look's time would see no read at all after it, or one
    read's commits in a few milliseconds).
    """
    pacer = Pacer(None, INTERVAL, contention=True)
    now_ms = offset_ms
    while True:
        now_ms += 1
        now = now_ms / 1000
        if now_ms % 50 == 0:
            pacer.observed(now, over(T0_MS + now_ms), NOTHING, 100)
            if pacer.horizon_needed:
                pacer.horizon(NOTHING.xmax)
        if pacer.next_sample_in(now) == 0:
            pacer.sampled(now, 3)
        if pacer.renewal(now) is Renewal.START:
            break
        assert now_ms < 2000, "no lease after two seconds of queueing"
    assert pacer.keep_above == pytest.approx(RELEASE_SHARE * 2000, rel=0.15)


def test_the_lock_is_looked_at_only_while_waiting_for_notifies_under_load():
    """No look below SAMPLE_ABOVE, none under a lease, none without contention on, one per interval."""
    quiet = Pacer(None, INTERVAL, contention=True)
    now = busy(quiet, per_s=SAMPLE_ABOVE / 2, seconds=5)
    assert quiet.next_sample_in(now) is None

    pacer = Pacer(None, INTERVAL, contention=True)
    now = busy(pacer, per_s=1000, seconds=1)
    assert pacer.next_sample_in(now) == 0
    pacer.sampled(now, 0)
    assert pacer.next_sample_in(now + SAMPLE_EVERY_S / 2) == pytest.approx(SAMPLE_EVERY_S / 2)
    assert pacer.next_sample_in(now + SAMPLE_EVERY_S) == 0
    pacer.sampled(now + SAMPLE_EVERY_S, 2)  # a queue: the next look comes sooner
    assert pacer.next_sample_in(now + SAMPLE_EVERY_S + SAMPLE_SOON_S / 2) == pytest.approx(
        SAMPLE_SOON_S / 2
    )
    assert pacer.next_sample_in(now + SAMPLE_EVERY_S + SAMPLE_SOON_S) == 0
    pacer.observed(now + 0.1, Lease(T0_MS + 900, T0_MS), NOTHING, 10)
    assert pacer.mode is Mode.POLLING
    assert pacer.next_sample_in(now + 0.2) is None

    off = Pacer(None, INTERVAL)
    now = busy(off, per_s=1000, seconds=1)
    assert off.next_sample_in(now) is None
    assert off.renewal(now) is None


def test_reads_start_at_once_while_the_budget_lasts_then_one_per_interval():
    """READ_BURST reads at once, then each waits its share of the interval; idle time refills."""
    budget = ReadBudget(0.002)
    for _ in range(READ_BURST):
        assert budget.wait(1.0) == 0
        budget.spend(1.0)
    assert budget.wait(1.0) == pytest.approx(0.002)
    assert budget.wait(1.0015) == pytest.approx(0.0005)
    budget.spend(1.002)
    assert budget.wait(1.002) == pytest.approx(0.002)
    assert budget.wait(1.1) == 0  # a pause refills the whole burst
    for _ in range(READ_BURST):
        budget.spend(1.1)
    assert budget.wait(1.1) > 0


def test_a_zero_interval_budget_never_waits():
    """NOTIFYD_BATCH_INTERVAL_MS=0: a read per wake-up, never held back."""
    budget = ReadBudget(0.0)
    for n in range(100):
        budget.spend(n / 1e6)
        assert budget.wait(n / 1e6) == 0


def test_the_sooner_looks_after_a_queue_do_not_make_a_queue_look_more_common():
    """
    Each 330 ms, a queue for about 70 ms: seen by a look at the steady
    cadence and by the two sooner looks after it. A third of the looks, but
    a fifth of the time: no lease.
    """
    pacer = Pacer(None, INTERVAL, contention=True)
    now = busy(pacer, per_s=1000, seconds=1)
    pacer.sampled(now, 0)
    for _ in range(4):
        for gap, waiting in [(SAMPLE_EVERY_S, 3), (SAMPLE_SOON_S, 2), (SAMPLE_SOON_S, 1)]:
            now += gap
            pacer.sampled(now, waiting)
        now += SAMPLE_SOON_S
        pacer.sampled(now, 0)
        for _ in range(5):
            now += SAMPLE_EVERY_S
            pacer.sampled(now, 0)
    assert not pacer.contended(now)
    assert pacer.renewal(now) is None
