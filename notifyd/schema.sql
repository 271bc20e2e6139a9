-- notifyd schema for PostgreSQL 14 or newer.
--
-- Idempotent and non-destructive: running it again changes nothing, and
-- running it on a t_message_real_time that an application created earlier
-- (the seed entity's columns only) adds what delivery needs without touching
-- the existing rows' data.
--
-- Applications only ever INSERT into t_message_real_time (and UPDATE is_read
-- or expire_at, DELETE to retract); they never set seq or xact_id.

CREATE TABLE IF NOT EXISTS t_message_real_time (
    id        text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    title     text,
    send_user text,
    to_user   text NOT NULL,
    type      text,
    content   text,
    send_time timestamptz NOT NULL DEFAULT now(),
    skip_url  text,
    is_read   text NOT NULL DEFAULT '0'
);

-- Delivery order within a batch, history paging and cursors. Identity values
-- are taken at INSERT, not at COMMIT, so seq alone cannot tell what a client
-- has seen: xact_id can.
ALTER TABLE t_message_real_time
    ADD COLUMN IF NOT EXISTS seq bigint GENERATED ALWAYS AS IDENTITY;

-- The top-level transaction that inserted the row (savepoints included).
-- Cursors are built from pg_current_snapshot(): a row belongs after a cursor
-- exactly when its transaction was not visible in the cursor's snapshot, so
-- rows that commit out of seq order are never skipped.
ALTER TABLE t_message_real_time
    ADD COLUMN IF NOT EXISTS xact_id xid8 NOT NULL DEFAULT pg_current_xact_id();

-- When the message stops being shown (NULL: never). Past it, a message is
-- not pushed, replayed, listed or counted, and sessions that hold it are
-- sent a 'deleted' event (docs/protocol.md, "Expiring messages"). Added
-- without a default, so adding it rewrites no row.
ALTER TABLE t_message_real_time
    ADD COLUMN IF NOT EXISTS expire_at timestamptz;

-- An application's own expire_at of another type (text, a timestamp without
-- time zone) cannot be compared with the clock unambiguously: refuse, and
-- say what to do, rather than fail later in every read.
DO $$
DECLARE
    found_type text;
BEGIN
    SELECT format_type(atttypid, atttypmod) INTO found_type
    FROM pg_attribute
    WHERE attrelid = 't_message_real_time'::regclass AND attname = 'expire_at'
      AND attnum > 0 AND NOT attisdropped;
    IF found_type <> 'timestamp with time zone' THEN
        RAISE EXCEPTION 'column t_message_real_time.expire_at is %, not timestamptz: '
            'convert it (ALTER TABLE t_message_real_time ALTER COLUMN expire_at '
            'TYPE timestamptz USING ...) or rename it, then run notifyd init-db again',
            found_type;
    END IF;
END
$$;

-- An earlier application's table may lack the defaults that let apps omit
-- id, send_time and is_read; add them without rewriting any row.
DO $$
DECLARE
    col record;
BEGIN
    FOR col IN
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type_name
        FROM pg_attribute a
        WHERE a.attrelid = 't_message_real_time'::regclass
          AND a.attname IN ('id', 'send_time', 'is_read')
          AND NOT a.atthasdef AND a.attnum > 0 AND NOT a.attisdropped
    LOOP
        IF col.attname = 'id' AND (col.type_name IN ('text', 'character varying')
                OR col.type_name LIKE 'character varying(%') THEN
            EXECUTE 'ALTER TABLE t_message_real_time ALTER COLUMN id '
                    'SET DEFAULT gen_random_uuid()::text';
        ELSIF col.attname = 'send_time' AND col.type_name LIKE 'timestamp%' THEN
            EXECUTE 'ALTER TABLE t_message_real_time ALTER COLUMN send_time '
                    'SET DEFAULT now()';
        ELSIF col.attname = 'is_read' AND col.type_name ~ '^(text|character)' THEN
            EXECUTE 'ALTER TABLE t_message_real_time ALTER COLUMN is_read '
                    'SET DEFAULT ''0''';
        END IF;
    END LOOP;
END
$$;

-- "This user's history, newest first" (and keyset paging by seq).
CREATE INDEX IF NOT EXISTS t_message_real_time_user_seq
    ON t_message_real_time (to_user, seq DESC);

