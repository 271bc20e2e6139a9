"""
The SQL text of every statement notifyd runs against its tables; running
them, and everything asyncpg, is :mod:`notifyd.db`'s job.

A change to what a window reads is made here (the window statements) and in
:mod:`notifyd.window` (how its pages are taken).
"""

from __future__ import annotations

__all__ = [
    "CATCH_UP",
    "CHANNEL",
    "EVENTS",
    "HISTORY",
    "INSERT",
    "MARK_ALL_READ",
    "MARK_READ",
    "PRIVILEGES",
    "PRUNE_EVENTS",
    "RECEIPTS",
    "REQUIRED_COLUMNS",
    "REQUIRED_TRIGGERS",
    "TABLE",
    "WINDOW_FIRST",
    "WINDOW_LEAN",
    "WINDOW_REST",
    "columns_for",
]

CHANNEL = "notifyd"
TABLE = "t_message_real_time"
RECEIPTS = "t_message_receipt"
EVENTS = "t_message_event"


# Every column is cast to what the protocol sends, so an application's
# existing table with varchar or char columns is read the same way.
COLUMNS = """
    seq, xact_id::text::bigint AS xact_id, id::text AS id, title::text AS title,
    content::text AS content, type::text AS type, send_user::text AS send_user,
    to_user::text AS to_user, send_time, skip_url::text AS skip_url,
    is_read::text AS is_read
"""


def columns_for(user: str) -> str:
    """
    The message columns with ``is_read`` as ``user`` sees it: an
    announcement is read when the user has a receipt for it.
    """
    return COLUMNS.replace(
        "is_read::text AS is_read",
        f"""CASE WHEN to_user = '*' THEN
            CASE WHEN EXISTS (SELECT 1 FROM {RECEIPTS} AS r
                              WHERE r.user_id = {user} AND r.message_id = id::text)
                 THEN '1' ELSE '0' END
        ELSE is_read::text END AS is_read""",
    )


# Rows of transactions not visible in the previous snapshot ($1 = the
# snapshot, $2 = its in-progress list): an exact, index-backed "what is new",
# however long another transaction holds the snapshot's xmin back.
#
# Each arm is written as a range with both ends, though one end always holds
# (no xid8 is above the largest; in-progress ids lie in [xmin, xmax)): on a
# table never analyzed, as a new or truncated one is until autovacuum comes
# by, Postgres guesses a third of the table for "xact_id >= x" and reads all
# of it sequentially on every window; for a two-ended range it guesses 0.5 %
# and uses the index. With statistics both ends are estimated from them.
NEW_SINCE = """(
    (xact_id >= pg_snapshot_xmax($1::text::pg_snapshot)
     AND xact_id <= '18446744073709551615'::xid8)
    OR (xact_id = ANY($2::text[]::xid8[])
        AND xact_id >= pg_snapshot_xmin($1::text::pg_snapshot)
        AND xact_id < pg_snapshot_xmax($1::text::pg_snapshot))
)"""

# A user's unread counts by type, as a JSON object (type -> count, a NULL
# type under ""; types with nothing unread left out): own unread rows plus
# announcements without a receipt. Grouped in the index on (to_user, type)
# of unread rows, so the cost is one index range of the user's unread rows,
# not of their whole inbox.
UNREAD_BY_TYPE_OF = f"""
    (SELECT coalesce(json_object_agg(t, n), json_build_object()) FROM (
        SELECT coalesce(t, '') AS t, sum(n)::bigint AS n FROM (
            SELECT type::text AS t, count(*) AS n FROM {TABLE}
            WHERE to_user = {{user}} AND is_read = '0'
            GROUP BY type
            UNION ALL
            SELECT a.type::text, count(*) FROM {TABLE} AS a
            WHERE a.to_user = '*' AND NOT EXISTS (
                SELECT 1 FROM {RECEIPTS} AS r
                WHERE r.user_id = {{user}} AND r.message_id = a.id::text)
            GROUP BY a.type
        ) AS unread
        GROUP BY 1
    ) AS by_type)
"""

# The first page is one statement, so one snapshot: the new rows, the
# read/delete events, the unread counts of users with events (and of joining
# sessions, $4) and the snapshot itself are one consistent view. Counts taken
# here already include this window's rows and events.
WINDOW_FIRST = f"""
WITH ev AS (
    SELECT xact_id::text AS xact_id, to_user, kind, ids, type, readers,
           inserted::text AS inserted
    FROM {EVENTS}
    WHERE {NEW_SINCE}
), counted AS (
    SELECT DISTINCT usr FROM (
        SELECT to_user AS usr FROM ev WHERE to_user <> '*'
        UNION ALL SELECT unnest($4::text[])
    ) AS u
)
SELECT pg_current_snapshot()::text AS snap,
       (SELECT json_agg(ev) FROM ev)::text AS events,
       (SELECT json_object_agg(usr, {UNREAD_BY_TYPE_OF.format(user="usr")}) FROM counted)::text
           AS counts,
       NULL AS seq, NULL AS xact_id, NULL AS id, NULL AS title, NULL AS content,
       NULL AS type, NULL AS send_user, NULL AS to_user, NULL AS send_time,
       NULL AS skip_url, NULL AS is_read
UNION ALL (
    SELECT NULL, NULL, NULL, {COLUMNS} FROM {TABLE}
    WHERE {NEW_SINCE}
    ORDER BY seq
    LIMIT $3
)
"""

