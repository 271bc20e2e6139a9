"""
ExpiryClock: one timer for every session's token expiry.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from notifyd.expiry import ExpiryClock

from .conftest import TIMEOUT

NOW = 1_000_000.0


@dataclass(eq=False)
class FakeSession:
    name: str
    expiry_second: int | None = None


@dataclass
class Expired:
    sessions: list[FakeSession] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, session: FakeSession) -> None:
        self.sessions.append(session)
        self.event.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.sessions) < count:
                self.event.clear()
                await self.event.wait()


def make_clock(expired: Expired, leeway_s: float = 0.0) -> ExpiryClock[FakeSession]:
    return ExpiryClock(expired, leeway_s=leeway_s, clock=lambda: NOW)


async def test_expired_sessions_are_reported_once_and_later_ones_are_not():
    expired = Expired()
    clock = make_clock(expired)
    due, also_due, later = FakeSession("due"), FakeSession("also-due"), FakeSession("later")
    clock.arm(later, NOW + 3600)
    clock.arm(due, NOW - 5)
    clock.arm(also_due, NOW - 5.5)
    await expired.wait_for(2)
    assert {s.name for s in expired.sessions} == {"due", "also-due"}
    assert len(clock) == 1 and later.expiry_second == NOW + 3600
    assert due.expiry_second is None
    clock.close()


async def test_disarmed_or_rearmed_session_does_not_expire_at_its_old_time():
    expired = Expired()
    clock = make_clock(expired)
    closed, refreshed, control = (
        FakeSession("closed"),
        FakeSession("refreshed"),
        FakeSession("control"),
    )
    clock.arm(closed, NOW - 1)
    clock.arm(refreshed, NOW - 1)
    clock.disarm(closed)
    clock.arm(refreshed, NOW + 600)
    # Armed after the others, in a second of its own: the timer has run for
    # theirs by the time it reports this one.
    clock.arm(control, NOW - 10)
    await expired.wait_for(1)
    await asyncio.sleep(0)  # let any other due callback run
    assert [s.name for s in expired.sessions] == ["control"]
    assert len(clock) == 1
    clock.close()


async def test_leeway_delays_expiry_and_infinite_expiry_never_arms():
    expired = Expired()
    clock = make_clock(expired, leeway_s=30)
    lenient, untimed = FakeSession("lenient"), FakeSession("untimed")
    clock.arm(lenient, NOW - 10)  # inside the leeway: not yet
    clock.arm(untimed, float("inf"))
    assert lenient.expiry_second == NOW + 20
    assert untimed.expiry_second is None
    assert len(clock) == 1
    clock.close()
    assert lenient.expiry_second is None and len(clock) == 0


async def test_seconds_are_rounded_up_so_no_session_expires_early():
    clock = make_clock(Expired())
    session = FakeSession("s")
    clock.arm(session, NOW + 0.2)
    assert session.expiry_second == NOW + 1
    clock.close()


async def test_seconds_left_behind_by_closed_sessions_do_not_pile_up():
    """Reconnecting clients with long tokens: the clock's queue stays the size of what is armed."""
    clock = make_clock(Expired())
    for i in range(10_000):
        session = FakeSession(f"s{i}")
        clock.arm(session, NOW + 3600 + i)
        clock.disarm(session)
    kept = FakeSession("kept")
    clock.arm(kept, NOW + 7200)
    assert len(clock) == 1
    assert len(clock._seconds) <= 2 * 1 + 64 + 1
    clock.close()


async def test_a_failing_expiry_callback_does_not_stop_later_expiries():
    seen: list[str] = []
    done = asyncio.Event()

    def on_expire(session: FakeSession) -> None:
        seen.append(session.name)
        if session.name == "bad":
            raise RuntimeError("callback failed")
        done.set()

    clock: ExpiryClock[FakeSession] = ExpiryClock(on_expire, clock=lambda: NOW)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        # Both due; the timer reaches "bad" first, and its callback raises.
        clock.arm(FakeSession("bad"), NOW - 5)
        clock.arm(FakeSession("next"), NOW - 4)
        async with asyncio.timeout(TIMEOUT):
            await done.wait()
    finally:
        loop.set_exception_handler(None)
        clock.close()
    assert seen == ["bad", "next"]
    assert errors and isinstance(errors[0].get("exception"), RuntimeError)