-- "This user's unread, by type": the unread counts per category are one
-- index-only range per user, expire_at included so that leaving out expired
-- messages needs no visit to the table. It replaces the indexes on
-- (to_user, type) and on (to_user) alone.
CREATE INDEX IF NOT EXISTS t_message_real_time_user_unread_expiry
    ON t_message_real_time (to_user, type, expire_at) WHERE is_read = '0';
DROP INDEX IF EXISTS t_message_real_time_user_unread_type;
DROP INDEX IF EXISTS t_message_real_time_user_unread;

-- "What expired since the last sweep" and "when is the next expiry": one
-- short range each, over the rows that expire at all.
CREATE INDEX IF NOT EXISTS t_message_real_time_expire_at
    ON t_message_real_time (expire_at) WHERE expire_at IS NOT NULL;

-- Resume of one user from a cursor: rows of transactions at or after the
-- cursor snapshot's xmin.
CREATE INDEX IF NOT EXISTS t_message_real_time_user_xact
    ON t_message_real_time (to_user, xact_id);

-- The delivery scan: rows of transactions not visible in the last snapshot.
CREATE INDEX IF NOT EXISTS t_message_real_time_xact
    ON t_message_real_time (xact_id);

-- The insert trigger looks for its transaction's earlier rows by xact_id,
-- with a plan PL/pgSQL caches for the session. Once most of the table came
-- from one transaction (a backfill, or a broadcast while the table was
-- young) and was analyzed, xact_id looks single-valued, and that cached plan
-- reads the whole table in every message-inserting statement (7 ms a commit
-- at 100,000 rows, growing with the table). Transactions are many and most
-- insert a few rows: so the statistics say, from the next ANALYZE on.
ALTER TABLE t_message_real_time ALTER COLUMN xact_id SET (n_distinct = -0.05);

-- The trigger functions run as the schema's owner (SECURITY DEFINER, with
-- the search_path of installation), so neither the applications' roles nor
-- notifyd's own role need any right on notifyd's bookkeeping tables.

-- The polling lease (docs/deployment.md, "Wake-ups under load"): while a
-- notifyd instance is reading continuously anyway, it keeps the end of a
-- short lease here, in epoch milliseconds, and the triggers below skip their
-- NOTIFY. A NOTIFY makes its transaction take a cluster-wide lock from
-- before its commit record until the record is flushed, so notifying commits
-- run one at a time; without it they share group commits again.
--
-- A sequence, not a table row: a sequence is not read through an MVCC
-- snapshot, so a REPEATABLE READ or SERIALIZABLE transaction sees the lease
-- as it is when its trigger runs, not as it was when the transaction began.
-- Only notifyd sets it (setval, never nextval); re-running this file keeps
-- its value.
CREATE SEQUENCE IF NOT EXISTS notifyd_poll_lease AS bigint MINVALUE 0 START 0;

