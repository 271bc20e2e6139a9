"""
Recall, the memory a failover that lost transactions is repaired with: what
it keeps, what it forgets, and its verdict on the rows found under ids the
old snapshots call finished; and how a change of the database's history is
told (LineageWatch, without a database).
"""

from __future__ import annotations

from notifyd.cursor import Snapshot
from notifyd.db import Lineage, LineageWatch
from notifyd.recall import Recall, event_fingerprint, fingerprint


def _snap(xmin: int, xmax: int, *xip: int) -> Snapshot:
    return Snapshot(xmin, xmax, frozenset(xip))


def _routed() -> Recall:
    """
    Three windows a second apart: transactions 100 and 101, then 102 (two
    rows, in two pages), then 103.
    """
    recall = Recall(span_s=60.0)
    recall.note(0.0, _snap(100, 100), _snap(102, 102), [(100, fingerprint("a", 1))])
    recall.note(0.0, _snap(100, 100), _snap(102, 102), [(101, fingerprint("b", 2))])
    recall.note(1.0, _snap(102, 102), _snap(103, 103), [(102, fingerprint("c", 3))])
    recall.note(1.0, _snap(102, 102), _snap(103, 103), [(102, fingerprint("d", 4))])
    recall.note(2.0, _snap(103, 103), _snap(104, 104), [(103, fingerprint("e", 5))])
    return recall


def test_an_id_found_with_the_rows_routed_under_it_is_the_same_transaction() -> None:
    plan = _routed().plan([(100, fingerprint("a", 1)), (102, fingerprint("c", 3))])
    # 102 lost its row "d" since (a delete): still the same transaction.
    assert plan.reused == frozenset()
    assert plan.recognised == 2
    assert not plan.past_memory


def test_an_id_with_a_row_never_routed_under_it_or_never_routed_at_all_was_reused() -> None:
    plan = _routed().plan(
        [
            (100, fingerprint("a", 1)),
            (101, fingerprint("x", 9)),  # routed with "b": another transaction now
            (102, fingerprint("c", 3)),
            (102, fingerprint("y", 10)),  # one row more than was routed under 102
            (105, fingerprint("z", 11)),  # never routed: its first life had no rows
        ]
    )
    assert plan.reused == frozenset({101, 102, 105})
    assert plan.recognised == 1


def test_when_none_of_the_oldest_transactions_survived_the_loss_may_reach_further_back() -> None:
    assert _routed().plan([(103, fingerprint("e", 5))]).past_memory
    assert not _routed().plan([(101, fingerprint("b", 2))]).past_memory


def test_events_are_told_apart_by_user_kind_ids_and_type() -> None:
    read = event_fingerprint("ann", "read", ["1", "2"], None)
    assert read == event_fingerprint("ann", "read", ["1", "2"], None)
    assert read != event_fingerprint("ann", "read", ["1"], None)
    assert read != event_fingerprint("bob", "read", ["1", "2"], None)
    assert event_fingerprint("ann", "read", None, "system") != event_fingerprint(
        "ann", "read", None, None
    )


def test_the_memory_forgets_whole_chunks_older_than_its_span_from_a_windows_base() -> None:
    recall = Recall(span_s=10.0)
    for second in range(30):
        xid = 100 + second
        recall.note(float(second), _snap(xid, xid), _snap(xid + 1, xid + 1), [(xid, second)])
    horizon = recall.horizon
    assert horizon is not None
    # The oldest chunk kept starts at most one chunk before the span.
    assert horizon.xmax in (119, 120)
    assert recall.highest_xmax == 130
    assert recall.span_xids == 130 - horizon.xmax
    # What lies before the horizon is no longer judged: unknown, so reused.
    assert recall.plan([(105, 5)]).reused == frozenset({105})
    assert recall.plan([(125, 25)]).reused == frozenset()


def test_a_new_chunk_starts_only_with_a_new_window() -> None:
    recall = Recall(span_s=10.0)
    base = _snap(100, 100)
    recall.note(0.0, base, _snap(200, 200), [(100, 1)])
    # A later page of the same window, well past the span: it joins the
    # window's chunk, so that no chunk under this base lacks the window's
    # first rows.
    recall.note(30.0, base, _snap(200, 200), [(150, 2)])
    recall.note(31.0, _snap(200, 200), _snap(201, 201), [(200, 3)])
    recall.note(40.5, _snap(201, 201), _snap(202, 202), [(201, 4)])
    assert recall.horizon == base
    assert recall.plan([(100, 1), (150, 2)]).reused == frozenset()
    # Forgotten once the next chunk is older than the span.
    recall.note(41.5, _snap(202, 202), _snap(203, 203), [(202, 5)])
    assert recall.horizon == _snap(200, 200)


def test_still_open_are_the_transactions_in_progress_under_ids_the_watermark_calls_finished() -> (
    None
):
    recall = _routed()
    watermark = _snap(103, 110, 105)
    now = _snap(99, 120, 99, 104, 105, 112)
    # 99: before the horizon; 105: in progress at the watermark too (its
    # rows will be read as new anyway); 112: past the watermark.
    assert recall.still_open(now, watermark) == frozenset({104})
    assert Recall().still_open(now, watermark) == frozenset()


def test_nothing_noted_means_no_horizon_and_nothing_spanned() -> None:
    recall = Recall()
    assert recall.horizon is None
    assert recall.highest_xmax == 0
    assert recall.span_xids == 0


def test_past_its_row_limit_the_memory_forgets_its_oldest_chunks_early() -> None:
    recall = Recall(span_s=60.0, max_rows=25)
    for second in range(10):
        xid = 100 + 10 * second
        base, end = _snap(xid, xid), _snap(xid + 10, xid + 10)
        recall.note(float(second), base, end, [(xid + i, i) for i in range(10)])
    # Three chunks of ten rows are past the limit of 25 when the next starts:
    # the oldest go, though well within the span.
    horizon = recall.horizon
    assert horizon is not None and horizon.xmax == 170
    assert recall.plan([(175, 5)]).reused == frozenset()
    assert recall.plan([(165, 5)]).reused == frozenset({165})


def test_a_change_of_timeline_or_of_cluster_is_told_apart_and_accepted() -> None:
    watch = LineageWatch()
    watch.known = Lineage("7001", "00000001")
    watch.changed = Lineage("7001", "0000000A")
    assert watch.describe() == "timeline 1 -> 10"
    assert not watch.another_cluster
    watch.changed = Lineage("7002", "00000001")
    assert watch.describe() == "another cluster: system identifier 7001 -> 7002"
    assert watch.another_cluster
    watch.accept()
    assert (watch.known, watch.changed) == (Lineage("7002", "00000001"), None)
    assert watch.describe() == "no change"
