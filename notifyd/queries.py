"""
The SQL text of every statement notifyd runs against its tables; running
them, and everything asyncpg, is :mod:`notifyd.db`'s job.

A change to what a window reads is made here (the window statements) and in
:mod:`notifyd.window` (how its pages are taken).
"""

from __future__ import annotations

__all__ = [
    "ANNOUNCE_LEASE",
    "CATCH_UP",
    "CHANNEL",
    "EVENTS",
    "EXPIRE_AT_TYPE",
    "HIDDEN",
    "HIDE",
    "HISTORY",
    "INSERT",
    "INSERT_LSN",
    "LEASE",
    "LINEAGE",
    "MARK_ALL_READ",
    "MARK_READ",
    "MARK_UNREAD",
    "NEXT_XACT_ID",
    "NOTIFY_LOCK_QUEUE",
    "POLL_PAYLOAD",
    "PRIVILEGES",
    "PRUNE_EVENTS",
    "RECEIPTS",
    "REQUIRED_COLUMNS",
    "REQUIRED_TRIGGERS",
    "RESTAMP",
    "RESTAMP_FUNCTION",
    "SET_LEASE",
    "SUSPECT_EVENTS",
    "SUSPECT_ROWS",
    "TABLE",
    "WINDOW_FIRST",
    "WINDOW_HEAD",
    "WINDOW_LEAN",
    "WINDOW_LEAN_AT",
    "WINDOW_REST",
    "advance_xact_id",
    "columns_for",
    "live_at",
]

CHANNEL = "notifyd"
TABLE = "t_message_real_time"
RECEIPTS = "t_message_receipt"
EVENTS = "t_message_event"
HIDDEN = "t_message_hidden"
LEASE = "notifyd_poll_lease"
RESTAMP_FUNCTION = "notifyd_restamp(xid8[])"

# Epoch milliseconds, floored, as the triggers' notifyd_wake() computes them.
_MS = "floor(extract(epoch FROM {clock}) * 1000)::bigint"

# Every window's head row tells delivery the polling lease as it is now
# (docs/deployment.md, "Wake-ups under load"): its end and the server's clock.
# now() is the statement's start, before its snapshot was taken: a lease seen
# over here was over before the snapshot, so every transaction that skipped
# its NOTIFY under it is either visible in the snapshot or was still in
# progress when it was taken (notifyd.pacing relies on that).
LEASE_COLUMNS = f"""(SELECT last_value FROM {LEASE}) AS lease_until,
       {_MS.format(clock="now()")} AS lease_now"""


# Every column is cast to what the protocol sends, so an application's
# existing table with varchar or char columns is read the same way.
COLUMNS = """
    seq, xact_id::text::bigint AS xact_id, id::text AS id, title::text AS title,
    content::text AS content, type::text AS type, send_user::text AS send_user,
    to_user::text AS to_user, send_time, skip_url::text AS skip_url,
    is_read::text AS is_read
"""


def live_at(clock: str, alias: str = "") -> str:
    """
    The condition that a message (``alias`` when given) has not expired at
    ``clock``, an SQL timestamptz expression: its ``expire_at`` is NULL
    (never) or later. Every statement that pushes, replays, lists or counts
    messages applies it, with one clock per statement (delivery's window
    passes its first page's ``now()`` to the pages and replays after it).
    """
    column = f"{alias}.expire_at" if alias else "expire_at"
    return f"({column} IS NULL OR {column} > {clock})"


# Not a message this user deleted from their inbox (``m`` is the message).
NOT_HIDDEN = f"""NOT EXISTS (
    SELECT 1 FROM {HIDDEN} AS h WHERE h.user_id = {{user}} AND h.message_id = m.id::text)"""


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
# not of their whole inbox; expire_at is in that index, so leaving out the
# expired ones (at the statement's now()) stays index-only.
UNREAD_BY_TYPE_OF = f"""
    (SELECT coalesce(json_object_agg(t, n), json_build_object()) FROM (
        SELECT coalesce(t, '') AS t, sum(n)::bigint AS n FROM (
            SELECT type::text AS t, count(*) AS n FROM {TABLE}
            WHERE to_user = {{user}} AND is_read = '0' AND {live_at("now()")}
            GROUP BY type
            UNION ALL
            SELECT a.type::text, count(*) FROM {TABLE} AS a
            WHERE a.to_user = '*' AND {live_at("now()", "a")} AND NOT EXISTS (
                SELECT 1 FROM {RECEIPTS} AS r
                WHERE r.user_id = {{user}} AND r.message_id = a.id::text)
            GROUP BY a.type
        ) AS unread
        GROUP BY 1
    ) AS by_type)
"""