-- The one wake-up of every trigger: NOTIFY, unless a lease is in force at
-- this moment (clock_timestamp(), not the transaction's start). Runs as the
-- schema's owner (SECURITY DEFINER, with the search_path of installation):
-- applications' roles need no right on the lease, and cannot move it.
-- pg_sequence_last_value() rather than a SELECT from the sequence: a plain
-- expression, which PL/pgSQL evaluates without starting the executor, so
-- the check costs each inserting statement about 5 us instead of 25-30 (NULL
-- until the first setval).
CREATE OR REPLACE FUNCTION notifyd_wake(payload text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF coalesce(pg_sequence_last_value('notifyd_poll_lease'::regclass), 0)
            <= floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint THEN
        PERFORM pg_notify('notifyd', payload);
    END IF;
END
$$;

-- The wake-up of an inserting statement, unless a lease is in force. It
-- carries the statement's rows (notifyd/ahead.py: "r<xact>:<json>") when they
-- are all the rows its transaction inserted so far, at most 8, and fit well
-- inside the 8000-byte NOTIFY limit: notifyd then pushes them without a query
-- and reads them again in its next window, which stays the source of truth.
-- Otherwise it says only which transaction inserted rows ("m<xact>"; identical
-- wake-ups of one transaction fold into one), and notifyd fetches them itself,
-- after commit, in batches, whatever their size.
--
-- The rows go in the order the statement inserted them, which notifyd puts
-- in seq order itself: an ORDER BY here would sort in every message-inserting
-- statement, and cost a single-row commit about a tenth of its CPU.
--
-- The lease's test is notifyd_wake()'s, written out here rather than called:
-- this runs in every message-inserting statement of the application, and a
-- second SECURITY DEFINER call (its own search_path to set and restore) cost
-- 16 writers 5 % of their commits a second while the lease was in force.
CREATE OR REPLACE FUNCTION notifyd_wake_on_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    xact xid8;
    carried text;
    carried_rows bigint;
    first_seq bigint;
BEGIN
    IF coalesce(pg_sequence_last_value('notifyd_poll_lease'::regclass), 0)
            > floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint THEN
        RETURN NULL;
    END IF;
    xact := pg_current_xact_id();
    SELECT count(*), min(r.seq),
           json_agg(json_build_array(r.id, r.title, r.send_user, r.to_user, r.type,
                                     r.content, r.send_time, r.skip_url, r.is_read,
                                     r.seq, r.expire_at))::text
      INTO carried_rows, first_seq, carried
      FROM (SELECT * FROM notifyd_inserted LIMIT 9) AS r;
    -- An earlier statement's rows (sent as "m", or under a lease, or carried)
    -- would be claimed by what this one carries without having been pushed.
    IF carried_rows BETWEEN 1 AND 8 AND octet_length(carried) < 7900
            AND NOT EXISTS (SELECT 1 FROM t_message_real_time
                            WHERE xact_id = xact AND seq < first_seq) THEN
        PERFORM pg_notify('notifyd', 'r' || xact || ':' || carried);
    ELSE
        PERFORM pg_notify('notifyd', 'm' || xact);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER notifyd_wake_on_insert
    AFTER INSERT ON t_message_real_time
    REFERENCING NEW TABLE AS notifyd_inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notifyd_wake_on_insert();

-- ---------------------------------------------------------------------------
-- The inbox: read state, deletions and announcements.
--
-- Rows addressed to '*' are announcements for every user; whether a user has
-- read one is a receipt row, not the shared is_read column.
CREATE TABLE IF NOT EXISTS t_message_receipt (
    user_id    text NOT NULL,
    message_id text NOT NULL,
    read_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, message_id)
);

CREATE INDEX IF NOT EXISTS t_message_real_time_announcements
    ON t_message_real_time (seq DESC) WHERE to_user = '*';

-- Read-state changes and deletions, one row per statement and user, written
-- by triggers so that a plain UPDATE or DELETE from the application reaches
-- every session too. notifyd reads them exactly like new messages (by the
-- writing transaction) and prunes them after a while. ids NULL means "all"
-- (a read-all, or more ids than fit in one event).
CREATE TABLE IF NOT EXISTS t_message_event (
    xact_id  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    at       timestamptz NOT NULL DEFAULT now(),
    to_user  text NOT NULL,
    kind     text NOT NULL CHECK (kind IN ('read', 'unread', 'deleted', 'expire')),
    ids      text[],
    type     text,
    readers  text[],
    -- For a deleted announcement: the transaction that had inserted it.
    inserted xid8
);

-- For a deleted announcement: its expire_at, so that one that had already
-- expired (and been taken off the counts then) is not taken off again.
ALTER TABLE t_message_event ADD COLUMN IF NOT EXISTS expire_at timestamptz;

-- 'expire': an UPDATE moved the expire_at of these messages; delivery
-- withdraws those that are now past it. Added to an existing table's check.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 't_message_event'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%''expire''%'
    ) THEN
        ALTER TABLE t_message_event DROP CONSTRAINT IF EXISTS t_message_event_kind_check;
        ALTER TABLE t_message_event ADD CONSTRAINT t_message_event_kind_check
            CHECK (kind IN ('read', 'unread', 'deleted', 'expire'));
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS t_message_event_xact ON t_message_event (xact_id);
CREATE INDEX IF NOT EXISTS t_message_event_at ON t_message_event (at);

-- notifyd's read_all sets this for its own UPDATE, so the event says "all"
-- (of a type) instead of listing thousands of ids.
CREATE OR REPLACE FUNCTION notifyd_read_all_type() RETURNS text
    LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('notifyd.read_all', true), '')
$$;

CREATE OR REPLACE FUNCTION notifyd_log_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    read_all text := notifyd_read_all_type();
    logged boolean;
