"""
Unit tests for :mod:`notifyd.cursor`: snapshot parsing and visibility, the
``covers`` relations, and the opaque cursor encoding. Pure: no I/O.
"""

from __future__ import annotations

import random
import re

import pytest

from notifyd.cursor import Cursor, Snapshot
from notifyd.exceptions import CursorError

URL_UNRESERVED = re.compile(r"[A-Za-z0-9\-._~]+")


def pg_visible_in_snapshot(xid: int, snapshot: Snapshot) -> bool:
    """
    Reference: Postgres' pg_visible_in_snapshot, written as its three rules.
    """
    if xid < snapshot.xmin:
        return True
    if xid >= snapshot.xmax:
        return False
    return xid not in snapshot.xip


def random_snapshot(rng: random.Random) -> Snapshot:
    """
    A consistent snapshot with small numbers, so xids around it can be probed.
    """
    xmin = rng.randrange(1, 60)
    xmax = xmin + rng.randrange(0, 25)
    span = range(xmin, xmax)
    xip = frozenset(rng.sample(span, rng.randrange(0, len(span) + 1))) if span else frozenset()
    return Snapshot(xmin, xmax, xip)


class History:
    """
    A toy transaction manager taking snapshots the way Postgres does.

    xids are assigned in order at begin; xmax is the latest completed xid + 1;
    xip are the running xids below xmax; xmin is the oldest of those (or xmax).
    Only commits happen, so "visible" equals "committed before the snapshot".
    """

    def __init__(self, first_xid: int = 3) -> None:
        self.next_xid = first_xid
        self.latest_completed = first_xid - 1
        self.running: set[int] = set()
        self.committed: set[int] = set()

    def begin(self) -> int:
        xid = self.next_xid
        self.next_xid += 1
        self.running.add(xid)
        return xid

    def commit(self, xid: int) -> None:
        self.running.remove(xid)
        self.committed.add(xid)
        self.latest_completed = max(self.latest_completed, xid)

    def snapshot(self) -> Snapshot:
        xmax = self.latest_completed + 1
        xip = frozenset(x for x in self.running if x < xmax)
        return Snapshot(min(xip, default=xmax), xmax, xip)


def random_history(rng: random.Random, steps: int) -> list[tuple[Snapshot, frozenset[int]]]:
    """
    Snapshots taken along a random history, each with the xids committed then.
    """
    history = History()
    taken = [(history.snapshot(), frozenset(history.committed))]
    for _ in range(steps):
        roll = rng.random()
        if roll < 0.4 or not history.running:
            history.begin()
        elif roll < 0.8:
            history.commit(rng.choice(sorted(history.running)))
        else:
            taken.append((history.snapshot(), frozenset(history.committed)))
    taken.append((history.snapshot(), frozenset(history.committed)))
    return taken


# --- Snapshot text form -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10:20:12,15", Snapshot(10, 20, frozenset({12, 15}))),
        ("5:5:", Snapshot(5, 5)),
        ("1:2:", Snapshot(1, 2)),
        ("7:9:7", Snapshot(7, 9, frozenset({7}))),
    ],
)
def test_from_pg_parses_postgres_text_and_to_pg_restores_it(text: str, expected: Snapshot) -> None:
    """from_pg reads Postgres' xmin:xmax:xip form and to_pg writes the same text back."""
    snapshot = Snapshot.from_pg(text)
    assert snapshot == expected
    assert snapshot.to_pg() == text


def test_to_pg_sorts_xip_numerically() -> None:
    """to_pg lists in-progress xids in ascending numeric order, as Postgres does."""
    assert Snapshot(2, 200, frozenset({100, 9, 30})).to_pg() == "2:200:9,30,100"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "a:b:",
        "10:20",
        "10:20:12,",
        "10:20:,12",
        "10:20:12;15",
        "-1:5:",
        "1:-5:",
        "1:5:-2",
        " 1:5:",
        "1:5: ",
        "1:5:\n",
        "10:20:9",  # xip below xmin
        "10:20:20",  # xip == xmax
        "10:20:25",  # xip above xmax
        "20:10:",  # xmin > xmax
        "1:20002:" + ",".join(str(x) for x in range(1, 10_002)),  # 10_001 xips
    ],
)
def test_from_pg_rejects_malformed_or_inconsistent_text(text: str) -> None:
    """Anything but a consistent xmin:xmax:xip snapshot raises CursorError."""
    with pytest.raises(CursorError):
        Snapshot.from_pg(text)


