"""
Unit tests for :mod:`notifyd.outbox`: FIFO order, the message and byte
bounds, and overflow into a single resync frame. Pure: no I/O.
"""

from __future__ import annotations

import json
import random

from notifyd.outbox import Outbox
from notifyd.protocol import PONG, encode_resync


def message(n: int, pad: int = 0) -> tuple[str, str]:
    """
    A message-like frame and its cursor; ``pad`` adds characters to the frame.
    """
    cursor = f"{n}-{n}"
    return json.dumps(
        {"event": "message", "cursor": cursor, "id": str(n), "pad": "x" * pad}
    ), cursor


def drain(outbox: Outbox) -> list[str]:
    """
    Every queued frame, oldest first.
    """
    frames = []
    while (frame := outbox.get()) is not None:
        frames.append(frame)
    return frames


def test_empty_outbox_returns_none() -> None:
    """get() on an empty outbox returns None and nothing is queued."""
    outbox = Outbox(10, 10_000)
    assert outbox.get() is None
    assert len(outbox) == 0
    assert outbox.queued_chars == 0


def test_frames_come_out_in_fifo_order() -> None:
    """Frames within the bounds come out in the order they were put, control frames included."""
    outbox = Outbox(10, 10_000)
    frames = [message(1), (PONG, None), message(2), message(3)]
    for frame, cursor in frames:
        assert outbox.put(frame, cursor) is True
    assert len(outbox) == 4
    assert drain(outbox) == [frame for frame, _ in frames]
    assert outbox.overflows == 0


def test_queued_chars_tracks_puts_and_returns_to_zero_after_draining() -> None:
    """queued_chars is the sum of queued frame lengths and is 0 once drained."""
    outbox = Outbox(10, 10_000)
    frames = [message(1)[0], PONG, message(2, pad=100)[0]]
    total = 0
    for frame in frames:
        outbox.put(frame)
        total += len(frame)
        assert outbox.queued_chars == total
    outbox.get()
    assert outbox.queued_chars == total - len(frames[0])
    drain(outbox)
    assert outbox.queued_chars == 0


def test_message_bound_is_inclusive() -> None:
    """Exactly max_messages frames fit without overflow."""
    outbox = Outbox(3, 10_000)
    for n in range(3):
        assert outbox.put(*message(n)) is True
    assert len(outbox) == 3
    assert outbox.overflows == 0


def test_message_bound_overflow_leaves_one_resync_at_the_overflowing_cursor() -> None:
    """Putting one message past max_messages leaves only a resync at that message's cursor."""
    outbox = Outbox(3, 10_000)
    for n in range(3):
        outbox.put(*message(n))
    frame, cursor = message(3)
    assert outbox.put(frame, cursor) is False
    assert outbox.overflows == 1
    assert drain(outbox) == [encode_resync(cursor)]
    assert outbox.queued_chars == 0


def test_byte_bound_is_inclusive() -> None:
    """Frames whose lengths add up to exactly max_bytes fit without overflow."""
    first, second = message(1)[0], message(2, pad=10)[0]
    outbox = Outbox(100, len(first) + len(second))
    assert outbox.put(first, "1-1") is True
    assert outbox.put(second, "2-2") is True
    assert outbox.overflows == 0
    assert outbox.queued_chars == outbox.max_bytes


def test_byte_bound_overflow_leaves_one_resync_at_the_overflowing_cursor() -> None:
    """One character past max_bytes overflows, even with few messages queued."""
    first, second = message(1)[0], message(2, pad=11)[0]
    outbox = Outbox(100, len(first) + len(second) - 1)
    assert outbox.put(first, "1-1") is True
    assert outbox.put(second, "2-2") is False
    assert outbox.overflows == 1
    assert drain(outbox) == [encode_resync("2-2")]


def test_a_single_frame_bigger_than_max_bytes_overflows_an_empty_queue() -> None:
    """A message frame larger than the whole byte bound is replaced by a resync."""
    frame, cursor = message(1, pad=500)
    outbox = Outbox(100, 100)
    assert outbox.put(frame, cursor) is False
    assert drain(outbox) == [encode_resync(cursor)]


def test_frames_after_an_overflow_queue_behind_the_resync() -> None:
    """After an overflow, new frames are queued after the resync in order."""
    outbox = Outbox(3, 10_000)
    for n in range(4):
        outbox.put(*message(n))
    later = [message(4), (PONG, None)]
    for frame, cursor in later:
        assert outbox.put(frame, cursor) is True
    assert drain(outbox) == [encode_resync("3-3")] + [frame for frame, _ in later]


def test_second_overflow_resyncs_at_the_newest_cursor() -> None:
    """A second overflow replaces the old resync with one at the newest message cursor."""
    outbox = Outbox(2, 10_000)
    for n in range(3):
        outbox.put(*message(n))  # third overflows: [resync 2-2]
    outbox.put(*message(3))  # [resync 2-2, m3]
    assert outbox.put(*message(4)) is False
    assert outbox.overflows == 2
    assert drain(outbox) == [encode_resync("4-4")]


def test_overflowing_control_frame_is_kept_after_the_resync() -> None:
    """A control frame that overflows is queued after the resync at the newest message cursor."""
    outbox = Outbox(3, 10_000)
    for n in range(3):
        outbox.put(*message(n))
    assert outbox.put(PONG) is False
    assert outbox.overflows == 1
    assert drain(outbox) == [encode_resync("2-2"), PONG]


def test_overflowing_control_frame_without_any_message_is_kept_alone() -> None:
    """With no message cursor ever seen, an overflow keeps just the control frame, no resync."""
    outbox = Outbox(2, 10_000)
    outbox.put(PONG)
    outbox.put(PONG)
    error = '{"event":"error","code":"invalid","message":"x"}'
    assert outbox.put(error) is False
    assert outbox.overflows == 1
    assert drain(outbox) == [error]


def test_overflows_counts_every_overflowing_put() -> None:
    """overflows increases by one per put that did not fit, and put returns False exactly then."""
    outbox = Outbox(1, 10_000)
    results = [outbox.put(*message(n)) for n in range(5)]
    # m0 fits; each later put finds the queue full (m0, then a resync) and overflows.
    assert results == [True, False, False, False, False]
    assert outbox.overflows == 4
    assert drain(outbox) == [encode_resync("4-4")]


def test_outbox_invariants_on_random_puts_and_gets() -> None:
    """Over 3000 random operations, a simple model predicts every frame that comes out."""
    rng = random.Random(0)
    outbox = Outbox(8, 600)
    model: list[str] = []
    newest: str | None = None
    overflows = 0
    for step in range(3000):
        if rng.random() < 0.6:
            if rng.random() < 0.8:
                frame, cursor = message(step, pad=rng.randrange(0, 150))
                newest = cursor
            else:
                frame, cursor = PONG, None
            fits = len(model) < 8 and sum(map(len, model)) + len(frame) <= 600
            assert outbox.put(frame, cursor) is fits
            if fits:
                model.append(frame)
            else:
                overflows += 1
                model = [encode_resync(newest)] if newest is not None else []
                if cursor is None:
                    model.append(frame)
        else:
            assert outbox.get() == (model.pop(0) if model else None)
        assert len(outbox) == len(model)
        assert outbox.queued_chars == sum(map(len, model))
        assert outbox.overflows == overflows
    assert overflows > 50  # the loop exercised overflow