# How far ahead a window reports the next expire_at: a value Python cannot
# hold (past the year 9999, or 'infinity') must never reach the driver, and
# delivery wakes up more often than this anyway.
EXPIRY_HORIZON = "now() + interval '1 hour'"

# The first expire_at after a moment: one probe of the expire_at index.
# Written as ORDER BY ... LIMIT 1 rather than min(): the same plan, planned
# in less time (the lean window read is planned anew on every execution
# until its generic plan is known to be safe: db.WindowPlans).
NEXT_EXPIRY_AFTER = f"""(SELECT expire_at FROM {TABLE}
        WHERE expire_at > {{after}} ORDER BY expire_at LIMIT 1)"""

# The primary's WAL insert position, taken after the statement's snapshot:
# a standby that has replayed this far (notifyd.replica.replayable) sees
# every commit the snapshot saw (docs/deployment.md, "Reads on a replica").
INSERT_LSN = "pg_current_wal_insert_lsn()::text"

# The first page is one statement, so one snapshot and one clock (now()):
# the new rows, the read/delete events, the withdrawals of what expired, the
# unread counts of users with events or withdrawals (and of joining
# sessions, $4) and the snapshot itself are one consistent view. Counts
# taken here already include this window's rows, events and expiries.
#
# Expiry ($5: the clock of the last window, up to which expiries were
# already withdrawn): a row the previous windows saw (visible in the base
# snapshot $1, so pushed and counted unless it had expired by then) whose
# expire_at passed since $5, or that an UPDATE in this window moved to the
# past ('expire' events: a user's row then even if no window saw it, since
# it may have been pushed ahead from its NOTIFY; a 'deleted' event for a
# message a client never got is ignored), is withdrawn as a 'deleted' event; its user is
# recounted, and an announcement carries its readers, as the app's DELETE
# does. New rows already past their expire_at are not read at all. An
# announcement the app deletes after it expired ($5 or earlier) was taken
# off the counts then: its event loses "inserted" so it is not again.
WINDOW_FIRST = f"""
WITH ev AS (
    SELECT xact_id::text AS xact_id, to_user, kind, ids, type, readers,
           CASE WHEN expire_at <= $5 THEN NULL ELSE inserted::text END AS inserted
    FROM {EVENTS}
    WHERE {NEW_SINCE}
), expired AS (
    SELECT m.id::text AS id, m.to_user::text AS to_user, m.type::text AS type,
           m.xact_id, m.seq
    FROM {TABLE} AS m
    WHERE m.expire_at > $5 AND m.expire_at <= now()
      AND pg_visible_in_snapshot(m.xact_id, $1::text::pg_snapshot)
    UNION
    SELECT m.id::text, m.to_user::text, m.type::text, m.xact_id, m.seq
    FROM ev JOIN {TABLE} AS m ON m.id::text = ANY(ev.ids) AND m.to_user::text = ev.to_user
    WHERE ev.kind = 'expire' AND m.expire_at <= now()
      AND (m.to_user::text <> '*' OR pg_visible_in_snapshot(m.xact_id, $1::text::pg_snapshot))
), withdrawn AS (
    SELECT '0' AS xact_id, to_user, 'deleted' AS kind, array_agg(id ORDER BY seq) AS ids,
           NULL::text AS type, NULL::text[] AS readers, NULL::text AS inserted
    FROM expired WHERE to_user <> '*'
    GROUP BY to_user
    UNION ALL
    SELECT '0', '*', 'deleted', ARRAY[e.id], e.type,
           coalesce((SELECT array_agg(r.user_id) FROM {RECEIPTS} AS r
                     WHERE r.message_id = e.id), '{{}}'),
           e.xact_id::text
    FROM expired AS e WHERE e.to_user = '*'
), counted AS (
    SELECT DISTINCT usr FROM (
        SELECT to_user AS usr FROM ev WHERE to_user <> '*'
        UNION ALL SELECT to_user FROM withdrawn WHERE to_user <> '*'
        UNION ALL SELECT unnest($4::text[])
    ) AS u
)
SELECT pg_current_snapshot()::text AS snap, now() AS clock,
       least({NEXT_EXPIRY_AFTER.format(after="now()")}, {EXPIRY_HORIZON})
           AS next_expiry,
       (SELECT json_agg(e) FROM (
            SELECT * FROM ev WHERE kind <> 'expire' UNION ALL SELECT * FROM withdrawn
        ) AS e)::text AS events,
       (SELECT json_object_agg(usr, {UNREAD_BY_TYPE_OF.format(user="usr")}) FROM counted)::text
           AS counts,
       {LEASE_COLUMNS}, {INSERT_LSN} AS lsn,
       NULL AS seq, NULL AS xact_id, NULL AS id, NULL AS title, NULL AS content,
       NULL AS type, NULL AS send_user, NULL AS to_user, NULL AS send_time,
       NULL AS skip_url, NULL AS is_read
UNION ALL (
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, {COLUMNS} FROM {TABLE}
    WHERE {NEW_SINCE} AND {live_at("now()")}
    ORDER BY seq
    LIMIT $3
)
"""

