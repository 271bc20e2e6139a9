-- A least-privilege role for the notifyd daemon (run as a superuser or a
-- role with CREATEROLE, after schema.sql; idempotent).
--
-- notifyd_daemon can read messages, change nothing but is_read, add and take
-- back read receipts for announcements, hide messages from one user's inbox
-- (a user's "delete"), prune its own event log and keep the webhook's
-- dispatch tables, set the polling lease, and after a failover that lost
-- transactions move the rows committed under a reused transaction id to a
-- fresh one. It cannot insert, delete or rewrite messages. Give the daemon a login role in it:
--
--   CREATE ROLE notifyd LOGIN PASSWORD '...' IN ROLE notifyd_daemon;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'notifyd_daemon') THEN
        CREATE ROLE notifyd_daemon NOLOGIN;
    END IF;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO notifyd_daemon', current_schema());
END
$$;

REVOKE ALL ON t_message_real_time, t_message_receipt, t_message_event, t_message_hidden
    FROM notifyd_daemon;
GRANT SELECT ON t_message_real_time TO notifyd_daemon;
GRANT UPDATE (is_read) ON t_message_real_time TO notifyd_daemon;
GRANT SELECT, INSERT, DELETE ON t_message_receipt TO notifyd_daemon;
GRANT SELECT, INSERT ON t_message_hidden TO notifyd_daemon;
GRANT SELECT, DELETE ON t_message_event TO notifyd_daemon;

-- Sinks: the webhook's dispatch bookkeeping (schema.sql, last section).
REVOKE ALL ON t_message_dispatch, t_message_dispatch_state, t_message_seen FROM notifyd_daemon;
GRANT SELECT, INSERT, UPDATE, DELETE ON t_message_dispatch TO notifyd_daemon;
GRANT SELECT, INSERT, UPDATE ON t_message_dispatch_state TO notifyd_daemon;
GRANT SELECT, INSERT, DELETE ON t_message_seen TO notifyd_daemon;

-- The polling lease (schema.sql): read with every window, set by setval()
-- while the daemon is reading continuously.
REVOKE ALL ON SEQUENCE notifyd_poll_lease FROM notifyd_daemon;
GRANT SELECT, UPDATE ON SEQUENCE notifyd_poll_lease TO notifyd_daemon;

-- The repair after a failover that lost transactions (schema.sql,
-- notifyd_restamp): gives rows committed under a reused transaction id a
-- fresh one.
GRANT EXECUTE ON FUNCTION notifyd_restamp(xid8[]) TO notifyd_daemon;
