"""
The WebSocket server: one port, one handler per connection.

Each request goes to :mod:`notifyd.routes` (HTTP paths) and, for the push
endpoint, to :mod:`notifyd.handshake` (admission). An admitted connection
becomes a session here: authenticated by its handshake or its first frame
(``{"action":"auth",...}`` within ``auth_timeout_s``, else 4408), checked
against the revocation query and armed for its token's expiry
(:mod:`notifyd.access`), then joined to delivery, which registers it and
sends its hello and replay. Its frames are answered by
:mod:`notifyd.actions`, at most ``client_frames_per_s`` (else 1008) and none
over ``max_frame_bytes`` (websockets closes with 1009). When it ends, it
leaves delivery; see ``docs/security.md`` for every close code.

At most ``max_pending_handshakes`` handshakes are in progress at once (from
admission until the session's hello, or until it is refused or lost); past
that, a handshake is shed at once with a retry hint (503 with Retry-After,
or 1013 for a browser), so a restart storm is answered rather than left to
time out.
"""

from __future__ import annotations

import asyncio
import http
import logging
import random
import time
import weakref
from collections.abc import Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import client_frames
from .access import Access
from .actions import Actions
from .auth import Identity
from .delivery import Delivery
from .exceptions import ProtocolError
from .handshake import Admission, Handshake, PeerConnection, select_subprotocol
from .incidents import Incidents, peer_address
from .limits import TokenBucket
from .outbox import Outbox
from .protocol import CloseCode, close_reason
from .routes import Routes, WebSocketRoute, plain_response
from .session import Session
from .settings import Settings
from .stats import Stats
from .tls import tls_context

__all__ = ["PushServer"]

logger = logging.getLogger(__name__)

# The retry hint given to a shed handshake, in seconds, drawn at random so
# that clients told at the same moment do not all come back at the same one.
_RETRY_HINT_S = (1, 2)

# The listen backlog: connections the kernel completes before the loop
# accepts them. asyncio's default (100) overflows at once when thousands of
# clients come back together, and each SYN dropped then costs its client a
# TCP retransmission 1, 3, 7, 15, 31 s later. The kernel caps this at
# net.core.somaxconn.
_LISTEN_BACKLOG = 65535