# The first page when no session is joining, as one statement too: most
# windows have no read/delete events, and this shape costs Postgres less than
# half the planning of WINDOW_FIRST (planned anew on every execution, since
# its best plan depends on the snapshot). When events exist, the caller reads
# the window again with WINDOW_FIRST: nothing was routed yet, so only the
# end snapshot moves.
WINDOW_LEAN = f"""
SELECT pg_current_snapshot()::text AS snap,
       EXISTS (SELECT 1 FROM {EVENTS} WHERE {NEW_SINCE}) AS has_events,
       NULL AS seq, NULL AS xact_id, NULL AS id, NULL AS title, NULL AS content,
       NULL AS type, NULL AS send_user, NULL AS to_user, NULL AS send_time,
       NULL AS skip_url, NULL AS is_read
UNION ALL (
    SELECT NULL, NULL, {COLUMNS} FROM {TABLE}
    WHERE {NEW_SINCE}
    ORDER BY seq
    LIMIT $3
)
"""

# The rest of a window after its first page: bounded by the first page's
# snapshot, so the window does not grow while it is being read. Read through
# one cursor, so the rows are found and sorted once however many pages they
# fill.
WINDOW_REST = f"""
SELECT {COLUMNS} FROM {TABLE}
WHERE {NEW_SINCE}
  AND seq > $3
  AND pg_visible_in_snapshot(xact_id, $4::text::pg_snapshot)
ORDER BY seq
"""

# One user's rows that a client at a cursor does not have and that the
# delivery snapshot $5 saw; newest first, so an overflow keeps the newest.
CATCH_UP = f"""
SELECT b.i, m.*
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
     WITH ORDINALITY AS b(usr, base, fin, s0, i)
CROSS JOIN LATERAL (
    SELECT {columns_for("b.usr")} FROM {TABLE}
    WHERE to_user IN (b.usr, '*')
      AND xact_id >= pg_snapshot_xmin(b.base::pg_snapshot)
      AND NOT pg_visible_in_snapshot(xact_id, b.base::pg_snapshot)
      AND NOT (b.fin IS NOT NULL AND seq <= b.s0
               AND pg_visible_in_snapshot(xact_id, b.fin::pg_snapshot))
      AND pg_visible_in_snapshot(xact_id, $5::text::pg_snapshot)
    ORDER BY seq DESC
    LIMIT $6
) AS m
"""

# Marks the user's own messages and announcements read; ids of other users'
# messages match nothing and so change and reveal nothing.
MARK_READ = f"""
WITH own AS (
    UPDATE {TABLE} SET is_read = '1'
    WHERE to_user = $1 AND id::text = ANY($2::text[]) AND is_read = '0'
    RETURNING 1
), announcements AS (
    INSERT INTO {RECEIPTS} (user_id, message_id)
    SELECT $1, id::text FROM {TABLE}
    WHERE to_user = '*' AND id::text = ANY($2::text[])
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM own) + (SELECT count(*) FROM announcements)
"""

MARK_ALL_READ = f"""
WITH own AS (
    UPDATE {TABLE} SET is_read = '1'
    WHERE to_user = $1 AND is_read = '0' AND ($2::text IS NULL OR type = $2)
    RETURNING 1
), announcements AS (
    INSERT INTO {RECEIPTS} (user_id, message_id)
    SELECT $1, id::text FROM {TABLE}
    WHERE to_user = '*' AND ($2::text IS NULL OR type = $2)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM own) + (SELECT count(*) FROM announcements)
"""

# Newest first, the user's own rows and announcements merged by seq; one
# extra row tells whether there is more.
HISTORY = f"""
SELECT * FROM (
    (SELECT {columns_for("$1")} FROM {TABLE}
     WHERE to_user = $1 AND seq < $2 AND ($3::text IS NULL OR type = $3)
       AND (NOT $4 OR is_read = '0')
     ORDER BY seq DESC LIMIT $5)
    UNION ALL
    (SELECT {columns_for("$1")} FROM {TABLE} AS m
     WHERE to_user = '*' AND seq < $2 AND ($3::text IS NULL OR type = $3)
       AND (NOT $4 OR NOT EXISTS (SELECT 1 FROM {RECEIPTS} AS r
                                  WHERE r.user_id = $1 AND r.message_id = m.id::text))
     ORDER BY seq DESC LIMIT $5)
) AS h
ORDER BY seq DESC
LIMIT $5
"""

PRUNE_EVENTS = f"DELETE FROM {EVENTS} WHERE at < now() - make_interval(secs => $1)"

INSERT = f"""
INSERT INTO {TABLE} (to_user, title, content, type, skip_url, send_user)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id::text
"""

REQUIRED_TRIGGERS = (
    "notifyd_wake_on_insert", "notifyd_log_update", "notifyd_log_delete",
)  # fmt: skip

REQUIRED_COLUMNS = (
    "id", "title", "send_user", "to_user", "type", "content",
    "send_time", "skip_url", "is_read", "seq", "xact_id",
)  # fmt: skip


# What the daemon's own role must be allowed to do.
PRIVILEGES = f"""
SELECT
    has_table_privilege('{TABLE}', 'SELECT') AS read_messages,
    has_column_privilege('{TABLE}', 'is_read', 'UPDATE') AS update_is_read,
    has_table_privilege('{RECEIPTS}', 'SELECT') AND has_table_privilege('{RECEIPTS}', 'INSERT')
        AS receipts,
    has_table_privilege('{EVENTS}', 'SELECT') AND has_table_privilege('{EVENTS}', 'DELETE')
        AS events
"""