def test_from_pg_accepts_the_largest_allowed_xip_list() -> None:
    """Exactly 10_000 in-progress xids is still a valid snapshot."""
    text = "1:10001:" + ",".join(str(x) for x in range(1, 10_001))
    assert len(Snapshot.from_pg(text).xip) == 10_000


# --- visibility -------------------------------------------------------------


@pytest.mark.parametrize(
    ("xid", "visible"),
    [
        (1, True),  # far below xmin
        (9, True),  # just below xmin
        (10, True),  # == xmin, not in progress
        (11, True),
        (12, False),  # in progress
        (13, True),
        (15, False),  # in progress
        (19, True),  # just below xmax
        (20, False),  # == xmax
        (21, False),  # beyond xmax
    ],
)
def test_visible_matches_pg_visible_in_snapshot_table(xid: int, visible: bool) -> None:
    """visible() follows pg_visible_in_snapshot on the snapshot 10:20:12,15."""
    snapshot = Snapshot.from_pg("10:20:12,15")
    assert snapshot.visible(xid) is visible


def test_visible_of_empty_range_snapshot_is_below_xmax() -> None:
    """In 5:5: every xid below 5 is visible and none from 5 on."""
    snapshot = Snapshot.from_pg("5:5:")
    assert snapshot.visible(4)
    assert not snapshot.visible(5)
    assert not snapshot.visible(6)


def test_visible_matches_pg_visible_in_snapshot_on_random_snapshots() -> None:
    """On 2000 random snapshots, visible() agrees with the reference for every nearby xid."""
    rng = random.Random(0)
    for _ in range(2000):
        snapshot = random_snapshot(rng)
        for xid in range(0, snapshot.xmax + 3):
            assert snapshot.visible(xid) == pg_visible_in_snapshot(xid, snapshot), (snapshot, xid)


# --- Snapshot.covers --------------------------------------------------------


def test_snapshot_covers_itself() -> None:
    """A snapshot covers itself, with or without in-progress xids."""
    for text in ("5:5:", "10:20:12,15", "1:1000:3,500,999"):
        snapshot = Snapshot.from_pg(text)
        assert snapshot.covers(snapshot)


def test_later_snapshot_covers_earlier_after_a_commit() -> None:
    """After 12 commits, the later snapshot covers the earlier but not the reverse."""
    earlier = Snapshot.from_pg("10:20:12,15")
    later = Snapshot.from_pg("10:20:15")
    assert later.covers(earlier)
    assert not earlier.covers(later)


def test_earlier_snapshot_does_not_cover_one_with_a_higher_xmax() -> None:
    """A commit at or beyond the earlier xmax makes the earlier snapshot not cover the later."""
    earlier = Snapshot.from_pg("10:20:12")
    later = Snapshot.from_pg("10:21:12")
    assert later.covers(earlier)
    assert not earlier.covers(later)


def test_snapshot_covers_when_a_new_in_progress_xid_appears() -> None:
    """Snapshots with the same committed set cover each other even if xip grew above."""
    history = History()
    a = history.begin()
    history.commit(a)
    first = history.snapshot()
    history.begin()  # starts, but is not visible to anyone yet
    second = history.snapshot()
    assert first.covers(second)
    assert second.covers(first)


def test_covers_on_time_ordered_snapshots_is_exact() -> None:
    """Along random histories, later covers earlier; earlier covers later iff nothing committed between."""
    rng = random.Random(0)
    for _ in range(300):
        taken = random_history(rng, rng.randrange(1, 40))
        for i, (earlier, committed_then) in enumerate(taken):
            for later, committed_later in taken[i:]:
                assert later.covers(earlier), (earlier, later)
                assert earlier.covers(later) == (committed_then == committed_later), (
                    earlier,
                    later,
                )


def test_history_snapshots_see_exactly_the_committed_xids() -> None:
    """The toy history's snapshots make visible() equal "committed before" (sanity of the model)."""
    rng = random.Random(0)
    for _ in range(200):
        for snapshot, committed in random_history(rng, rng.randrange(1, 40)):
            for xid in range(3, snapshot.xmax + 5):
                assert snapshot.visible(xid) == (xid in committed), (snapshot, xid)


