"""
``notifyd check``: is this installation able to deliver? Plain answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .auth import TokenVerifier
from .db import Database, connect_database
from .exceptions import ConfigError, DatabaseError
from .listener import Probe, open_listen_connection
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
        if settings.sinks:
            ok = await _check_sinks(settings, db, say) and ok
        if settings.read_dsn:
            replica_problem = await db.read_replica_problem()
            say(
                f"problem: {replica_problem} (reads would go to the primary)"
                if replica_problem
                else "ok: NOTIFYD_READ_DSN is a hot standby of the same cluster"
            )
            ok = ok and replica_problem is None
        listen_problem = await _listen_round_trip(settings, db)
        say(
            f"problem: {listen_problem}" if listen_problem else "ok: LISTEN/NOTIFY round trip works"
        )
        ok = ok and listen_problem is None
    finally:
        await db.close()
    return ok


async def _check_sinks(settings: Settings, db: Database, say: Callable[[str], object]) -> bool:
    """
    Whether every sink in ``NOTIFYD_SINKS`` loads with its settings, and the
    webhook's dispatch tables and rights are there.
    """
    from .dispatch import DispatchStore
    from .sinks.manager import SinkManager
    from .stats import Stats

    try:
        manager = SinkManager(settings, Stats())
    except ConfigError as exc:
        say(f"problem: {exc}")
        return False
    await manager.aclose()
    say(f"ok: sinks configured: {', '.join(manager.names)}")
    if "webhook" not in manager.names:
        return True
    problems = await DispatchStore(db, "webhook").problems()
    for problem in problems:
        say(f"problem: {problem}")
    if not problems:
        say("ok: webhook dispatch tables present")
    return not problems


async def _listen_round_trip(settings: Settings, db: Database) -> str | None:
    """
    None when a NOTIFY sent through ``db`` reaches a LISTEN connection on the
    listen DSN (the daemon's probe, once); else what is wrong.
    """
    where = "NOTIFYD_LISTEN_DSN" if settings.listen_dsn else "NOTIFYD_DSN"
    probe = Probe(db)
    try:
        connection = await open_listen_connection(
            settings.listen_dsn or settings.dsn or "", probe.answer, where=where
        )
    except DatabaseError as exc:  # a hot standby too: the text names the setting
        return str(exc)
    try:
        async with asyncio.timeout(5):
            await probe.round_trip()
        return None
    except TimeoutError:
        return (
            "a NOTIFY did not reach a LISTEN connection within 5 s (is NOTIFYD_DSN or "
            "NOTIFYD_LISTEN_DSN going through a transaction-mode pooler?)"
        )
    except DatabaseError as exc:
        return str(exc)
    finally:
        connection.terminate()