BEGIN
    -- A message a user deletes is also marked read: its 'deleted' event
    -- says all there is to say (notifyd_log_hidden).
    IF current_setting('notifyd.hiding', true) = 'on' THEN
        RETURN NULL;
    END IF;
    INSERT INTO t_message_event (to_user, kind, ids, type)
    SELECT n.to_user::text,
           CASE WHEN n.is_read::text = '0' THEN 'unread' ELSE 'read' END,
           CASE WHEN read_all IS NOT NULL OR count(*) > 1000 THEN NULL
                ELSE array_agg(n.id::text ORDER BY n.seq) END,
           CASE WHEN read_all IS NOT NULL AND read_all <> '*' THEN read_all END
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE o.is_read IS DISTINCT FROM n.is_read AND n.to_user <> '*'
    GROUP BY n.to_user, n.is_read::text = '0';
    logged := FOUND;
    -- A moved expire_at: delivery decides, on its own clock, whether the
    -- messages are now past it (withdrawn) or not yet (a later sweep).
    INSERT INTO t_message_event (to_user, kind, ids)
    SELECT n.to_user::text, 'expire', array_agg(n.id::text ORDER BY n.seq)
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE o.expire_at IS DISTINCT FROM n.expire_at
    GROUP BY n.to_user;
    IF logged OR FOUND THEN
        PERFORM notifyd_wake('e' || pg_current_xact_id());
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION notifyd_log_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    -- Announcement receipts go with their announcement; the event records
    -- who had read it, so unread counts stay exact without a recount.
    WITH gone AS (
        DELETE FROM t_message_receipt r
        USING old_rows o
        WHERE o.to_user = '*' AND r.message_id = o.id::text
        RETURNING r.message_id, r.user_id
    )
    -- With its type, so the per-category count it leaves is known too.
    INSERT INTO t_message_event (to_user, kind, ids, readers, inserted, type, expire_at)
    SELECT '*', 'deleted', ARRAY[o.id::text],
           coalesce((SELECT array_agg(g.user_id) FROM gone g WHERE g.message_id = o.id::text), '{}'),
           o.xact_id, o.type::text, o.expire_at
    FROM old_rows o
    WHERE o.to_user = '*';

    INSERT INTO t_message_event (to_user, kind, ids)
    SELECT o.to_user::text, 'deleted', array_agg(o.id::text ORDER BY o.seq)
    FROM old_rows o
    WHERE o.to_user <> '*'
    GROUP BY o.to_user;
    PERFORM notifyd_wake('e' || pg_current_xact_id());
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION notifyd_log_receipt() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    read_all text := notifyd_read_all_type();
BEGIN
    IF current_setting('notifyd.hiding', true) = 'on' THEN
        RETURN NULL;
    END IF;
    INSERT INTO t_message_event (to_user, kind, ids, type)
    SELECT r.user_id,
           'read',
           CASE WHEN read_all IS NOT NULL OR count(*) > 1000 THEN NULL
                ELSE array_agg(r.message_id) END,
           CASE WHEN read_all IS NOT NULL AND read_all <> '*' THEN read_all END
    FROM new_rows r
    GROUP BY r.user_id;
    IF FOUND THEN
        PERFORM notifyd_wake('e' || pg_current_xact_id());
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER notifyd_log_update
    AFTER UPDATE ON t_message_real_time
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyd_log_update();

CREATE OR REPLACE TRIGGER notifyd_log_delete
    AFTER DELETE ON t_message_real_time
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyd_log_delete();

CREATE OR REPLACE TRIGGER notifyd_log_receipt
    AFTER INSERT ON t_message_receipt
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyd_log_receipt();

-- Messages a user deleted from their inbox (the "delete" action): hidden for
-- that user, not removed. The row stays the application's (its audit trail,
-- its other readers of an announcement), and the daemon needs no right to
-- delete rows. A hidden message is also read (so counts never look here),
-- and history and replay leave it out.
CREATE TABLE IF NOT EXISTS t_message_hidden (
    user_id    text NOT NULL,
    message_id text NOT NULL,
    hidden_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, message_id)
);