def test_covers_is_sound_on_random_snapshot_pairs() -> None:
    """Whenever a.covers(b), every xid visible in b is visible in a (2000 random pairs)."""
    rng = random.Random(0)
    claimed = 0
    for _ in range(2000):
        a, b = random_snapshot(rng), random_snapshot(rng)
        if rng.random() < 0.3:
            b = Snapshot(a.xmin, a.xmax, frozenset(x for x in a.xip if rng.random() < 0.7))
        if a.covers(b):
            claimed += 1
            for xid in range(0, max(a.xmax, b.xmax) + 3):
                if b.visible(xid):
                    assert a.visible(xid), (a, b, xid)
    assert claimed > 100  # the loop actually exercised the positive case


# --- Cursor encoding --------------------------------------------------------

SIMPLE = Cursor(Snapshot(10, 20, frozenset({12, 15})))
COMPOUND = Cursor(Snapshot(10, 20, frozenset({12, 15})), Snapshot(15, 25, frozenset({15, 22})), 7)


@pytest.mark.parametrize(
    "cursor",
    [
        SIMPLE,
        COMPOUND,
        Cursor(Snapshot(5, 5)),
        Cursor(Snapshot(5, 5), Snapshot(5, 5), 0),
        Cursor(Snapshot(1, 2), Snapshot(3, 3), 10**18),
    ],
)
def test_cursor_encode_decode_round_trip(cursor: Cursor) -> None:
    """decode(encode(c)) == c for simple and compound cursors."""
    assert Cursor.decode(cursor.encode()) == cursor


def test_cursor_encoding_is_the_documented_shape() -> None:
    """Simple cursors encode as xmin-xmax.xip…; compound ones join base, end and seq with '_'."""
    assert SIMPLE.encode() == "10-20.12.15"
    assert COMPOUND.encode() == "10-20.12.15_15-25.15.22_7"


def test_cursor_round_trip_and_url_safety_on_random_cursors() -> None:
    """2000 random simple and compound cursors round-trip and use only URL-unreserved characters."""
    rng = random.Random(0)
    for _ in range(2000):
        taken = random_history(rng, rng.randrange(1, 30))
        base = rng.choice(taken)[0]
        if rng.random() < 0.5:
            cursor = Cursor(base)
        else:
            later = [s for s, _ in taken if s.covers(base)]
            cursor = Cursor(base, rng.choice(later), rng.randrange(0, 10**12))
        text = cursor.encode()
        assert URL_UNRESERVED.fullmatch(text), text
        assert Cursor.decode(text) == cursor


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "10-20.12.15_",  # two parts
        "10-20_10-20",  # two parts
        "10-20_10-20_1_2",  # four parts
        "10-20_10-20_x",  # non-digit seq
        "10-20_10-20_-1",  # negative seq
        "10-20_10-20_",  # empty seq
        "10-20_10-20_١٢",  # Arabic-Indic digits as seq
        "10-20_10-20_²",  # superscript digit as seq
        "10-20.12.15_10-20.12_7_",  # trailing separator
        "10:20:12,15",  # Postgres text, not a token
        "20-10",  # xmin > xmax
        "10-20.25",  # xip outside [xmin, xmax)
        "10-20.9",
        "10-20.20",
        "10-20..12",
        "10-20.",
        "-10-20",
        "10--20",
        "10-20.12.15_10-19.12.15_3",  # end precedes base (lower xmax)
        "10-20.15_10-20.12.15_3",  # end still has 12 in progress, base saw it commit
        " 10-20",
        "10-20\n",
    ],
)
def test_cursor_decode_rejects_malformed_text(text: str) -> None:
    """Malformed or inconsistent cursor text raises CursorError."""
    with pytest.raises(CursorError):
        Cursor.decode(text)


@pytest.mark.parametrize("value", [None, 12, b"10-20", ["10-20"]])
def test_cursor_decode_rejects_non_strings(value: object) -> None:
    """Non-str input raises CursorError, not TypeError or AttributeError."""
    with pytest.raises(CursorError):
        Cursor.decode(value)  # type: ignore[arg-type]


def _big_simple_token(entries: int) -> str:
    """A consistent simple cursor with ``entries`` 19-digit in-progress xids."""
    xmin = 10**18
    xmax = xmin + entries + 1
    return f"{xmin}-{xmax}" + "".join(f".{x}" for x in range(xmin, xmin + entries))


