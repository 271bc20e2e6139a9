"""
Unit tests for :mod:`notifyd.collector`: live objects are frozen after
admissions, and frozen garbage cycles are collected once sessions close.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref
from collections.abc import Iterator

import pytest
import websockets

from notifyd.collector import Collector

from .conftest import TIMEOUT, http_get


class _Cycle:
    """An object that refers to itself, so only the collector can free it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_admissions_freeze_what_is_alive(thawed: None) -> None:
    """After sessions are admitted, live objects are out of the collector's walks."""
    collector = Collector(min_closed=10)
    assert gc.get_freeze_count() == 0
    assert collector.after_round(admitted=True, sessions=5, closed_total=0) is False
    assert gc.get_freeze_count() > 0


def test_a_round_without_admissions_freezes_nothing(thawed: None) -> None:
    collector = Collector(min_closed=10)
    assert collector.after_round(admitted=False, sessions=5, closed_total=0) is False
    assert gc.get_freeze_count() == 0


def test_frozen_garbage_cycles_are_collected_once_enough_sessions_closed(thawed: None) -> None:
    """A closed session's cycles frozen with it are freed when churn calls a full collection."""
    collector = Collector(min_closed=10)
    alive = _frozen_garbage(collector)
    gc.collect()
    assert alive() is not None  # frozen: the collector does not see it
    assert collector.after_round(admitted=False, sessions=5, closed_total=9) is False
    assert alive() is not None
    assert collector.after_round(admitted=False, sessions=5, closed_total=10) is True
    assert alive() is None
    assert collector.full_collections == 1


def test_doubling_sessions_calls_a_full_collection(thawed: None) -> None:
    collector = Collector(min_closed=10)
    alive = _frozen_garbage(collector)
    assert collector.after_round(admitted=True, sessions=19, closed_total=0) is False
    assert alive() is not None
    assert collector.after_round(admitted=True, sessions=20, closed_total=0) is True
    assert alive() is None


def test_a_churn_collection_that_finds_nothing_doubles_the_churn_for_the_next(
    thawed: None,
) -> None:
    """Closed sessions that leave no cycles make full collections (pauses) rarer, up to a cap."""
    collector = Collector(min_closed=10, max_backoff=4)
    gc.collect()  # what earlier tests left is not this collector's to find
    assert collector.after_round(admitted=False, sessions=5, closed_total=10) is True
    assert collector.last_freed_blocks < 10
    assert collector.after_round(admitted=False, sessions=5, closed_total=29) is False
    assert collector.after_round(admitted=False, sessions=5, closed_total=30) is True
    assert collector.after_round(admitted=False, sessions=5, closed_total=69) is False
    assert collector.after_round(admitted=False, sessions=5, closed_total=70) is True
    # Capped at four times the base, however many collections find nothing.
    assert collector.after_round(admitted=False, sessions=5, closed_total=109) is False
    assert collector.after_round(admitted=False, sessions=5, closed_total=110) is True
    assert collector.backoff == 4
    assert collector.full_collections == 4


def _backed_off_once() -> Collector:
    """A collector whose first churn collection (10 closed) found nothing to free."""
    collector = Collector(min_closed=10)
    gc.collect()
    assert collector.after_round(admitted=False, sessions=5, closed_total=10) is True
    assert collector.backoff == 2
    return collector


def test_a_churn_collection_that_finds_cycles_brings_the_next_back_to_the_base(
    thawed: None,
) -> None:
    """Once closed sessions leave cycles again, collections come as often as at first."""
    collector = _backed_off_once()
    cycles = [_frozen_garbage(collector) for _ in range(25)]
    assert collector.after_round(admitted=False, sessions=5, closed_total=30) is True
    assert all(alive() is None for alive in cycles)
    assert collector.last_freed_blocks >= 20
    assert collector.backoff == 1
    assert collector.after_round(admitted=False, sessions=5, closed_total=39) is False
    assert collector.after_round(admitted=False, sessions=5, closed_total=40) is True