-- A hide tells every session of the user: a 'deleted' event for its ids.
CREATE OR REPLACE FUNCTION notifyd_log_hidden() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO t_message_event (to_user, kind, ids)
    SELECT h.user_id, 'deleted', array_agg(h.message_id ORDER BY h.message_id)
    FROM new_rows h
    GROUP BY h.user_id;
    IF FOUND THEN
        PERFORM notifyd_wake('e' || pg_current_xact_id());
    END IF;
    RETURN NULL;
END
$$;

-- Receipts taken back (the "unread" action on an announcement) tell every
-- session of the user, as an UPDATE of is_read to '0' does for own rows.
-- Receipts that go with their deleted announcement say nothing here: the
-- deletion has its own event.
CREATE OR REPLACE FUNCTION notifyd_log_receipt_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO t_message_event (to_user, kind, ids)
    SELECT r.user_id, 'unread', array_agg(r.message_id ORDER BY r.message_id)
    FROM old_rows r
    WHERE EXISTS (SELECT 1 FROM t_message_real_time m
                  WHERE m.to_user = '*' AND m.id::text = r.message_id)
    GROUP BY r.user_id;
    IF FOUND THEN
        PERFORM notifyd_wake('e' || pg_current_xact_id());
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER notifyd_log_hidden
    AFTER INSERT ON t_message_hidden
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyd_log_hidden();

CREATE OR REPLACE TRIGGER notifyd_log_receipt_delete
    AFTER DELETE ON t_message_receipt
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyd_log_receipt_delete();

-- After a failover that lost the old primary's last transactions, the
-- promoted standby hands their transaction ids out again, and rows committed
-- under such an id look finished to every snapshot taken before the switch:
-- delivery's watermark, clients' cursors and the webhook's fill point
-- would pass over them. notifyd finds them (notifyd/failover.py) and gives
-- their rows and events the id of this transaction, a fresh one above every
-- id those snapshots knew, so that all of them see the rows as new. Runs as
-- the schema's owner; only notifyd's role may call it (role.sql).
CREATE OR REPLACE FUNCTION notifyd_restamp(reused xid8[]) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    messages bigint;
    events bigint;
BEGIN
    UPDATE t_message_real_time SET xact_id = pg_current_xact_id()
    WHERE xact_id = ANY(reused);
    GET DIAGNOSTICS messages = ROW_COUNT;
    UPDATE t_message_event SET xact_id = pg_current_xact_id()
    WHERE xact_id = ANY(reused);
    GET DIAGNOSTICS events = ROW_COUNT;
    RETURN messages + events;
END
$$;

REVOKE ALL ON FUNCTION notifyd_restamp(xid8[]) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Sinks: what the webhook still owes, shared by every instance
-- (notifyd/dispatch.py, docs/sinks.md). Only used when the webhook sink is
-- enabled; the daemon fills, claims and prunes these itself.

-- One row per sink and message: pending until sent (2xx), seen (offline
-- fallback: a session had it in time), rejected (4xx), expired (max age) or
-- gone (the message was deleted first).
CREATE TABLE IF NOT EXISTS t_message_dispatch (
    sink       text NOT NULL,
    message_id text NOT NULL,
    seq        bigint NOT NULL,
    state      text NOT NULL DEFAULT 'pending'
               CHECK (state IN ('pending', 'sent', 'seen', 'rejected', 'expired', 'gone')),
    attempts   integer NOT NULL DEFAULT 0,
    next_at    timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    done_at    timestamptz,
    last_error text,
    PRIMARY KEY (sink, message_id)
);

-- The claim: a sink's pending rows, oldest first.
CREATE INDEX IF NOT EXISTS t_message_dispatch_pending
    ON t_message_dispatch (sink, seq) WHERE state = 'pending';

CREATE INDEX IF NOT EXISTS t_message_dispatch_done
    ON t_message_dispatch (done_at) WHERE state <> 'pending';

-- Per sink, the snapshot up to which committed messages have been added to
-- t_message_dispatch (delivery's watermark rule, kept in the database so a
-- restart or another instance goes on from it).
CREATE TABLE IF NOT EXISTS t_message_dispatch_state (
    sink      text PRIMARY KEY,
    snap      pg_snapshot NOT NULL,
    filled_at timestamptz NOT NULL DEFAULT now()
);

-- Messages some instance pushed to at least one live session.
CREATE TABLE IF NOT EXISTS t_message_seen (
    message_id text PRIMARY KEY,
    seen_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS t_message_seen_at ON t_message_seen (seen_at);