def test_cursor_decode_rejects_overly_long_text() -> None:
    """A cursor over 200_000 characters is rejected even when it is otherwise consistent."""
    text = _big_simple_token(10_000)
    assert len(text) > 200_000
    with pytest.raises(CursorError):
        Cursor.decode(text)


def test_cursor_decode_accepts_long_text_within_limits() -> None:
    """A consistent cursor just under the length limit still decodes."""
    text = _big_simple_token(9_000)
    assert len(text) < 200_000
    assert len(Cursor.decode(text).base.xip) == 9_000


def test_cursor_decode_rejects_too_many_xips() -> None:
    """A snapshot token with more than 10_000 in-progress xids is rejected."""
    text = "1-10003" + "".join(f".{x}" for x in range(1, 10_002))
    assert len(text) < 200_000
    with pytest.raises(CursorError):
        Cursor.decode(text)


# Arabic-Indic digits, which str.isdigit() accepts, are the point here.
@pytest.mark.parametrize("text", ["١-٢", "10-20_١٢-٢٠_3", "١٠-٢٠.١٢"])  # noqa: RUF001
def test_cursor_decode_rejects_non_ascii_digits_in_snapshots(text: str) -> None:
    """Non-ASCII digits are rejected in snapshot tokens, as they are in seq."""
    with pytest.raises(CursorError):
        Cursor.decode(text)


@pytest.mark.parametrize(
    "text",
    [
        "1" * 4301 + "-" + "1" * 4301,  # snapshot numbers
        "1-2_1-2_" + "1" * 5000,  # seq
    ],
)
def test_cursor_decode_rejects_numbers_with_thousands_of_digits(text: str) -> None:
    """A cursor whose numbers are thousands of digits long raises CursorError."""
    assert len(text) < 200_000
    with pytest.raises(CursorError):
        Cursor.decode(text)


# --- Cursor construction and covers ------------------------------------------


def test_cursor_requires_end_and_seq_together() -> None:
    """Cursor(base, end, None) and Cursor(base, None, seq) raise ValueError."""
    base = Snapshot(5, 5)
    with pytest.raises(ValueError):
        Cursor(base, Snapshot(6, 6), None)
    with pytest.raises(ValueError):
        Cursor(base, None, 3)


@pytest.mark.parametrize(
    ("xact_id", "covered"),
    [(9, True), (10, True), (12, False), (15, False), (19, True), (20, False), (99, False)],
)
def test_simple_cursor_covers_exactly_base_visible_rows(xact_id: int, covered: bool) -> None:
    """A simple cursor covers a row iff base sees its transaction, whatever its seq."""
    for seq in (0, 1, 10**9):
        assert SIMPLE.covers(xact_id, seq) is covered


def test_compound_cursor_covers_base_visible_rows_at_any_seq() -> None:
    """Rows visible in base are covered even with a seq beyond the cursor's."""
    assert COMPOUND.base.visible(11)
    assert COMPOUND.covers(11, 6)
    assert COMPOUND.covers(11, 7)
    assert COMPOUND.covers(11, 10**9)


@pytest.mark.parametrize("xact_id", [12, 20, 24])
def test_compound_cursor_covers_end_only_rows_up_to_its_seq(xact_id: int) -> None:
    """Rows visible only in end are covered iff seq <= the cursor's seq."""
    assert not COMPOUND.base.visible(xact_id)
    assert COMPOUND.end is not None and COMPOUND.end.visible(xact_id)
    assert COMPOUND.covers(xact_id, 0)
    assert COMPOUND.covers(xact_id, 7)
    assert not COMPOUND.covers(xact_id, 8)


@pytest.mark.parametrize("xact_id", [15, 22, 25, 30])
def test_compound_cursor_never_covers_rows_invisible_in_end(xact_id: int) -> None:
    """Rows invisible in end are never covered, even with a small seq."""
    assert COMPOUND.end is not None and not COMPOUND.end.visible(xact_id)
    for seq in (0, 7, 8, 10**9):
        assert not COMPOUND.covers(xact_id, seq)


