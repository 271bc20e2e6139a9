"""
Unit tests for :mod:`notifyd.routes`: what each HTTP path answers, as a
pure function of the request, the peer and the instance's vitals. The
same paths are exercised over real sockets in tests/test_ops.py and
tests/test_handshake.py.
"""

from __future__ import annotations

import json

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from notifyd.routes import Routes, WebSocketRoute
from notifyd.settings import Settings
from notifyd.vitals import ListenerVitals, Vitals

LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("203.0.113.9", 50000)


def vitals(*, alive: bool = True, ready: bool = True) -> Vitals:
    return Vitals(
        alive=alive,
        ready=ready,
        listener=ListenerVitals(
            connected=ready, probe_age_s=0.25, probe_rtt_s=0.0015, reconnects=2
        ),
        sessions=3,
        users=2,
        delivered=40,
    )


def routes(state: Vitals | None = None, **settings: object) -> Routes:
    current = state or vitals()
    return Routes(
        Settings(dsn="postgresql://unused", **settings),  # type: ignore[arg-type]
        lambda: current,
        lambda: b"notifyd_sessions 3.0\n",
    )


def get(path: str, method: str = "GET") -> Request:
    return Request(path, Headers(), method=method)


def test_healthz_is_200_while_alive_even_when_not_ready() -> None:
    """/healthz answers whether the process is up; readiness does not change it."""
    answer = routes(vitals(ready=False)).respond(get("/healthz"), LOOPBACK)
    assert isinstance(answer, Response)
    assert answer.status_code == 200
    body = json.loads(answer.body)
    assert body["status"] == "unavailable"
    assert body["listener"] == {
        "connected": False,
        "probe_age_s": 0.25,
        "probe_rtt_ms": 1.5,
        "reconnects": 2,
    }
    assert answer.headers["Cache-Control"] == "no-store"


def test_readyz_is_503_until_the_listen_path_is_proven() -> None:
    """/readyz follows vitals.ready: 503 when not ready, 200 when ready."""
    assert routes(vitals(ready=False)).respond(get("/readyz"), LOOPBACK).status_code == 503  # type: ignore[union-attr]
    assert routes(vitals(ready=True)).respond(get("/readyz"), LOOPBACK).status_code == 200  # type: ignore[union-attr]


def test_a_dead_task_makes_healthz_503() -> None:
    """A background task that died makes the process unhealthy."""
    answer = routes(vitals(alive=False, ready=False)).respond(get("/healthz"), LOOPBACK)
    assert isinstance(answer, Response) and answer.status_code == 503


def test_metrics_loopback_only_refuses_other_peers() -> None:
    """/metrics: the exposition to anyone by default; with metrics_loopback_only, 403 off-host."""
    served = routes().respond(get("/metrics"), REMOTE)
    assert isinstance(served, Response) and served.status_code == 200
    assert served.body == b"notifyd_sessions 3.0\n"
    guarded = routes(metrics_loopback_only=True)
    refused = guarded.respond(get("/metrics"), REMOTE)
    assert isinstance(refused, Response) and refused.status_code == 403
    local = guarded.respond(get("/metrics"), LOOPBACK)
    assert isinstance(local, Response) and local.status_code == 200


def test_the_push_endpoint_is_handed_on_with_its_path_user_and_query() -> None:
    """/ws/message and /ws/message/{userId} are not answered but handed to admission."""
    assert routes().respond(get("/ws/message?since=x"), REMOTE) == WebSocketRoute(None, "since=x")
    assert routes().respond(get("/ws/message/u%2042"), REMOTE) == WebSocketRoute("u 42", "")


def test_unknown_paths_are_404_and_other_methods_405() -> None:
    """Anything else is 404; a method other than GET is 405 with Allow: GET."""
    missing = routes().respond(get("/nothing"), REMOTE)
    assert isinstance(missing, Response) and missing.status_code == 404
    posted = routes().respond(get("/ws/message", method="POST"), REMOTE)
    assert isinstance(posted, Response) and posted.status_code == 405
    assert posted.headers["Allow"] == "GET"


def test_the_demo_page_exists_only_under_the_demo() -> None:
    """/ is the message center under `notifyd demo` and 404 under serve."""
    served = routes().respond(get("/"), REMOTE)
    assert isinstance(served, Response) and served.status_code == 404
    demo = Routes(
        Settings(dsn="postgresql://unused"),
        vitals,
        None,
        demo_users={"alice": "token-a"},
    )
    page = demo.respond(get("/?user=alice"), REMOTE)
    assert isinstance(page, Response) and page.status_code == 200
    assert b"notifyd-demo" in page.body
    assert demo.respond(get("/metrics"), LOOPBACK).status_code == 404  # type: ignore[union-attr]