class PushServer:
    """
    Accepts WebSocket sessions and hands them to delivery.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        routes: Routes,
        admission: Admission,
        access: Access,
        actions: Actions,
        incidents: Incidents,
        delivery: Delivery,
        stats: Stats,
    ) -> None:
        self._settings = settings
        self._routes = routes
        self.admission = admission
        self.access = access
        self._actions = actions
        self._incidents = incidents
        self._delivery = delivery
        self._stats = stats
        # Weak, so a handshake that fails after process_request leaks nothing.
        self._handshakes: weakref.WeakKeyDictionary[ServerConnection, Handshake] = (
            weakref.WeakKeyDictionary()
        )
        self._server: Server | None = None
        # The sessions this server opened and has not yet seen end.
        self._sessions: set[Session] = set()
        # Handshakes accepted and not yet live sessions, each with the
        # callback that forgets it if its connection is lost first.
        self._opening: dict[ServerConnection, Callable[[object], None]] = {}
        # Browser handshakes shed: upgraded only to be closed with 1013.
        self._shed: weakref.WeakSet[ServerConnection] = weakref.WeakSet()

    @property
    def port(self) -> int:
        """
        The bound TCP port (useful with port 0).
        """
        if self._server is None:
            raise RuntimeError("the server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """
        Bind and start accepting connections.
        """
        settings = self._settings
        await self.access.start()
        self._server = await serve(
            self._handle,
            settings.host,
            settings.port,
            ssl=tls_context(settings),
            process_request=self._process_request,
            process_response=select_subprotocol,
            compression="deflate" if settings.compression else None,
            max_size=settings.max_frame_bytes,
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            close_timeout=5,
            server_header="notifyd",
            create_connection=PeerConnection,
            backlog=_LISTEN_BACKLOG,
            # Workers each bind the same port; the kernel spreads connections.
            reuse_port=settings.workers > 1,
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
        Close every session with ``code`` and wait (bounded) until their
        handlers are done: a close frame each, written at once, without
        waiting for the clients' answers.
        """
        for session in list(self._sessions):
            session.close_at_once(code, _restart_reason(code))
        if self._server is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self._server.wait_closed()
            except TimeoutError:
                logger.warning("sessions did not close within %.1fs; aborting them", timeout)
                for connection in list(self._server.connections):
                    if connection.transport is not None:
                        connection.transport.abort()
        self.access.close()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        client = self.admission.identify(connection, request)
        answer = self._routes.respond(request, (client,))
        if not isinstance(answer, WebSocketRoute):
            return answer
        limit = self._settings.max_pending_handshakes
        if limit and len(self._opening) >= limit:
            return self._shed_handshake(connection, request)
        admitted = self.admission.admit(connection, request, answer.path_user, answer.query_string)
        if isinstance(admitted, Response):
            return admitted
        self._handshakes[connection] = admitted
        self._track_opening(connection)
        return None

    def _shed_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """
        Too many handshakes in progress: answer this one at once with a
        retry hint rather than let it wait and time out.

        A browser cannot read a refused handshake's status or headers (its
        script only sees close 1006), so a handshake with an Origin header
        is upgraded and closed with 1013 and ``retry_ms`` in the reason;
        any other gets 503 with Retry-After.
        """
        self._incidents.limit_tripped("pending_handshakes", peer_address(connection))
        if "Origin" in request.headers:
            self._shed.add(connection)
            return None
        response = plain_response(http.HTTPStatus.SERVICE_UNAVAILABLE, "Overloaded, retry later\n")
        response.headers["Retry-After"] = str(random.randint(*_RETRY_HINT_S))
        return response

    def _track_opening(self, connection: ServerConnection) -> None:
        def lost(_: object) -> None:
            self._opening.pop(connection, None)

        self._opening[connection] = lost
        connection.connection_lost_waiter.add_done_callback(lost)

    def _opened(self, connection: ServerConnection) -> None:
        """
        The handshake is over (a live session, or refused): it no longer
        counts against ``max_pending_handshakes``. Idempotent.
        """
        lost = self._opening.pop(connection, None)
        if lost is not None:
            # Nothing per connection stays behind for the session's life.
            connection.connection_lost_waiter.remove_done_callback(lost)

    async def _handle(self, connection: ServerConnection) -> None:
        if connection in self._shed:
            code = CloseCode.TRY_AGAIN_LATER
            retry_ms = 1000 * random.uniform(*_RETRY_HINT_S)
            await connection.close(code, f"{close_reason(code)}; retry_ms={retry_ms:.0f}")
            return
        try:
            await self._serve(connection)
        finally:
            self._opened(connection)

    async def _serve(self, connection: ServerConnection) -> None:
        opened = await self._open_session(connection)
        if opened is None:
            return
        session, since = opened
        # Made at the first client frame: most sessions only ever receive.
        frames: TokenBucket | None = None
        try:
            await self._delivery.join(session, since)
            self._opened(connection)
            async for data in connection:
                now = time.monotonic()
                if frames is None:
                    frames = TokenBucket.per_second(self._settings.client_frames_per_s, now)
                if not frames.take(now):
                    self._incidents.limit_tripped("frame_rate", peer_address(connection))
                    session.close(CloseCode.POLICY_VIOLATION)
                    # Drop what is still coming so the client's close frame
                    # is read and the close completes now, not after the
                    # close timeout (websockets aborts by then anyway).
                    async for _ in connection:
                        pass
                    break
                await self._actions.answer(session, data)
                if session.closing:
                    break
        except ConnectionClosed as exc:
            self._count_oversized(exc, connection)
        finally:
            self.access.disarm(session)
            self._delivery.leave(session)
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
        refused = await self.access.revoked(connection, identity)
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
            inline_counts=handshake.inline_counts,
        )
        self._sessions.add(session)
        logger.info(
            "session %s opened: user=%s", session.id, identity.user, extra={"websocket": connection}
        )
        self.access.arm(session, identity.expires_at)
        return session, since

    async def _first_frame_auth(
        self, connection: ServerConnection, handshake: Handshake
    ) -> tuple[Identity, str | None] | None:
        """
        Wait for ``{"action":"auth"}``; close with 4408 or 4401 on failure.
        """
        try:
            async with asyncio.timeout(self._settings.auth_timeout_s):
                data = await connection.recv()
        except TimeoutError:
            self._incidents.auth_failed(connection, "no auth in time")
            await _close(connection, CloseCode.AUTH_TIMEOUT)
            return None
        except ConnectionClosed as exc:
            self._count_oversized(exc, connection)
            return None
        try:
            action = client_frames.parse_client_frame(data)
        except ProtocolError:
            action = None
        if not isinstance(action, client_frames.Auth):
            self._incidents.auth_failed(connection, "first frame is not auth")
            await _close(connection, CloseCode.UNAUTHORIZED)
            return None
        identity = self.access.verify(connection, action.token, handshake.path_user)
        if identity is None:
            await _close(connection, CloseCode.UNAUTHORIZED)
            return None
        return identity, action.since

    def _count_oversized(self, exc: ConnectionClosed, connection: ServerConnection) -> None:
        """
        websockets closes a connection whose frame is over ``max_size`` with
        1009 by itself; count that as the frame size limit.
        """
        if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
            self._incidents.limit_tripped("frame_size", peer_address(connection))


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