# The first page when no session is joining, as one statement too: most
# windows have no read/delete events, and this shape costs Postgres less than
# half the planning of WINDOW_FIRST (planned anew on every execution until
# the table is analyzed and the generic plan reads by index: db.WindowPlans).
# When events exist, or the first expiry after the last window's clock ($4)
# has come (next_expiry <= clock), the caller reads the window again with
# WINDOW_FIRST: nothing was routed yet, so only the end snapshot moves.
# Otherwise next_expiry is the next one to come, one probe of the expire_at
# index.
WINDOW_LEAN = f"""
SELECT pg_current_snapshot()::text AS snap, now() AS clock,
       EXISTS (SELECT 1 FROM {EVENTS} WHERE {NEW_SINCE}) AS has_events,
       {LEASE_COLUMNS},
       least({NEXT_EXPIRY_AFTER.format(after="$4")}, {EXPIRY_HORIZON})
           AS next_expiry,
       NULL AS seq, NULL AS xact_id, NULL AS id, NULL AS title, NULL AS content,
       NULL AS type, NULL AS send_user, NULL AS to_user, NULL AS send_time,
       NULL AS skip_url, NULL AS is_read
UNION ALL (
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, {COLUMNS} FROM {TABLE}
    WHERE {NEW_SINCE} AND {live_at("now()")}
    ORDER BY seq
    LIMIT $3
)
"""

# With reads on a standby: the window's end snapshot, clock and lease, taken
# on the primary in one statement (the lease read with the snapshot, as in
# LEASE_COLUMNS), and the position the standby must replay before reading.
# A standby cannot name its own snapshot exactly (PostgreSQL reports it
# without its in-progress list), so the primary's bounds the read.
WINDOW_HEAD = f"""
SELECT pg_current_snapshot()::text AS snap, now() AS clock, {LEASE_COLUMNS},
       {INSERT_LSN} AS lsn
"""

# WINDOW_LEAN on a standby that has replayed WINDOW_HEAD's position: bounded
# by that snapshot ($5) and clock ($6) rather than its own, so the rows are
# exactly those the primary's snapshot saw.
WINDOW_LEAN_AT = f"""
SELECT $5::text AS snap, $6::timestamptz AS clock,
       EXISTS (SELECT 1 FROM {EVENTS} WHERE {NEW_SINCE}
               AND pg_visible_in_snapshot(xact_id, $5::text::pg_snapshot)) AS has_events,
       least({NEXT_EXPIRY_AFTER.format(after="$4")}, $6::timestamptz + interval '1 hour')
           AS next_expiry,
       NULL AS seq, NULL AS xact_id, NULL AS id, NULL AS title, NULL AS content,
       NULL AS type, NULL AS send_user, NULL AS to_user, NULL AS send_time,
       NULL AS skip_url, NULL AS is_read
UNION ALL (
    SELECT NULL, NULL, NULL, NULL, {COLUMNS} FROM {TABLE}
    WHERE {NEW_SINCE} AND pg_visible_in_snapshot(xact_id, $5::text::pg_snapshot)
      AND {live_at("$6::timestamptz")}
    ORDER BY seq
    LIMIT $3
)
"""

# The rest of a window after its first page: bounded by the first page's
# snapshot, so the window does not grow while it is being read. Read through
# one cursor, so the rows are found and sorted once however many pages they
# fill. $5 is the first page's clock: a window has one (NULL: now()).
WINDOW_REST = f"""
SELECT {COLUMNS} FROM {TABLE}
WHERE {NEW_SINCE}
  AND seq > $3
  AND pg_visible_in_snapshot(xact_id, $4::text::pg_snapshot)
  AND {live_at("coalesce($5::timestamptz, now())")}
ORDER BY seq
"""

