"""
The client actions: what an open session may ask, and how each is answered.

``ping``, ``read``, ``read_all``, ``history``, ``refresh`` (delegated to
:mod:`notifyd.access`) and, under ``notifyd demo`` only, ``demo_send``. A
read-state change is not answered directly: the triggers' events reach every
session of the user, this one included. A frame that does not parse is
answered with an ``error`` event naming the problem; a database that cannot
be reached makes the action answer ``unavailable``. A new action is added
here (and its frame to :mod:`notifyd.client_frames`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from . import client_frames, protocol
from .access import Access
from .db import Database
from .exceptions import DatabaseError, ProtocolError
from .incidents import Incidents, peer_address
from .session import Session

__all__ = ["Actions"]

logger = logging.getLogger(__name__)

# How long a history request waits for one of the max_concurrent_history
# slots before it is answered "busy": long enough to ride out a burst of
# page loads, short enough that the client's own retry is not delayed.
_HISTORY_WAIT_S = 2.0


class Actions:
    """
    Answers one client frame at a time for any session.
    """

    def __init__(
        self,
        database: Database,
        access: Access,
        incidents: Incidents,
        *,
        max_read_ids: int,
        max_concurrent_history: int,
        demo_users: Mapping[str, str] | None = None,
    ) -> None:
        """
        ``demo_users`` (``notifyd demo`` only) enables ``demo_send`` to them.
        """
        self._db = database
        self._access = access
        self._incidents = incidents
        self._max_read_ids = max_read_ids
        self._history_slots = asyncio.Semaphore(max_concurrent_history)
        self._demo_users = demo_users

    async def answer(self, session: Session, data: str | bytes) -> None:
        """
        Act on one client frame.
        """
        try:
            action = client_frames.parse_client_frame(data, max_read_ids=self._max_read_ids)
        except ProtocolError as exc:
            if exc.limit is not None:
                self._incidents.limit_tripped(exc.limit, peer_address(session.connection))
            session.push(protocol.encode_error(exc.code, exc.message, exc.request_id))
            return
        db = self._db
        try:
            if isinstance(action, client_frames.Ping):
                session.push(protocol.PONG)
            elif isinstance(action, client_frames.Read):
                await db.mark_read(session.user, action.ids)
            elif isinstance(action, client_frames.ReadAll):
                await db.mark_all_read(session.user, action.type)
            elif isinstance(action, client_frames.Refresh):
                await self._access.refresh(session, action)
            elif isinstance(action, client_frames.History):
                await self._history(session, action)
            elif isinstance(action, client_frames.DemoSend):
                await self._demo_send(session, action)
            else:
                session.push(protocol.encode_error("invalid", "already authenticated"))
        except DatabaseError as exc:
            logger.warning("session %s: %s failed: %s", session.id, type(action).__name__, exc)
            request_id = getattr(action, "request_id", None)
            session.push(protocol.encode_error("unavailable", "try again later", request_id))

    async def _history(self, session: Session, action: client_frames.History) -> None:
        """
        Answer ``history`` within ``max_concurrent_history`` queries at once,
        so history readers cannot take the pool from delivery; a request
        that finds no slot in time is answered ``busy``.
        """
        try:
            async with asyncio.timeout(_HISTORY_WAIT_S):
                await self._history_slots.acquire()
        except TimeoutError:
            self._incidents.limit_tripped("history_concurrency", peer_address(session.connection))
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

    async def _demo_send(self, session: Session, action: client_frames.DemoSend) -> None:
        """
        ``notifyd demo``'s send form: a plain INSERT, delivered by the usual
        commit path. Unknown to ``serve``, as if the action did not exist.
        """
        request_id = action.request_id
        if self._demo_users is None:
            session.push(protocol.encode_error("unknown_action", "unknown action", request_id))
        elif action.to not in self._demo_users:
            session.push(protocol.encode_error("invalid", "to must be a demo user", request_id))
        else:
            await self._db.insert_message(
                to_user=action.to,
                title=action.title,
                content=action.content,
                skip_url=action.skip_url,
                send_user=session.user,
            )
