"""
Sending notifyd messages from a Python application: psycopg 3, or
SQLAlchemy Core for an app that already has an engine.

A message is a row in ``t_message_real_time``, inserted in the
application's own transaction: notifyd pushes it to the addressee's
sessions when that transaction commits, and never if it rolls back. There
is no client library and no event to publish.

Copy what you need; docs/integrations.md walks through it, and
tests/test_integrations.py runs it against a real notifyd.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import psycopg
import sqlalchemy as sa


@dataclass(frozen=True, slots=True)
class Message:
    """
    One message, by the table's columns (the rest have defaults: ``id`` a
    UUID as text, ``send_time`` the transaction's ``now()``, ``is_read``
    ``'0'``).
    """

    to_user: str
    title: str
    content: str
    type: str | None = None
    send_user: str | None = None
    skip_url: str | None = None


_INSERT = """
    INSERT INTO t_message_real_time (to_user, title, content, type, send_user, skip_url)
    VALUES (%(to_user)s, %(title)s, %(content)s, %(type)s, %(send_user)s, %(skip_url)s)
"""


# -- psycopg 3 ----------------------------------------------------------------


def send(connection: psycopg.Connection, message: Message) -> str:
    """
    Insert one message in ``connection``'s current transaction; its id.

    Delivered when the caller commits (``with connection.transaction():``,
    or ``connection.commit()``), together with whatever else the
    transaction wrote: the order row and its notification commit or vanish
    together.
    """
    row = connection.execute(_INSERT + " RETURNING id", asdict(message)).fetchone()
    assert row is not None
    return str(row[0])


def send_many(connection: psycopg.Connection, messages: Iterable[Message]) -> None:
    """
    Insert many messages in the current transaction (psycopg 3 pipelines
    ``executemany``: one round trip, however many rows).
    """
    with connection.cursor() as cursor:
        cursor.executemany(_INSERT, [asdict(message) for message in messages])


# -- SQLAlchemy Core ------------------------------------------------------------

metadata = sa.MetaData()

# The columns an application writes. seq and xact_id are left out on
# purpose: PostgreSQL fills them, and they are how notifyd knows what each
# client has (never set them).
messages = sa.Table(
    "t_message_real_time",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, server_default=sa.text("gen_random_uuid()::text")),
    sa.Column("title", sa.Text),
    sa.Column("send_user", sa.Text),
    sa.Column("to_user", sa.Text, nullable=False),
    sa.Column("type", sa.Text),
    sa.Column("content", sa.Text),
    sa.Column("send_time", sa.DateTime(timezone=True), server_default=sa.func.now()),
    sa.Column("skip_url", sa.Text),
    sa.Column("is_read", sa.Text, server_default=sa.text("'0'")),
)


def insert_messages(items: Iterable[Message]) -> tuple[sa.Insert, list[dict[str, object]]]:
    """
    The Core statement and parameter list for ``connection.execute``, which
    runs it as one ``executemany`` in the connection's transaction::

        with engine.begin() as connection:          # commits on success
            connection.execute(*insert_messages(new_messages))
    """
    return sa.insert(messages), [asdict(item) for item in items]