# One user's rows that a client at a cursor does not have and that the
# delivery snapshot $5 saw and that had not expired at its clock $7 (NULL:
# now()); newest first, so an overflow keeps the newest.
CATCH_UP = f"""
SELECT b.i, m.*
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
     WITH ORDINALITY AS b(usr, base, fin, s0, i)
CROSS JOIN LATERAL (
    SELECT {columns_for("b.usr")} FROM {TABLE} AS m
    WHERE to_user IN (b.usr, '*') AND {NOT_HIDDEN.format(user="b.usr")}
      AND xact_id >= pg_snapshot_xmin(b.base::pg_snapshot)
      AND NOT pg_visible_in_snapshot(xact_id, b.base::pg_snapshot)
      AND NOT (b.fin IS NOT NULL AND seq <= b.s0
               AND pg_visible_in_snapshot(xact_id, b.fin::pg_snapshot))
      AND pg_visible_in_snapshot(xact_id, $5::text::pg_snapshot)
      AND {live_at("coalesce($7::timestamptz, now())")}
    ORDER BY seq DESC
    LIMIT $6
) AS m
"""

# Marks the user's own messages and announcements read; ids of other users'
# messages match nothing and so change and reveal nothing.
# Mark unread again: own rows, and announcements by taking back this user's
# receipt; never a message the user deleted.
MARK_UNREAD = f"""
WITH own AS (
    UPDATE {TABLE} AS m SET is_read = '0'
    WHERE to_user = $1 AND id::text = ANY($2::text[]) AND is_read <> '0'
      AND {NOT_HIDDEN.format(user="$1")}
    RETURNING 1
), announcements AS (
    DELETE FROM {RECEIPTS} AS r
    WHERE r.user_id = $1 AND r.message_id = ANY($2::text[])
      AND NOT EXISTS (SELECT 1 FROM {HIDDEN} AS h
                      WHERE h.user_id = $1 AND h.message_id = r.message_id)
    RETURNING 1
)
SELECT (SELECT count(*) FROM own) + (SELECT count(*) FROM announcements)
"""

# A user's delete: hide their own messages and announcements with these ids
# from their inbox, and mark them read so that counts never need to look
# at what is hidden (every statement of a WITH runs, read or not). Run with notifyd.hiding set, so the only event is the
# hide's 'deleted'.
HIDE = f"""
WITH mine AS (
    SELECT id::text AS id, to_user FROM {TABLE}
    WHERE id::text = ANY($2::text[]) AND to_user IN ($1, '*')
), hidden AS (
    INSERT INTO {HIDDEN} (user_id, message_id)
    SELECT $1, id FROM mine
    ON CONFLICT DO NOTHING
    RETURNING message_id
), own_read AS (
    UPDATE {TABLE} SET is_read = '1'
    WHERE to_user = $1 AND is_read = '0' AND id::text IN (SELECT message_id FROM hidden)
    RETURNING 1
), announcements_read AS (
    INSERT INTO {RECEIPTS} (user_id, message_id)
    SELECT $1, m.id FROM mine AS m
    WHERE m.to_user = '*' AND m.id IN (SELECT message_id FROM hidden)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM hidden
"""

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

# Newest first, the user's own rows and announcements merged by seq, those
# past their expire_at left out; one extra row tells whether there is more.
HISTORY = f"""
SELECT * FROM (
    (SELECT {columns_for("$1")} FROM {TABLE} AS m
     WHERE to_user = $1 AND seq < $2 AND ($3::text IS NULL OR type = $3)
       AND (NOT $4 OR is_read = '0') AND {live_at("now()")}
       AND {NOT_HIDDEN.format(user="$1")}
     ORDER BY seq DESC LIMIT $5)
    UNION ALL
    (SELECT {columns_for("$1")} FROM {TABLE} AS m
     WHERE to_user = '*' AND seq < $2 AND ($3::text IS NULL OR type = $3)
       AND (NOT $4 OR NOT EXISTS (SELECT 1 FROM {RECEIPTS} AS r
                                  WHERE r.user_id = $1 AND r.message_id = m.id::text))
       AND {live_at("now()")} AND {NOT_HIDDEN.format(user="$1")}
     ORDER BY seq DESC LIMIT $5)
) AS h
ORDER BY seq DESC
LIMIT $5
"""

# Start or extend the polling lease to $1 ms from now (never shorten one:
# another instance may hold it longer). setval is not transactional: the
# lease is in force as soon as this runs. Its commit is not waited for
# (nothing here needs to survive a crash), and it takes no NOTIFY lock.
SET_LEASE = f"""
SELECT set_config('synchronous_commit', 'off', true) AS unflushed,
       setval('{LEASE}', greatest(last_value, {_MS.format(clock="clock_timestamp()")} + $1))
           AS lease_until,
       {_MS.format(clock="clock_timestamp()")} AS lease_now
FROM {LEASE}
"""

