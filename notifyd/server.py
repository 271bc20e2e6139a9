"""
The WebSocket endpoints and the handshake decisions, on one port.

* ``/ws/message`` and ``/ws/message/{userId}``: the push endpoint;
* ``/healthz``: a plain GET health check.

Before the upgrade, a handshake must pass the per-address limits (429) and
the origin allow-list (403). A token in the handshake (``?token=``,
``Authorization: Bearer``, a ``bearer.<token>`` subprotocol entry, or the
configured cookie) is checked then: 401 when invalid, 403 when the path names
another user. Without one, the connection is upgraded and the first frame
must be ``{"action":"auth",...}`` within ``auth_timeout_s``.

Once open, a session is closed with 4401 when its token expires (unless a
``refresh`` frame brought a new one), with 1008 when it sends frames faster
than ``client_frames_per_s``, and with 1009 for a frame over
``max_frame_bytes``; see ``docs/security.md``.
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import json
import logging
import math
import random
import ssl
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from . import protocol, static
from .auth import (
    SUBPROTOCOL,
    Identity,
    TokenVerifier,
    bearer_subprotocol,
    offered_subprotocols,
    token_from_handshake,
    user_from_path,
)
from .db import Database
from .delivery import Delivery
from .exceptions import AuthError, ConfigError, DatabaseError, ProtocolError
from .expiry import ExpiryClock
from .hub import Hub
from .limits import AddressCounter, AddressRateLimiter, TokenBucket, address_key
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import render_metrics
from .origin import OriginPolicy
from .outbox import Outbox
from .protocol import CloseCode, close_reason
from .session import Session
from .settings import Settings
from .stats import Stats

__all__ = ["PushServer"]

logger = logging.getLogger(__name__)

# How long a history request waits for one of the max_concurrent_history
# slots before it is answered "busy": long enough to ride out a burst of
# page loads, short enough that the client's own retry is not delayed.
_HISTORY_WAIT_S = 2.0
# A limit that keeps tripping (a flood) is logged at most this often.
_TRIP_LOG_INTERVAL_S = 10.0


@dataclass(slots=True)
class _Handshake:
    """
    What the handshake decided, handed to the connection handler.
    """

    identity: Identity | None
    path_user: str | None
    since: str | None


class PushServer:
    """
    Accepts WebSocket sessions and hands them to delivery.
    """

    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier | None,
        hub: Hub,
        delivery: Delivery,
        database: Database,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        metrics: CollectorRegistry | None = None,
        stats: Stats | None = None,
        demo_users: dict[str, str] | None = None,
    ) -> None:
        self._settings = settings
        # notifyd demo only: user -> token. Enables the message center at /
        # and the demo_send action; None (serve) leaves both out entirely.
        self._demo_users = dict(demo_users) if demo_users is not None else None
        self.verifier = verifier
        self._hub = hub
        self._delivery = delivery
        self._db = database
        self._health = health
        self._metrics = metrics
        self._stats = stats if stats is not None else Stats()
        # Weak, so a handshake that fails after process_request leaks nothing.
        self._handshakes: weakref.WeakKeyDictionary[ServerConnection, _Handshake] = (
            weakref.WeakKeyDictionary()
        )
        self._server: Server | None = None
        self._sessions: set[Session] = set()
        self._origins = OriginPolicy.from_list(
            settings.allowed_origins, require=settings.require_origin
        )
        self._handshake_rate = AddressRateLimiter(settings.handshakes_per_s_per_address)
        self._per_address = AddressCounter(settings.max_connections_per_address)
        self._history_slots = asyncio.Semaphore(settings.max_concurrent_history)
        self._expiries: ExpiryClock[Session] = ExpiryClock(
            self._expire, leeway_s=verifier.leeway_s if verifier is not None else 0.0
        )
        self._revocation_arity = 0
        self._trip_logged: dict[str, float] = {}

    @property
    def port(self) -> int:
        """
        The bound TCP port (useful with port 0).
        """
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """
        Bind and start accepting connections.
        """
        settings = self._settings
        if settings.revocation_sql:
            self._revocation_arity = await self._db.revocation_arity(settings.revocation_sql)
        self._server = await serve(
            self._handle,
            settings.host,
            settings.port,
            ssl=tls_context(settings),
            process_request=self._process_request,
            process_response=_answer_subprotocol,
            compression="deflate" if settings.compression else None,
            max_size=settings.max_frame_bytes,
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            close_timeout=5,
            server_header="notifyd",
        )
        scheme = "wss" if settings.tls_cert_file else "ws"
        logger.info("listening on %s://%s:%d/ws/message", scheme, settings.host, self.port)

    def stop_accepting(self) -> None:
        """
        Stop accepting new connections; sessions stay open.
        """
        if self._server is not None:
            self._server.close(close_connections=False)

    async def close_sessions(self, code: CloseCode, timeout: float) -> None:
        """
        Close every session with ``code`` and wait (bounded) until they are.
        """
        for session in list(self._sessions):
            session.close(code, _restart_reason(code))
        if self._server is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self._server.wait_closed()
            except TimeoutError:
                logger.warning("sessions did not close within %.1fs; aborting them", timeout)
                for connection in list(self._server.connections):
                    if connection.transport is not None:
                        connection.transport.abort()
        self._expiries.close()

    # -- handshake ---------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, query_string = request.path.partition("?")
        if static.handles(path):
            return static.serve(request, path, self._settings)
        if getattr(request, "method", "GET") != "GET":
            # Before any token is looked at: only GET upgrades or reads.
            response = connection.respond(
                http.HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n"
            )
            response.headers["Allow"] = "GET"
            return response
        if path == "/healthz":
            return self._respond_health(connection, ready=False)
        if path == "/readyz":
            return self._respond_health(connection, ready=True)
        if path == "/metrics":
            return self._respond_metrics(connection)
        if path == "/" and self._demo_users is not None:
            chosen = parse_qs(query_string).get("user")
            page = static.demo_page(self._demo_users, chosen[-1] if chosen else None)
            return static.to_response(page)
        route = user_from_path(path)
        if route is None:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        _, path_user = route
        address = address_key(_address(connection))
        refused = self._admit(connection, request, address)
        if refused is not None:
            return refused
        query = {key: values[-1] for key, values in parse_qs(query_string).items()}
        since = query.get("since") or None
        token = token_from_handshake(
            query=query, headers=request.headers, cookie_name=self._settings.token_cookie
        )
        identity: Identity | None = None
        if token is not None:
            if self.verifier is None:
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
            try:
                identity = self.verifier.verify(token)
            except AuthError as exc:
                self._auth_failed(connection, exc.reason)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
            if path_user is not None and path_user != identity.user:
                self._auth_failed(connection, "path names another user")
                return connection.respond(http.HTTPStatus.FORBIDDEN, "Forbidden\n")
        elif self._settings.dev_insecure_user_from_path and path_user is not None:
            identity = Identity(path_user, float("inf"))
        if not self._per_address.acquire(address):
            self._limit_tripped("connections_per_address", address)
            return connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests\n")
        if self._per_address.limit > 0:
            # Released when the TCP connection is gone, whatever happens to
            # the handshake from here on.
            connection.connection_lost_waiter.add_done_callback(
                lambda _: self._per_address.release(address)
            )
        self._handshakes[connection] = _Handshake(identity, path_user, since)
        return None

    def _admit(
        self, connection: ServerConnection, request: Request, address: str
    ) -> Response | None:
        """
        The checks before any token is looked at: handshake rate, origin,
        subprotocol form. A refusal response, or None to go on.
        """
        if not self._handshake_rate.allow(address, time.monotonic()):
            self._limit_tripped("handshake_rate", address)
            return connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests\n")
        refusal = self._origins.refusal(request.headers.get_all("Origin"))
        if refusal is not None:
            self._auth_failed(connection, refusal)
            return connection.respond(http.HTTPStatus.FORBIDDEN, "Forbidden\n")
        offered = offered_subprotocols(request.headers)
        if bearer_subprotocol(offered) is not None and SUBPROTOCOL not in offered:
            # The browser would fail the handshake anyway (no protocol it
            # offered is selected); say why instead of upgrading.
            self._auth_failed(connection, "bearer subprotocol without notifyd.v1")
            return connection.respond(
                http.HTTPStatus.BAD_REQUEST, f"Offer {SUBPROTOCOL} with the bearer entry\n"
            )
        return None

    def _respond_health(self, connection: ServerConnection, *, ready: bool) -> Response:
        """
        ``/healthz``: the process is up (200 unless a task died).
        ``/readyz``: the LISTEN path is proven (200) or not (503).
        """
        able, details = self._health()
        ok = able if ready else details["alive"]
        status = http.HTTPStatus.OK if ok else http.HTTPStatus.SERVICE_UNAVAILABLE
        return _response(status, json.dumps(details) + "\n", "application/json")

    def _respond_metrics(self, connection: ServerConnection) -> Response:
        if self._metrics is None:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        if self._settings.metrics_loopback_only and not is_loopback_address(
            connection.remote_address
        ):
            return connection.respond(http.HTTPStatus.FORBIDDEN, "Forbidden\n")
        return _response(http.HTTPStatus.OK, render_metrics(self._metrics), METRICS_CONTENT_TYPE)

    # -- sessions ----------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        opened = await self._open_session(connection)
        if opened is None:
            return
        session, since = opened
        settings = self._settings
        # Made at the first client frame: most sessions only ever receive.
        frames: TokenBucket | None = None
        try:
            await self._delivery.join(session, since)
            async for data in connection:
                now = time.monotonic()
                if frames is None:
                    frames = TokenBucket.per_second(settings.client_frames_per_s, now)
                if not frames.take(now):
                    self._limit_tripped("frame_rate", _address(connection))
                    session.close(CloseCode.POLICY_VIOLATION)
                    # Drop what is still coming so the client's close frame
                    # is read and the close completes now, not after the
                    # close timeout (websockets aborts by then anyway).
                    async for _ in connection:
                        pass
                    break
                await self._answer(session, data)
                if session.closing:
                    break
        except ConnectionClosed as exc:
            self._count_oversized(exc, connection)
        finally:
            self._expiries.disarm(session)
            self._hub.discard(session)
            self._sessions.discard(session)
            session.close(CloseCode.NORMAL)
            await session.finished()
            logger.info(
                "session %s closed: user=%s code=%s",
                session.id,
                session.user,
                connection.close_code,
                extra={"websocket": connection},
            )

    async def _open_session(
        self, connection: ServerConnection
    ) -> tuple[Session, str | None] | None:
        """
        Authenticate (by the handshake or the first frame), check
        revocation, and make the session; None when the connection was
        refused and closed. Returns the session and the client's cursor.

        Only the session outlives this call: the token's claims, the
        handshake's record and its HTTP headers would otherwise stay
        referenced for the whole life of an idle connection.
        """
        handshake = self._handshakes.pop(connection)
        # The handshake is over and what notifyd needs of it is in
        # ``handshake``; websockets only checks that a request was received.
        connection.response = None
        if connection.request is not None:
            connection.request.headers.clear()
        identity = handshake.identity
        since = handshake.since
        if identity is None:
            authenticated = await self._first_frame_auth(connection, handshake)
            if authenticated is None:
                return None
            identity, first_since = authenticated
            since = first_since or since
        refused = await self._revoked(connection, identity)
        if refused is not None:
            await _close(connection, refused)
            return None
        settings = self._settings
        session = Session(
            connection,
            identity.user,
            Outbox(settings.session_queue_messages, settings.session_queue_bytes),
            send_timeout=settings.slow_client_timeout_s,
            stats=self._stats,
        )
        self._sessions.add(session)
        logger.info(
            "session %s opened: user=%s", session.id, identity.user, extra={"websocket": connection}
        )
        self._expiries.arm(session, identity.expires_at)
        return session, since

    async def _first_frame_auth(
        self, connection: ServerConnection, handshake: _Handshake
    ) -> tuple[Identity, str | None] | None:
        """
        Wait for ``{"action":"auth"}``; close with 4408 or 4401 on failure.
        """
        try:
            async with asyncio.timeout(self._settings.auth_timeout_s):
                data = await connection.recv()
        except TimeoutError:
            self._auth_failed(connection, "no auth in time")
            await _close(connection, CloseCode.AUTH_TIMEOUT)
            return None
        except ConnectionClosed as exc:
            self._count_oversized(exc, connection)
            return None
        try:
            action = protocol.parse_client_frame(data)
        except ProtocolError:
            action = None
        if not isinstance(action, protocol.Auth) or self.verifier is None:
            self._auth_failed(connection, "first frame is not auth")
            await _close(connection, CloseCode.UNAUTHORIZED)
            return None
        try:
            identity = self.verifier.verify(action.token)
        except AuthError as exc:
            self._auth_failed(connection, exc.reason)
            await _close(connection, CloseCode.UNAUTHORIZED)
            return None
        if handshake.path_user is not None and handshake.path_user != identity.user:
            self._auth_failed(connection, "path names another user")
            await _close(connection, CloseCode.UNAUTHORIZED)
            return None
        return identity, action.since

    def _auth_failed(self, connection: ServerConnection, reason: str) -> None:
        """
        Count and log a rejected authentication; never the token itself.
        """
        self._stats.auth_failures[reason] += 1
        logger.info("auth failed: reason=%s", reason, extra={"websocket": connection})

    def _limit_tripped(self, limit: str, address: str) -> None:
        """
        Count a limit that said no; log it, at most once per interval per
        limit, so a flood cannot flood the log too.
        """
        self._stats.limit_trips[limit] += 1
        now = time.monotonic()
        if now - self._trip_logged.get(limit, -math.inf) >= _TRIP_LOG_INTERVAL_S:
            self._trip_logged[limit] = now
            logger.warning(
                "limit %s reached: remote=%s (%d times so far)",
                limit, address, self._stats.limit_trips[limit],
            )  # fmt: skip

    def _count_oversized(self, exc: ConnectionClosed, connection: ServerConnection) -> None:
        """
        websockets closes a connection whose frame is over ``max_size`` with
        1009 by itself; count that as the frame size limit.
        """
        if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
            self._limit_tripped("frame_size", _address(connection))

    async def _revoked(self, connection: ServerConnection, identity: Identity) -> CloseCode | None:
        """
        Run ``revocation_sql`` for a freshly verified token: None when the
        session may go on, 4401 when the query says no, 1011 when it cannot
        be run (a revocation that cannot be checked is not waved through).
        """
        query = self._settings.revocation_sql
        if not query:
            return None
        try:
            allowed = await self._db.session_allowed(
                query, self._revocation_arity, identity.user, identity.claims
            )
        except DatabaseError as exc:
            # The type only: a message could quote the claims.
            logger.warning("revocation check failed: %s", type(exc).__name__)
            return CloseCode.INTERNAL_ERROR
        if allowed:
            return None
        self._auth_failed(connection, "revoked")
        return CloseCode.UNAUTHORIZED

    def _expire(self, session: Session) -> None:
        """
        Close the session with 4401: its token expired (plus the JWT leeway,
        as for a new token).
        """
        if not session.closing:
            self._stats.expired_sessions += 1
            logger.info("session %s: token expired", session.id)
            session.close(CloseCode.UNAUTHORIZED)

    async def _refresh(self, session: Session, action: protocol.Refresh) -> None:
        """
        A new token for the session: same user, valid, not revoked; else
        the session is closed with 4401 at once.
        """
        verifier = self.verifier
        if verifier is None:
            session.push(
                protocol.encode_error("invalid", "this server takes no tokens", action.request_id)
            )
            return
        connection = session.connection
        try:
            identity = verifier.verify(action.token)
        except AuthError as exc:
            self._auth_failed(connection, exc.reason)
            session.close(CloseCode.UNAUTHORIZED)
            return
        if identity.user != session.user:
            self._auth_failed(connection, "refresh names another user")
            session.close(CloseCode.UNAUTHORIZED)
            return
        refused = await self._revoked(connection, identity)
        if refused is not None:
            session.close(refused)
            return
        self._expiries.arm(session, identity.expires_at)
        session.push(protocol.encode_refreshed(action.request_id, identity.expires_at))

    async def _answer(self, session: Session, data: str | bytes) -> None:
        """
        Act on one client frame. Read-state changes are not answered
        directly: the triggers' events reach every session of the user,
        this one included.
        """
        try:
            action = protocol.parse_client_frame(data, max_read_ids=self._settings.max_read_ids)
        except ProtocolError as exc:
            if exc.limit is not None:
                self._limit_tripped(exc.limit, _address(session.connection))
            session.push(protocol.encode_error(exc.code, exc.message, exc.request_id))
            return
        db = self._db
        try:
            if isinstance(action, protocol.Ping):
                session.push(protocol.PONG)
            elif isinstance(action, protocol.Read):
                await db.mark_read(session.user, action.ids)
            elif isinstance(action, protocol.ReadAll):
                await db.mark_all_read(session.user, action.type)
            elif isinstance(action, protocol.Refresh):
                await self._refresh(session, action)
            elif isinstance(action, protocol.History):
                await self._history(session, action)
            elif isinstance(action, protocol.DemoSend):
                request_id = action.request_id
                if self._demo_users is None:
                    # As if the action did not exist: serve knows nothing of it.
                    session.push(
                        protocol.encode_error("unknown_action", "unknown action", request_id)
                    )
                elif action.to not in self._demo_users:
                    session.push(
                        protocol.encode_error("invalid", "to must be a demo user", request_id)
                    )
                else:
                    # A plain INSERT: delivered by the usual commit path.
                    await db.insert_message(
                        to_user=action.to,
                        title=action.title,
                        content=action.content,
                        skip_url=action.skip_url,
                        send_user=session.user,
                    )
            else:
                session.push(protocol.encode_error("invalid", "already authenticated"))
        except DatabaseError as exc:
            logger.warning("session %s: %s failed: %s", session.id, type(action).__name__, exc)
            request_id = getattr(action, "request_id", None)
            session.push(protocol.encode_error("unavailable", "try again later", request_id))

    async def _history(self, session: Session, action: protocol.History) -> None:
        """
        Answer ``history`` within ``max_concurrent_history`` queries at once,
        so history readers cannot take the pool from delivery; a request
        that finds no slot in time is answered ``busy``.
        """
        try:
            async with asyncio.timeout(_HISTORY_WAIT_S):
                await self._history_slots.acquire()
        except TimeoutError:
            self._limit_tripped("history_concurrency", _address(session.connection))
            session.push(
                protocol.encode_error(
                    "busy", "too many history requests; try again", action.request_id
                )
            )
            return
        try:
            rows, more = await self._db.history(
                session.user,
                before_seq=action.before_seq,
                limit=action.limit,
                type=action.type,
                unread_only=action.unread_only,
            )
        finally:
            self._history_slots.release()
        session.push(protocol.encode_history(action.request_id, rows, more))


def _answer_subprotocol(connection: ServerConnection, request: Request, response: Response) -> None:
    """
    Select ``notifyd.v1`` in the 101 when the client offered it, never
    anything else: a ``bearer.<token>`` entry is read by the handshake, not
    echoed back. Clients that offer nothing get no subprotocol.

    Done on the response rather than with websockets' ``select_subprotocol``
    hook, which keeps a closure alive on every connection (about 330 bytes
    of each idle session).
    """
    if response.status_code == 101 and SUBPROTOCOL in offered_subprotocols(request.headers):
        response.headers["Sec-WebSocket-Protocol"] = SUBPROTOCOL
        connection.protocol.subprotocol = Subprotocol(SUBPROTOCOL)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """
    The server TLS context when a certificate is configured, else None.

    Raises :class:`ConfigError` naming the setting when the files are
    missing or do not match.
    """
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise ConfigError("set both NOTIFYD_TLS_CERT_FILE and NOTIFYD_TLS_KEY_FILE")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"NOTIFYD_TLS_CERT_FILE/NOTIFYD_TLS_KEY_FILE cannot be used: {exc}"
        ) from None
    return context


def _response(status: http.HTTPStatus, body: str | bytes, content_type: str) -> Response:
    """
    A plain HTTP response that is never cached.
    """
    data = body.encode() if isinstance(body, str) else body
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, data)


def _address(connection: ServerConnection) -> str:
    try:
        return str(connection.remote_address[0])
    except (TypeError, IndexError):
        return "?"


def is_loopback_address(address: Any) -> bool:
    """
    Whether a peer address tuple comes from this machine (for /metrics).
    """
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except (TypeError, ValueError, IndexError):
        return False


def _restart_reason(code: CloseCode) -> str | None:
    """
    For 1012, a random reconnect delay hint (up to 5 s), so thousands of
    clients do not all come back in the same millisecond.
    """
    if code is not CloseCode.SERVICE_RESTART:
        return None
    return f"{close_reason(code)}; retry_ms={random.randint(0, 5000)}"


async def _close(connection: ServerConnection, code: CloseCode) -> None:
    await connection.close(code, close_reason(code))
