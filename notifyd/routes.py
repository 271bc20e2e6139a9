"""
The HTTP paths on the WebSocket port: what each request is answered.

A pure function of the request, the peer's address and two read-only views
of the instance (its :class:`~notifyd.vitals.Vitals` and its metrics text):

* the static browser client and demo page files (:mod:`notifyd.static`);
* ``/healthz`` (the process is up) and ``/readyz`` (the LISTEN path is
  proven), as JSON; ``/healthz?tasks`` adds the answering process's
  running asyncio tasks counted by kind, the one thing read from the loop,
  and ``/healthz?heap`` what its interpreter holds;
* ``/metrics`` in the Prometheus text format (loopback only by default);
* ``/`` the demo message center, under ``notifyd demo`` only;
* ``/ws/message`` and ``/ws/message/{userId}``: not answered here, but
  handed on as a :class:`WebSocketRoute` to admission;
* anything else: 404; a method other than GET: 405.

A new HTTP path is added here.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from . import static
from .credentials import user_from_path
from .settings import Settings
from .vitals import Vitals, heap_census, task_census

__all__ = [
    "METRICS_CONTENT_TYPE",
    "Routes",
    "WebSocketRoute",
    "is_loopback_address",
    "plain_response",
]

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class WebSocketRoute:
    """
    A request for the push endpoint: the user its path names (if any) and
    its query string, for admission.
    """

    path_user: str | None
    query_string: str


class Routes:
    """
    Answers the HTTP paths; hands the WebSocket ones on.
    """

    def __init__(
        self,
        settings: Settings,
        vitals: Callable[[], Vitals],
        metrics: Callable[[], bytes] | None,
        demo_users: Mapping[str, str] | None = None,
    ) -> None:
        """
        ``metrics`` renders the exposition (None: ``/metrics`` is 404);
        ``demo_users`` (user -> token) turns on the demo page at ``/``.
        """
        self._settings = settings
        self._vitals = vitals
        self._metrics = metrics
        self._demo_users = demo_users
        self._metrics_loopback_only = settings.metrics_loopback_only

    def respond(self, request: Request, peer: Any) -> Response | WebSocketRoute:
        """
        The answer to ``request`` from ``peer`` (a socket address tuple).
        """
        path, _, query_string = request.path.partition("?")
        if static.handles(path):
            answer = static.serve(request, path, self._settings)
            if answer is not None:
                return answer
        if getattr(request, "method", "GET") != "GET":
            # Before any token is looked at: only GET upgrades or reads.
            response = plain_response(http.HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n")
            response.headers["Allow"] = "GET"
            return response
        if path == "/healthz":
            asked = parse_qs(query_string, keep_blank_values=True)
            return self._health(ready=False, tasks="tasks" in asked, heap="heap" in asked)
        if path == "/readyz":
            return self._health(ready=True)
        if path == "/metrics":
            return self._metrics_text(peer)
        if path == "/" and self._demo_users is not None:
            chosen = parse_qs(query_string).get("user")
            page = static.demo_page(self._demo_users, chosen[-1] if chosen else None)
            return static.to_response(page)
        route = user_from_path(path)
        if route is None:
            return plain_response(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        return WebSocketRoute(route[1], query_string)

    def _health(self, *, ready: bool, tasks: bool = False, heap: bool = False) -> Response:
        """
        ``/healthz``: the process is up (200 unless a task died).
        ``/readyz``: the LISTEN path is proven (200) or not (503).
        For finding what grows, and not on by default as each walks a whole
        set: ``tasks`` adds the running tasks by kind (``/healthz?tasks``),
        ``heap`` what the interpreter holds (``/healthz?heap``).
        """
        vitals = self._vitals()
        ok = vitals.ready if ready else vitals.alive
        status = http.HTTPStatus.OK if ok else http.HTTPStatus.SERVICE_UNAVAILABLE
        report = vitals.health_report()
        if tasks:
            report["task_kinds"] = task_census(asyncio.all_tasks())
        if heap:
            report["python_heap"] = heap_census()
        body = json.dumps(report) + "\n"
        return _uncached(status, body.encode(), "application/json")

    def _metrics_text(self, peer: Any) -> Response:
        if self._metrics is None:
            return plain_response(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        if self._metrics_loopback_only and not is_loopback_address(peer):
            return plain_response(http.HTTPStatus.FORBIDDEN, "Forbidden\n")
        return _uncached(http.HTTPStatus.OK, self._metrics(), METRICS_CONTENT_TYPE)


def plain_response(status: http.HTTPStatus, text: str) -> Response:
    """
    A plain-text answer that closes the connection, as websockets' own
    refusals are.
    """
    body = text.encode()
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "text/plain; charset=utf-8"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _uncached(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    """
    An answer that is never cached (health and metrics change every second).
    """
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def is_loopback_address(address: Any) -> bool:
    """
    Whether a peer address tuple comes from this machine (for /metrics).
    """
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except (TypeError, ValueError, IndexError):
        return False