class _SuspendedParser:
    """
    An object in a cycle with its own suspended generator, as websockets'
    protocol is with its parser: the collector frees it by finalizing the
    generator, and ``gc.collect()`` counts nothing unreachable.
    """

    def __init__(self) -> None:
        self.parser = self._parse()
        next(self.parser)
        self.buffers = [bytearray(16) for _ in range(4)]

    def _parse(self) -> Iterator[None]:
        while True:
            yield


def test_cycles_through_suspended_generators_count_as_what_a_collection_freed(
    thawed: None,
) -> None:
    """What decides is the memory a collection frees, not the objects it counts as unreachable."""
    collector = _backed_off_once()
    parsers = [_SuspendedParser() for _ in range(25)]
    alive = weakref.ref(parsers[0])
    collector.after_round(admitted=True, sessions=5, closed_total=10)  # frozen with them
    del parsers
    assert alive() is not None
    assert collector.after_round(admitted=False, sessions=5, closed_total=30) is True
    assert alive() is None
    assert collector.last_freed_blocks >= 20
    assert collector.backoff == 1


def test_a_stopping_instance_closing_every_session_calls_no_full_collection(
    thawed: None,
) -> None:
    """Once stopped, closes that would call a full collection call none, nor freeze."""
    collector = Collector(min_closed=10)
    alive = _frozen_garbage(collector)
    collector.stop()
    assert collector.after_round(admitted=False, sessions=0, closed_total=5000) is False
    assert collector.after_round(admitted=True, sessions=10_000, closed_total=5000) is False
    assert alive() is not None
    assert collector.full_collections == 0


def test_release_hands_everything_back(thawed: None) -> None:
    collector = Collector(min_closed=10)
    collector.after_round(admitted=True, sessions=5, closed_total=0)
    Collector.release()
    assert gc.get_freeze_count() == 0


def _frozen_garbage(collector: Collector) -> weakref.ref[_Cycle]:
    """
    A reference cycle frozen by an admission round (5 sessions), then
    dropped: garbage only a thawing full collection can free.
    """
    cycle = _Cycle()
    alive = weakref.ref(cycle)
    collector.after_round(admitted=True, sessions=5, closed_total=0)
    del cycle
    return alive


async def test_a_closed_session_is_freed_without_waiting_for_a_collection(daemon) -> None:
    """
    A closed connection's protocol is freed by reference counting as soon as
    the connection is lost, not left in a cycle for the next full collection
    (which, with the sessions frozen, comes only after many have closed).
    """
    gc.disable()
    try:
        protocols = []
        for n in range(5):
            user = f"closer-{n}"
            async with websockets.connect(daemon.url(user)) as ws:
                json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                [session] = daemon.daemon.hub.sessions_of(user) or []
                protocols.append(weakref.ref(session.connection.protocol))
                del session
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while any(protocol() is not None for protocol in protocols):
            left = sum(protocol() is not None for protocol in protocols)
            assert asyncio.get_running_loop().time() < deadline, (
                f"{left} closed sessions wait for a collection"
            )
            await asyncio.sleep(0.01)
    finally:
        gc.enable()


async def test_health_and_metrics_count_the_full_collections_that_churn_calls(daemon) -> None:
    """
    Each full collection pauses the loop, so /healthz and /metrics count
    them: 256 closed sessions (the default ``min_closed``) call the first.
    """
    health = json.loads(await http_get(f"http://127.0.0.1:{daemon.port}/healthz"))
    assert health["full_collections"] == 0

    async def open_and_close(n: int) -> None:
        async with websockets.connect(daemon.url(f"churn-{n}")) as ws:
            json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))

    for batch in range(0, 260, 20):
        await asyncio.gather(*(open_and_close(n) for n in range(batch, batch + 20)))
    deadline = time.monotonic() + TIMEOUT
    while health["full_collections"] == 0 and time.monotonic() < deadline:
        await open_and_close(1000)  # an admission: the round after it may collect
        health = json.loads(await http_get(f"http://127.0.0.1:{daemon.port}/healthz"))
    assert health["full_collections"] == 1, health
    metrics = (await http_get(f"http://127.0.0.1:{daemon.port}/metrics")).decode()
    assert "notifyd_full_collections_total 1.0" in metrics
