"""
Admission: whether a WebSocket handshake may become a session.

Before the upgrade, in this order and before any token is looked at: the
per-address handshake rate (429), the origin allow-list (403), the form of
the offered subprotocols (400). Then the token the handshake carries, if
any (:mod:`notifyd.credentials` finds it): 401 when invalid, 403 when the
path names another user. Last, the per-address connection limit (429),
released when the TCP connection is gone. A handshake that passes is
upgraded; without a token there, the first frame must authenticate
(:mod:`notifyd.server`). The handshake's query may also opt the session in
to unread counts carried on message frames (``counts=inline``).

Behind a trusted reverse proxy (:mod:`notifyd.peers`) the client is the
address it forwarded: every request's connection is told so first, and
the limits, the refusals' log lines and ``/metrics``' loopback check go by
that address.
"""

from __future__ import annotations

import http
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from .access import Access
from .auth import Identity
from .credentials import (
    SUBPROTOCOL,
    bearer_subprotocol,
    offered_subprotocols,
    token_from_handshake,
)
from .incidents import Incidents, peer_address, tcp_peer_address
from .limits import AddressCounter, AddressRateLimiter, address_key
from .origin import OriginPolicy
from .peers import FORWARDED_FOR, TrustedProxies
from .routes import plain_response
from .settings import Settings

__all__ = ["INLINE_COUNTS", "Admission", "Handshake", "PeerConnection", "select_subprotocol"]

# ``?counts=inline`` opts a session in to unread counts on message frames
# (docs/protocol.md); any other value, or none, keeps the unread events.
INLINE_COUNTS = "inline"


class PeerConnection(ServerConnection):
    """
    A server connection that knows its client's address when a trusted
    proxy forwarded it (``forwarded_client``; None: the TCP peer is the
    client). Read by :func:`notifyd.incidents.peer_address` and the logs.
    """

    # A class default: a connection not behind a proxy stores nothing.
    forwarded_client: str | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # websockets leaves its protocol's parser (discard()) suspended at
        # its last yield, holding the protocol: every closed connection is a
        # reference cycle, and the collector (notifyd.collector: live
        # sessions frozen) frees those only at its next full collection, a
        # quarter of the sessions later. The stream is at EOF now and the
        # parser is never stepped again (receive_eof() returns at EOF), so
        # closing it lets reference counting free the session at once.
        self.protocol.parser.close()


@dataclass(slots=True)
class Handshake:
    """
    What admission decided, handed to the connection handler.
    """

    identity: Identity | None
    path_user: str | None
    since: str | None
    # The client asked for a new message's unread counts on its own frame.
    inline_counts: bool = False


class Admission:
    """
    The per-address limits, the origin policy and the handshake's token.
    """

    def __init__(self, settings: Settings, access: Access, incidents: Incidents) -> None:
        self._access = access
        self._incidents = incidents
        self._cookie_name = settings.token_cookie
        self._user_from_path = settings.dev_insecure_user_from_path
        self._origins = OriginPolicy.from_list(
            settings.allowed_origins, require=settings.require_origin
        )
        self._handshake_rate = AddressRateLimiter(settings.handshakes_per_s_per_address)
        self.per_address = AddressCounter(settings.max_connections_per_address)
        self._proxies = TrustedProxies.from_list(settings.trusted_proxies)

    def identify(self, connection: ServerConnection, request: Request) -> str:
        """
        The client's address for this request, recorded on the connection
        when a trusted proxy forwarded it; ``X-Forwarded-For`` from any
        other peer changes nothing.
        """
        peer = tcp_peer_address(connection)
        if not self._proxies:
            return peer
        forwarded = self._proxies.forwarded_client(peer, request.headers.get_all(FORWARDED_FOR))
        if forwarded is None:
            return peer
        if isinstance(connection, PeerConnection):
            connection.forwarded_client = forwarded
        return forwarded

    def admit(
        self,
        connection: ServerConnection,
        request: Request,
        path_user: str | None,
        query_string: str,
    ) -> Response | Handshake:
        """
        A refusal, or what the connection handler needs to open the session.
        """
        address = address_key(peer_address(connection))
        refused = self._screen(connection, request, address)
        if refused is not None:
            return refused
        query = {key: values[-1] for key, values in parse_qs(query_string).items()}
        token = token_from_handshake(
            query=query, headers=request.headers, cookie_name=self._cookie_name
        )
        identity: Identity | None = None
        if token is not None:
            identity = self._access.verify(connection, token, None)
            if identity is None:
                return plain_response(http.HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
            if path_user is not None and path_user != identity.user:
                self._incidents.auth_failed(connection, "path names another user")
                return plain_response(http.HTTPStatus.FORBIDDEN, "Forbidden\n")
        elif self._user_from_path and path_user is not None:
            identity = Identity(path_user, float("inf"))
        counter = self.per_address
        if not counter.acquire(address):
            self._incidents.limit_tripped("connections_per_address", address)
            return plain_response(http.HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests\n")
        if counter.limit > 0:
            # Released when the TCP connection is gone, whatever happens to
            # the handshake from here on.
            connection.connection_lost_waiter.add_done_callback(lambda _: counter.release(address))
        return Handshake(
            identity,
            path_user,
            query.get("since") or None,
            inline_counts=query.get("counts") == INLINE_COUNTS,
        )

    def _screen(
        self, connection: ServerConnection, request: Request, address: str
    ) -> Response | None:
        """
        The checks before any token is looked at: handshake rate, origin,
        subprotocol form. A refusal response, or None to go on.
        """
        if not self._handshake_rate.allow(address, time.monotonic()):
            self._incidents.limit_tripped("handshake_rate", address)
            return plain_response(http.HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests\n")
        refusal = self._origins.refusal(request.headers.get_all("Origin"))
        if refusal is not None:
            self._incidents.auth_failed(connection, refusal)
            return plain_response(http.HTTPStatus.FORBIDDEN, "Forbidden\n")
        offered = offered_subprotocols(request.headers)
        if bearer_subprotocol(offered) is not None and SUBPROTOCOL not in offered:
            # The browser would fail the handshake anyway (no protocol it
            # offered is selected); say why instead of upgrading.
            self._incidents.auth_failed(connection, "bearer subprotocol without notifyd.v1")
            return plain_response(
                http.HTTPStatus.BAD_REQUEST, f"Offer {SUBPROTOCOL} with the bearer entry\n"
            )
        return None


def select_subprotocol(connection: ServerConnection, request: Request, response: Response) -> None:
    """
    Select ``notifyd.v1`` in the 101 when the client offered it, never
    anything else: a ``bearer.<token>`` entry is read by admission, not
    echoed back. Clients that offer nothing get no subprotocol.

    Done on the response rather than with websockets' ``select_subprotocol``
    hook, which keeps a closure alive on every connection (about 330 bytes
    of each idle session).
    """
    if response.status_code == 101 and SUBPROTOCOL in offered_subprotocols(request.headers):
        response.headers["Sec-WebSocket-Protocol"] = SUBPROTOCOL
        connection.protocol.subprotocol = Subprotocol(SUBPROTOCOL)
