"""
Unit tests for :mod:`notifyd.hub`: the per-user registry of live sessions and
its per-user limit. Pure bookkeeping; tests are async only because a Session
creates an asyncio.Event.
"""

from __future__ import annotations

from notifyd.hub import Hub
from notifyd.outbox import Outbox
from notifyd.session import Session


def make_session(user: str = "u") -> Session:
    """
    A real Session over a stand-in connection (the hub never touches it).
    """
    return Session(connection=object(), user=user, outbox=Outbox(10, 10_000), send_timeout=1.0)  # type: ignore[arg-type]


async def test_empty_hub_has_no_sessions() -> None:
    """A new hub counts no sessions or users and knows no user."""
    hub = Hub(10)
    assert hub.session_count == 0
    assert hub.user_count == 0
    assert hub.sessions_of("u") is None
    assert list(hub) == []


async def test_add_registers_sessions_per_user_oldest_first() -> None:
    """Added sessions are found under their user, oldest first, and counted."""
    hub = Hub(10)
    a1, a2, b1 = make_session("a"), make_session("a"), make_session("b")
    for session in (a1, a2, b1):
        hub.add(session)
    assert hub.sessions_of("a") == [a1, a2]
    assert hub.sessions_of("b") == [b1]
    assert hub.sessions_of("c") is None
    assert hub.session_count == 3
    assert hub.user_count == 2
    assert all(s.close_code is None for s in (a1, a2, b1))


async def test_discard_unregisters_and_forgets_empty_users() -> None:
    """Discarding a user's last session removes the user; other sessions stay."""
    hub = Hub(10)
    a1, a2, b1 = make_session("a"), make_session("a"), make_session("b")
    for session in (a1, a2, b1):
        hub.add(session)
    assert hub.discard(a1) is False
    assert hub.sessions_of("a") == [a2]
    assert hub.session_count == 2
    assert hub.user_count == 2
    assert hub.discard(a2) is True
    assert hub.sessions_of("a") is None
    assert hub.session_count == 1
    assert hub.user_count == 1
    assert hub.sessions_of("b") == [b1]


async def test_discard_is_idempotent() -> None:
    """Discarding twice, or discarding a never-added session, changes nothing."""
    hub = Hub(10)
    a1, a2 = make_session("a"), make_session("a")
    hub.add(a1)
    hub.add(a2)
    hub.discard(a1)
    hub.discard(a1)
    hub.discard(make_session("a"))
    hub.discard(make_session("nobody"))
    assert hub.sessions_of("a") == [a2]
    assert hub.session_count == 1
    assert hub.user_count == 1


async def test_discard_does_not_close_the_session() -> None:
    """discard only unregisters; closing is the caller's business."""
    hub = Hub(10)
    session = make_session()
    hub.add(session)
    hub.discard(session)
    assert session.close_code is None


async def test_adding_beyond_the_limit_evicts_the_oldest_session() -> None:
    """The session past max_sessions_per_user unregisters the user's oldest and hands it back."""
    hub = Hub(2)
    first, second, third = make_session(), make_session(), make_session()
    assert hub.add(first) == []
    assert hub.add(second) == []
    assert hub.add(third) == [first]
    # Closing the evicted session is the caller's (the router's) business.
    assert first.close_code is None
    assert hub.sessions_of("u") == [second, third]
    assert hub.session_count == 2
    assert hub.user_count == 1


async def test_limit_is_per_user() -> None:
    """Another user's sessions neither count toward nor get replaced by this user's limit."""
    hub = Hub(1)
    a, b = make_session("a"), make_session("b")
    assert hub.add(a) == []
    assert hub.add(b) == []
    assert hub.session_count == 2
    assert hub.user_count == 2


async def test_limit_of_one_keeps_only_the_newest_session() -> None:
    """With max 1, each new session of a user replaces the previous one ("one session per user")."""
    hub = Hub(1)
    sessions = [make_session() for _ in range(4)]
    evicted = []
    for session in sessions:
        evicted += hub.add(session)
        assert hub.sessions_of("u") == [session]
        assert hub.session_count == 1
    assert evicted == sessions[:3]


async def test_discarding_a_replaced_session_is_harmless() -> None:
    """The replaced session's own cleanup (discard) does not remove its successor."""
    hub = Hub(1)
    old, new = make_session(), make_session()
    hub.add(old)
    hub.add(new)
    hub.discard(old)
    assert hub.sessions_of("u") == [new]
    assert hub.session_count == 1


async def test_iteration_yields_every_registered_session() -> None:
    """Iterating the hub yields each live session exactly once, and no replaced or discarded one."""
    hub = Hub(2)
    a1, a2, a3 = make_session("a"), make_session("a"), make_session("a")
    b1, c1 = make_session("b"), make_session("c")
    for session in (a1, b1, a2, c1, a3):
        hub.add(session)
    hub.discard(c1)
    listed = list(hub)
    assert len(listed) == hub.session_count == 3
    assert set(map(id, listed)) == {id(a2), id(a3), id(b1)}
