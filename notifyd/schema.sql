-- notifyd schema for PostgreSQL 14 or newer.
--
-- Idempotent and non-destructive: running it again changes nothing, and
-- running it on a t_message_real_time that an application created earlier
-- (the seed entity's columns only) adds what delivery needs without touching
-- the existing rows' data.
--
-- Applications only ever INSERT into t_message_real_time (and UPDATE is_read,
-- DELETE to retract); they never set seq or xact_id.

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

-- "This user's unread".
CREATE INDEX IF NOT EXISTS t_message_real_time_user_unread
    ON t_message_real_time (to_user) WHERE is_read = '0';

-- Resume of one user from a cursor: rows of transactions at or after the
-- cursor snapshot's xmin.
CREATE INDEX IF NOT EXISTS t_message_real_time_user_xact
    ON t_message_real_time (to_user, xact_id);

-- The delivery scan: rows of transactions not visible in the last snapshot.
CREATE INDEX IF NOT EXISTS t_message_real_time_xact
    ON t_message_real_time (xact_id);

-- One constant wake-up per inserting statement. The payload is tiny and fixed
-- so it can never hit the 8000-byte NOTIFY limit, whatever the row size, and
-- identical wake-ups of one transaction fold into one. The daemon fetches the
-- rows itself, after commit, in batches.
CREATE OR REPLACE FUNCTION notifyd_wake_on_insert() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notifyd', 'm');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER notifyd_wake_on_insert
    AFTER INSERT ON t_message_real_time
    FOR EACH STATEMENT EXECUTE FUNCTION notifyd_wake_on_insert();