def test_cursor_covers_matches_its_definition_on_random_cursors() -> None:
    """On 2000 random cursors, covers() equals "visible in base, or visible in end with seq <= cursor seq"."""
    rng = random.Random(0)
    for _ in range(2000):
        taken = random_history(rng, rng.randrange(1, 30))
        base = rng.choice(taken)[0]
        later = [s for s, _ in taken if s.covers(base)]
        end = rng.choice(later) if rng.random() < 0.7 else None
        cursor_seq = rng.randrange(0, 20) if end is not None else None
        cursor = Cursor(base, end, cursor_seq)
        for xid in range(1, max(s.xmax for s, _ in taken) + 2):
            for seq in (0, 5, 10, 19, 20):
                expected = pg_visible_in_snapshot(xid, base) or (
                    end is not None
                    and cursor_seq is not None
                    and seq <= cursor_seq
                    and pg_visible_in_snapshot(xid, end)
                )
                assert cursor.covers(xid, seq) == expected, (cursor, xid, seq)


def test_window_cursors_encode_exactly_like_cursor() -> None:
    """The per-window fast encoder yields the same strings as Cursor.encode."""
    import random

    from notifyd.cursor import WindowCursors

    rng = random.Random(7)
    for _ in range(500):
        xmin = rng.randrange(1, 10_000)
        base = Snapshot(
            xmin, xmin + 5, frozenset(x for x in range(xmin, xmin + 5) if rng.random() < 0.3)
        )
        end = Snapshot(
            xmin + 3,
            xmin + 9,
            frozenset(x for x in range(xmin + 5, xmin + 9) if rng.random() < 0.3),
        )
        seq = rng.randrange(1, 10**9)
        fast = WindowCursors(base, end)
        assert fast.within(seq) == Cursor(base, end, seq).encode(at_seq=seq)
        assert fast.at_end(seq) == Cursor(end).encode(at_seq=seq)
        assert Cursor.decode(fast.within(seq)) == Cursor(base, end, seq)


def test_claims_of_rows_pushed_ahead_cover_their_transaction_up_to_their_seq() -> None:
    """Cursor(base, ahead={xact: seq}): base's rows, plus xact's rows up to seq, no more."""
    cursor = Cursor(Snapshot(10, 20, frozenset({15})), ahead=((15, 7), (21, 9)))
    assert cursor.covers(12, 1_000)  # visible in base
    assert cursor.covers(15, 7) and cursor.covers(15, 3)
    assert not cursor.covers(15, 8)
    assert cursor.covers(21, 9) and not cursor.covers(21, 10)
    assert not cursor.covers(22, 1)
    assert cursor.claims() == {15: 7, 21: 9}


def test_claims_round_trip_on_both_cursor_shapes_and_stay_url_safe() -> None:
    base = Snapshot(10, 20, frozenset({12}))
    end = Snapshot(10, 25, frozenset({12}))
    for cursor in (
        Cursor(base, ahead=((21, 9),)),
        Cursor(base, end, 30, ((22, 40), (26, 41))),
    ):
        text = cursor.encode(at_seq=41)
        assert re.fullmatch(r"[0-9A-Za-z_.~-]+", text)
        assert Cursor.decode(text) == cursor


def test_window_cursors_carry_a_clients_claims() -> None:
    """The fast encoder with a claims token gives Cursor.encode's text."""
    from notifyd.cursor import WindowCursors, claims_token

    base, end = Snapshot(10, 20, frozenset({12})), Snapshot(12, 30, frozenset({25}))
    claims = {31: 5, 26: 4}
    token = claims_token(claims)
    fast = WindowCursors(base, end)
    ahead = tuple(sorted(claims.items()))
    assert fast.within(3, token) == Cursor(base, end, 3, ahead).encode(at_seq=3)
    assert fast.at_end(3, token) == Cursor(end, ahead=ahead).encode(at_seq=3)


@pytest.mark.parametrize(
    "text",
    [
        "10-20_a",  # no claim
        "10-20_a15",  # no seq
        "10-20_a15-7.15-8",  # one transaction claimed twice
        "10-20_a0-7",  # transaction id 0
        "10-20_b15-7",  # not a claim
        "10-20_10-25_30_a15-7_a16-1",  # two claim parts
        "10-20_a" + ".".join(f"{x}-1" for x in range(100, 165)),  # more than 64
    ],
)
def test_cursor_decode_rejects_malformed_claims(text: str) -> None:
    with pytest.raises(CursorError):
        Cursor.decode(text)
