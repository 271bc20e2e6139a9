"""
Who may hold a session, and until when.

A session's right to exist is checked when it opens (its token, then the
optional revocation query), renewed by a ``refresh`` frame (a new token for
the same user, checked the same way), and ends when its token expires: the
session is then closed with 4401. The handshake's own refusals (limits,
origin, a bad token before the upgrade) are :mod:`notifyd.handshake`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from . import client_frames, protocol
from .auth import Identity, Keys
from .db import Database
from .exceptions import AuthError, DatabaseError
from .expiry import ExpiryClock
from .incidents import Incidents
from .protocol import CloseCode
from .session import Session
from .stats import Stats

__all__ = ["Access"]

logger = logging.getLogger(__name__)


class Access:
    """
    Token checks, revocation and expiry for open sessions.
    """

    def __init__(
        self,
        keys: Keys,
        database: Database,
        *,
        revocation_sql: str,
        incidents: Incidents,
        stats: Stats,
    ) -> None:
        self._keys = keys
        self._db = database
        self._revocation_sql = revocation_sql
        self._revocation_arity = 0
        self._incidents = incidents
        self._stats = stats
        self._expiries: ExpiryClock[Session] = ExpiryClock(self._expire, leeway_s=keys.leeway_s)

    async def start(self) -> None:
        """
        Check the revocation query once (its parameters), before serving.
        """
        if self._revocation_sql:
            self._revocation_arity = await self._db.revocation_arity(self._revocation_sql)

    def verify(self, connection: object, token: str, path_user: str | None) -> Identity | None:
        """
        The identity ``token`` proves, or None (counted and logged) when it
        is invalid or the path names another user.
        """
        try:
            identity = self._keys.verify(token)
        except AuthError as exc:
            self._incidents.auth_failed(connection, exc.reason)
            return None
        if path_user is not None and path_user != identity.user:
            self._incidents.auth_failed(connection, "path names another user")
            return None
        return identity

    async def revoked(self, connection: object, identity: Identity) -> CloseCode | None:
        """
        Run ``revocation_sql`` for a freshly verified token: None when the
        session may go on, 4401 when the query says no, 1011 when it cannot
        be run (a revocation that cannot be checked is not waved through).
        """
        if not self._revocation_sql:
            return None
        claims: Mapping[str, Any] = identity.claims
        try:
            allowed = await self._db.session_allowed(
                self._revocation_sql, self._revocation_arity, identity.user, claims
            )
        except DatabaseError as exc:
            # The type only: a message could quote the claims.
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            logger.warning("revocation check failed: %s", type(cause).__name__)
            return CloseCode.INTERNAL_ERROR
        if allowed:
            return None
        self._incidents.auth_failed(connection, "revoked")
        return CloseCode.UNAUTHORIZED

    def arm(self, session: Session, expires_at: float) -> None:
        """
        Close ``session`` with 4401 when ``expires_at`` (plus the leeway) passes.
        """
        self._expiries.arm(session, expires_at)

    def disarm(self, session: Session) -> None:
        """
        Forget a closed session's expiry.
        """
        self._expiries.disarm(session)

    def close(self) -> None:
        """
        Stop the expiry clock (at shutdown).
        """
        self._expiries.close()

    async def refresh(self, session: Session, action: client_frames.Refresh) -> None:
        """
        A new token for the session: same user, valid, not revoked; else
        the session is closed with 4401 at once.
        """
        if self._keys.verifier is None:
            session.push(
                protocol.encode_error("invalid", "this server takes no tokens", action.request_id)
            )
            return
        connection = session.connection
        try:
            identity = self._keys.verify(action.token)
        except AuthError as exc:
            self._incidents.auth_failed(connection, exc.reason)
            session.close(CloseCode.UNAUTHORIZED)
            return
        if identity.user != session.user:
            self._incidents.auth_failed(connection, "refresh names another user")
            session.close(CloseCode.UNAUTHORIZED)
            return
        refused = await self.revoked(connection, identity)
        if refused is not None:
            session.close(refused)
            return
        self.arm(session, identity.expires_at)
        session.push(protocol.encode_refreshed(action.request_id, identity.expires_at))

    def _expire(self, session: Session) -> None:
        """
        Close the session with 4401: its token expired (plus the JWT leeway,
        as for a new token).
        """
        if not session.closing:
            self._stats.expired_sessions += 1
            logger.info("session %s: token expired", session.id)
            session.close(CloseCode.UNAUTHORIZED)
