"""
``notifyd check``: is this installation able to deliver? Plain answers.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import asyncpg

from .auth import TokenVerifier
from .daemon import connect_database
from .db import CHANNEL, Database
from .exceptions import ConfigError, DatabaseError
from .settings import Settings

__all__ = ["run_checks"]


async def run_checks(settings: Settings, say: Callable[[str], object]) -> bool:
    """
    Check settings, database, schema and the LISTEN path; report each with
    ``say``. Returns whether all passed. Never raises for a failed check.
    """
    ok = True
    if settings.dev_insecure_user_from_path:
        say("ok: development mode, tokens not required")
    else:
        try:
            TokenVerifier.from_settings(settings)
            say("ok: JWT key configured")
        except ConfigError as exc:
            say(f"problem: {exc}")
            ok = False
    if not settings.dsn:
        say("problem: NOTIFYD_DSN is not set")
        return False
    try:
        db = await connect_database(settings, wait=False)
    except (ConfigError, DatabaseError) as exc:
        say(f"problem: {exc}")
        return False
    try:
        say("ok: database reachable, not a standby")
        problems = await db.schema_problems()
        for problem in problems:
            say(f"problem: {problem}")
        if not problems:
            say("ok: table, columns and trigger present")
        ok = ok and not problems
        listen_ok = await _listen_round_trip(settings.listen_dsn or settings.dsn, db)
        say("ok: LISTEN/NOTIFY round trip works" if listen_ok else
            "problem: a NOTIFY did not reach a LISTEN connection within 5 s "
            "(is NOTIFYD_DSN/NOTIFYD_LISTEN_DSN going through a transaction-mode pooler?)")
        ok = ok and listen_ok
    finally:
        await db.close()
    return ok


async def _listen_round_trip(dsn: str, db: Database) -> bool:
    token = "check:" + secrets.token_hex(8)
    arrived = asyncio.Event()

    def on_notification(connection: object, pid: int, channel: str, payload: str) -> None:
        if payload == token:
            arrived.set()

    try:
        connection = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False
    try:
        await connection.add_listener(CHANNEL, on_notification)
        await db.notify(token)
        async with asyncio.timeout(5):
            await arrived.wait()
        return True
    except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    finally:
        await connection.close()
