'use strict';
// Sending notifyd messages from Node.js with node-postgres (npm install pg).
//
// A message is a row in t_message_real_time, inserted in the application's
// own transaction: notifyd pushes it to the addressee's sessions when that
// transaction commits, and never if it rolls back. No client library, no
// event to publish. docs/integrations.md walks through it;
// tests/test_integrations.py runs it against a real notifyd.
//
// As a command: DATABASE_URL=postgres://app@db/app node send.js u42 "Title" "Content" [type] [skipUrl]

const { Pool } = require('pg');

const COLUMNS = 'to_user, title, content, type, send_user, skip_url';

// id, send_time and is_read have defaults; never set seq or xact_id.
const INSERT_ONE = `INSERT INTO t_message_real_time (${COLUMNS})
                    VALUES ($1, $2, $3, $4, $5, $6) RETURNING id`;

// Many messages in one statement: one round trip and one wake-up for
// notifyd, however many rows (each array is one column).
const INSERT_MANY = `INSERT INTO t_message_real_time (${COLUMNS})
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[],
                                          $4::text[], $5::text[], $6::text[])
                     RETURNING id`;

function columnsOf(message) {
  return [
    message.toUser,
    message.title,
    message.content,
    message.type ?? null,
    message.sendUser ?? null,
    message.skipUrl ?? null,
  ];
}

/**
 * Insert one message with `client` (a pg Client, or a PoolClient inside a
 * transaction); resolves to its id. Sent when that transaction commits.
 */
async function sendMessage(client, message) {
  const { rows } = await client.query(INSERT_ONE, columnsOf(message));
  return rows[0].id;
}

/**
 * Insert many messages in one statement; resolves to their ids, in order.
 */
async function sendMessages(client, messages) {
  const columns = [[], [], [], [], [], []];
  for (const message of messages) {
    columnsOf(message).forEach((value, index) => columns[index].push(value));
  }
  const { rows } = await client.query(INSERT_MANY, columns);
  return rows.map((row) => row.id);
}

/**
 * Run `work(client)` in one transaction on a client from `pool`: COMMIT when
 * it resolves (its messages are sent then), ROLLBACK when it throws (they
 * never are).
 */
async function inTransaction(pool, work) {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    const result = await work(client);
    await client.query('COMMIT');
    return result;
  } catch (error) {
    await client.query('ROLLBACK');
    throw error;
  } finally {
    client.release();
  }
}

module.exports = { sendMessage, sendMessages, inTransaction };

if (require.main === module) {
  const [toUser, title, content, type, skipUrl] = process.argv.slice(2);
  if (!toUser || !title || content === undefined) {
    console.error('usage: DATABASE_URL=... node send.js TO_USER TITLE CONTENT [TYPE] [SKIP_URL]');
    process.exit(2);
  }
  const pool = new Pool({ connectionString: process.env.DATABASE_URL });
  inTransaction(pool, (client) => sendMessage(client, { toUser, title, content, type, skipUrl }))
    .then((id) => console.log(id))
    .catch((error) => {
      console.error(`send.js: ${error.message}`);
      process.exitCode = 1;
    })
    .finally(() => pool.end());
}
