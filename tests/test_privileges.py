"""
Least privilege: the daemon's role reads messages and changes only is_read;
an application's role needs rights on the message table alone.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg
import pytest

from notifyd.db import Database, role_sql

from .conftest import insert


async def test_daemon_works_under_the_least_privilege_role(
    db, login_role, start_daemon, open_client
):
    """Deliveries, reads, history and counts all work as notifyd_daemon."""
    await db.execute(role_sql())
    daemon_dsn = await login_role("IN ROLE notifyd_daemon")
    daemon = await start_daemon(dsn=daemon_dsn)
    client = await open_client(daemon.url("alice"))
    message = await insert(db, "alice", "hello")
    announcement = await insert(db, "*", "to all")
    await client.messages_until("to all")
    await client.send({"action": "read", "ids": [message, announcement]})
    await client.send({"action": "history"})
    frames = []
    while not any(f["event"] == "history" for f in frames):
        frames.append(await client.recv())
    history = next(f for f in frames if f["event"] == "history")
    assert {m["title"] for m in history["messages"]} == {"hello", "to all"}
    assert (
        await db.fetchval("SELECT is_read FROM t_message_real_time WHERE id = $1", message) == "1"
    )


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO t_message_real_time (to_user, title) VALUES ('x', 'forged')",
        "UPDATE t_message_real_time SET title = 'rewritten'",
        "UPDATE t_message_real_time SET to_user = 'someone else'",
        "DELETE FROM t_message_real_time",
        "INSERT INTO t_message_event (to_user, kind) VALUES ('x', 'read')",
        "DROP TABLE t_message_real_time",
    ],
)
async def test_daemon_role_cannot_write_anything_but_is_read(db, login_role, statement):
    """notifyd_daemon is refused every write except is_read (and receipts and hiding)."""
    await db.execute(role_sql())
    await insert(db, "alice", "original")
    connection = await asyncpg.connect(await login_role("IN ROLE notifyd_daemon"))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute(statement)
        await connection.execute("UPDATE t_message_real_time SET is_read = '1'")
    finally:
        await connection.close()
    assert await db.fetchval("SELECT title FROM t_message_real_time") == "original"


async def test_application_role_needs_rights_on_the_message_table_only(
    db, login_role, start_daemon, open_client
):
    """An app role with plain DML on t_message_real_time can insert, mark read and recall."""
    app_dsn = await login_role("")
    role = urlsplit(app_dsn).netloc.partition("@")[0]
    await db.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON t_message_real_time TO {role}")
    daemon = await start_daemon()
    client = await open_client(daemon.url("alice"))
    app = await asyncpg.connect(app_dsn)
    try:
        message = await insert(app, "alice", "from the app")
        await client.messages_until("from the app")
        await app.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", message)
        await app.execute("DELETE FROM t_message_real_time WHERE id = $1", message)
    finally:
        await app.close()
    events = []
    while "deleted" not in events:
        events.append((await client.recv())["event"])
    assert "read" in events


async def test_a_role_without_the_rights_is_named_at_startup(db, login_role):
    """schema_problems says which privilege the daemon's role lacks."""
    bare = await login_role("")
    database = await Database.connect(bare)
    try:
        problems = await database.schema_problems()
    finally:
        await database.close()
    assert problems and "lacks SELECT on t_message_real_time" in problems[0]


async def test_the_daemon_role_renews_the_lease_and_an_app_role_inserts_under_it(db, login_role):
    """notifyd_daemon may set the polling lease; an app role needs no right on it to insert."""
    await db.execute(role_sql())
    daemon = await Database.connect(await login_role("IN ROLE notifyd_daemon"))
    try:
        lease = await daemon.set_lease(60_000)
        await daemon.announce_lease()
    finally:
        await daemon.close()
    assert lease.in_force
    app_dsn = await login_role("")
    role = urlsplit(app_dsn).netloc.partition("@")[0]
    await db.execute(f"GRANT INSERT ON t_message_real_time TO {role}")
    app = await asyncpg.connect(app_dsn)
    try:
        await app.execute("INSERT INTO t_message_real_time (to_user, title) VALUES ('a', 'x')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute("SELECT setval('notifyd_poll_lease', 0)")
    finally:
        await app.close()


async def test_a_role_without_the_lease_grant_is_named_at_startup(db, login_role):
    """schema_problems names the missing rights on the lease sequence in one line."""
    await db.execute(role_sql())
    await db.execute("REVOKE ALL ON SEQUENCE notifyd_poll_lease FROM notifyd_daemon")
    database = await Database.connect(await login_role("IN ROLE notifyd_daemon"))
    try:
        problems = await database.schema_problems()
    finally:
        await database.close()
    assert problems == [
        "the database role lacks SELECT and UPDATE on sequence notifyd_poll_lease: "
        "apply role.sql (`notifyd init-db --role`)"
    ]