# After every SET_LEASE, a NOTIFY to every instance: one that waits for
# NOTIFYs must learn of the lease before it goes deaf. Every renewal
# notifies, not only a start: an instance held up past its lease's end
# extends a lease that already ran out, which others may have stopped
# polling for. Its own statement, because it queues for the NOTIFY lock like
# any other (four times a second at most, not once per message).
POLL_PAYLOAD = "poll"
ANNOUNCE_LEASE = f"""
SELECT set_config('synchronous_commit', 'off', true) AS unflushed,
       pg_notify('{CHANNEL}', '{POLL_PAYLOAD}') AS notified
"""

# A transaction id of its own, taken for draining (notifyd.pacing): Postgres
# hands them out in order, so every transaction that had one before has a
# lower one. Its commit is not waited for either.
NEXT_XACT_ID = """
SELECT pg_current_xact_id()::text AS xact_id,
       set_config('synchronous_commit', 'off', true) AS unflushed
"""

# The NOTIFY lock: a lock on the database object 0 of pg_database, taken by
# every committing transaction that queued a NOTIFY (PreCommit_Notify).
# pg_locks is readable by every role.
NOTIFY_LOCK_QUEUE = """
SELECT count(*) AS waiting
FROM pg_catalog.pg_locks
WHERE locktype = 'object' AND database = 0
  AND classid = 'pg_catalog.pg_database'::regclass AND objid = 0 AND NOT granted
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
    "send_time", "skip_url", "is_read", "seq", "xact_id", "expire_at",
)  # fmt: skip

# The one type expire_at may have: a timestamp without time zone (or text)
# cannot be compared with the clock unambiguously.
EXPIRE_AT_TYPE = "timestamp with time zone"


# What the daemon's own role must be allowed to do.
PRIVILEGES = f"""
SELECT
    has_table_privilege('{TABLE}', 'SELECT') AS read_messages,
    has_column_privilege('{TABLE}', 'is_read', 'UPDATE') AS update_is_read,
    has_table_privilege('{RECEIPTS}', 'SELECT') AND has_table_privilege('{RECEIPTS}', 'INSERT')
        AND has_table_privilege('{RECEIPTS}', 'DELETE') AS receipts,
    has_table_privilege('{HIDDEN}', 'SELECT') AND has_table_privilege('{HIDDEN}', 'INSERT')
        AS hidden,
    has_table_privilege('{EVENTS}', 'SELECT') AND has_table_privilege('{EVENTS}', 'DELETE')
        AS events,
    has_sequence_privilege('{LEASE}', 'SELECT') AND has_sequence_privilege('{LEASE}', 'UPDATE')
        AS lease,
    has_function_privilege('{RESTAMP_FUNCTION}', 'EXECUTE') AS restamp
"""


# The database's history as a new connection finds it: its cluster and the
# timeline it writes on (NULL on a standby). A promotion, or a restore to a
# point in time, starts a new timeline (docs/deployment.md, "Database
# failover").
LINEAGE = """
SELECT (SELECT system_identifier FROM pg_control_system())::text AS cluster,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END AS timeline
"""


def advance_xact_id(target: int) -> str:
    """
    A statement that takes transaction ids until the next one to be handed
    out is at least ``target``: each in a transaction of its own, committed
    without waiting for the disk but for the last, whose flush then covers
    them all (about 200,000 a second). Must run outside a transaction
    block, as a simple query (a ``DO`` takes no parameters).
    """
    return f"""
DO $$
BEGIN
    LOOP
        EXIT WHEN pg_current_xact_id() >= '{int(target)}'::xid8;
        PERFORM set_config('synchronous_commit', 'off', true);
        COMMIT;
    END LOOP;
END
$$"""


# The messages and events of transactions that the watermark $2 calls
# finished and the horizon $1 does not: what a reused transaction id may
# hide (notifyd.recall). Rows of transactions still in progress are not
# seen: the repair waits for them first.
_SUSPECTS = """xact_id >= pg_snapshot_xmin($1::text::pg_snapshot)
      AND NOT pg_visible_in_snapshot(xact_id, $1::text::pg_snapshot)
      AND pg_visible_in_snapshot(xact_id, $2::text::pg_snapshot)"""
SUSPECT_ROWS = f"""
SELECT xact_id::text::bigint AS xact_id, id::text AS id, seq FROM {TABLE}
WHERE {_SUSPECTS}
"""
SUSPECT_EVENTS = f"""
SELECT xact_id::text::bigint AS xact_id, to_user, kind, ids, type FROM {EVENTS}
WHERE {_SUSPECTS}
"""

# Give the rows and events of these transactions a fresh transaction id.
RESTAMP = "SELECT notifyd_restamp($1::text[]::xid8[])"
