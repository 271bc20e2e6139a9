"""
The built-in webhook sink: POST each message as JSON to a gateway (SMS,
e-mail, mobile push), once, from the database.

The sink call itself only records and wakes: messages that reached a live
session are written to ``t_message_seen`` (offline mode), and the sender is
woken. The sender (``run``) works from the dispatch table
(:mod:`notifyd.dispatch`), so what is sent does not depend on this
instance having routed the row: a restart, a second instance or a receiver
down for an hour change nothing but the timing, and a backlog drains oldest
first. Of all instances, the one holding the sink's
:class:`~notifyd.dispatch.SenderLock` sends; the others wait in the lock's
queue and take over the moment its session ends.

Each POST carries ``Notifyd-Timestamp``, ``Notifyd-Signature`` (HMAC-SHA256,
see :mod:`notifyd.sinks.policy`), ``Idempotency-Key`` (the message id) and
``Notifyd-Attempt``. 2xx marks the message sent; 5xx, 408, 425, 429 and no
answer are retried with backoff (``Retry-After`` honoured); other answers
reject it for good. A message still unsent ``NOTIFYD_WEBHOOK_MAX_AGE_S``
after commit is given up (``expired``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path

import orjson

from ..backoff import backoff_delay
from ..db import Row
from ..dispatch import DispatchStore, SenderLock
from ..exceptions import ConfigError, DatabaseError, SchemaError, describe
from . import SinkContext, SinkMessage
from .http import HttpError, post
from .policy import (
    Outcome,
    classify_status,
    parse_retry_after,
    parse_webhook_url,
    signature_headers,
    type_allowed,
)

__all__ = ["WebhookSink", "create"]

logger = logging.getLogger(__name__)

_MIN_SECRET_BYTES = 16
_PRUNE_EVERY_S = 60.0
# Seen marks waiting for the database; past this the oldest are forgotten
# (they only save a POST).
_MAX_UNRECORDED_SEEN = 100_000


def create(context: SinkContext) -> WebhookSink:
    """
    The ``webhook`` entry point.
    """
    return WebhookSink(context)


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """
    Verifying TLS: the system's trust store, or ``ca_file`` instead.
    """
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"NOTIFYD_WEBHOOK_CA_FILE {str(ca_file)!r} cannot be used: {describe(exc)}"
        ) from None


class WebhookSink:
    """
    Sends messages to ``NOTIFYD_WEBHOOK_URL`` through the dispatch table.
    """

    counts_itself = True

    def __init__(self, context: SinkContext) -> None:
        settings = context.settings
        self._context = context
        self._stats = context.stats
        self._target = parse_webhook_url(settings.webhook_url)
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        if len(secret.encode()) < _MIN_SECRET_BYTES:
            raise ConfigError(
                f"the webhook sink needs NOTIFYD_WEBHOOK_SECRET of at least {_MIN_SECRET_BYTES} "
                "bytes (the receiver verifies the HMAC signature with it)"
            )
        self._secret = secret.encode()
        self._offline = settings.webhook_mode == "offline"
        if self._offline and settings.webhook_offline_after_s >= settings.webhook_max_age_s:
            raise ConfigError(
                "NOTIFYD_WEBHOOK_OFFLINE_AFTER_S must be shorter than NOTIFYD_WEBHOOK_MAX_AGE_S"
            )
        self._due_in = settings.webhook_offline_after_s if self._offline else 0.0
        self._types = list(settings.webhook_types)
        self._timeout = settings.webhook_timeout_s
        self._retry_initial = settings.webhook_retry_initial_s
        self._retry_max = settings.webhook_retry_max_s
        self._max_age = settings.webhook_max_age_s
        self._batch = settings.webhook_batch
        self._poll = settings.webhook_poll_s
        self._ssl = _tls_context(settings.webhook_ca_file) if self._target.tls else None
        self._store: DispatchStore | None = None
        self._lock: SenderLock | None = None
        self._wake = asyncio.Event()
        self._seen: list[str] = []
        self._seen_added = asyncio.Event()

    async def start(self) -> None:
        """
        Check the dispatch tables and rights; mark where this sink begins.
        """
        assert self._context.database is not None
        # The lock needs a session of its own: the LISTEN DSN is the one that
        # reaches Postgres directly when NOTIFYD_DSN goes through a
        # transaction-mode pooler.
        dsn = self._context.settings.listen_dsn or self._context.settings.dsn
        assert dsn is not None  # the database is connected, so it has a DSN
        self._store = store = DispatchStore(self._context.database, self._context.name)
        problems = await store.problems()
        if problems:
            raise SchemaError(problems[0])
        await store.start()
        self._lock = SenderLock(dsn, self._context.name, wait=self._poll)

    async def __call__(self, message: SinkMessage, online: bool) -> None:
        """
        Note a message a session had (offline mode) and wake the sender.
        """
        if self._offline and online and message.to_user != "*":
            if type_allowed(message.type, self._types):
                self._seen.append(message.id)
                self._seen_added.set()
        self._wake.set()

    async def run(self) -> None:
        """
        Record seen marks, and wait to be the sender, fill and send, until
        cancelled.
        """
        store, lock = self._store, self._lock
        assert store is not None and lock is not None
        try:
            async with asyncio.TaskGroup() as tasks:
                if self._offline:
                    # Apart from sending, and on every instance: the sender
                    # settles rows by the marks the others record.
                    tasks.create_task(self._record_seen(store))
                tasks.create_task(self._send_loop(store, lock))
        finally:
            # A clean stop hands the queue to the next instance now.
            await lock.release()

    async def _record_seen(self, store: DispatchStore) -> None:
        failures = 0
        while True:
            await self._seen_added.wait()
            self._seen_added.clear()
            try:
                await self._flush_seen(store)
                failures = 0
            except DatabaseError as exc:
                failures += 1
                delay = backoff_delay(failures, initial=0.1, maximum=self._poll, jitter=0)
                logger.warning(
                    "webhook: cannot record seen messages (%s); retrying in %.1fs",
                    describe(exc),
                    delay,
                )
                self._seen_added.set()
                await asyncio.sleep(delay)

    async def _send_loop(self, store: DispatchStore, lock: SenderLock) -> None:
        """
        Wait to be the sender, then fill and send until cancelled; database
        trouble is waited out.
        """
        last_prune = 0.0
        failures = 0
        sending = False
        while True:
            self._wake.clear()
            if sending and not lock.held:
                # Its session ended under it (cut, terminated): noticed by
                # the statement that failed, or here.
                sending = False
                logger.warning("webhook: lost the sender lock; waiting to take it again")
            try:
                if not await lock.acquire():
                    # Another instance sends; this one waited in the lock's
                    # queue for webhook_poll_s and asks again.
                    continue
                if not sending:
                    sending = True
                    logger.info(
                        "webhook: this instance sends now (sender lock held by backend %s)",
                        lock.backend_pid,
                    )
                await self._flush_seen(store)
                await store.fill(
                    due_in=self._due_in,
                    types=self._types,
                    skip_announcements=self._offline,
                )
                expired = await store.expire(self._max_age)
                if expired:
                    self._stats.expired += len(expired)
                    logger.warning(
                        "webhook: gave up on %d message(s) older than %.0fs (first: %s)",
                        len(expired),
                        self._max_age,
                        expired[0],
                    )
                if time.monotonic() - last_prune > _PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    await store.prune(self._max_age)
                more = await self._send_due(store, lock)
                due_in = 0.0 if more else await store.head_due_in()
                failures = 0
            except DatabaseError as exc:
                failures += 1
                due_in = backoff_delay(failures, initial=0.1, maximum=self._poll, jitter=0)
                logger.warning(
                    "webhook: database unavailable (%s); retrying in %.1fs", describe(exc), due_in
                )
            wait = self._poll if due_in is None else min(self._poll, due_in)
            if wait > 0 and not self._wake.is_set():
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _flush_seen(self, store: DispatchStore) -> None:
        seen, self._seen = self._seen, []
        try:
            await store.mark_seen(seen)
        except BaseException:
            self._seen[:0] = seen
            del self._seen[:-_MAX_UNRECORDED_SEEN]
            raise

    async def _send_due(self, store: DispatchStore, lock: SenderLock) -> bool:
        """
        Send the next due rows in order. Returns whether a full batch went
        without trouble (so more may be due at once).
        """
        rows = await lock.due(self._batch)
        for row in rows:
            if not await self._send_one(store, lock, row):
                # Order is kept without a delay here: the next read stops at
                # the failed row until it is due again.
                return False
        return len(rows) == self._batch

    async def _send_one(self, store: DispatchStore, lock: SenderLock, row: Row) -> bool:
        """
        Send or settle one due row; False when it must be retried later.
        """
        message_id = row["message_id"]
        if not row["present"]:
            await store.finish([message_id], "gone", "the message was deleted before it was sent")
            self._stats.skipped += 1
            return True
        if row["lapsed"]:
            # Withdrawn from the inbox at its expire_at: a late POST (an SMS
            # about a sale that ended) would contradict it.
            await store.finish([message_id], "gone", "the message expired before it was sent")
            self._stats.skipped += 1
            return True
        if self._offline and row["seen"]:
            await store.finish([message_id], "seen")
            self._stats.skipped += 1
            return True
        if not await lock.still_pending(message_id):
            # Settled since it was read: a former holder's 2xx recorded
            # late. Never posted again.
            return True
        # From here until the answer is recorded, a death of this instance
        # makes the next sender post this row again: the one request in
        # flight, with the same Idempotency-Key.
        message = SinkMessage.from_row(row)
        attempt = row["attempts"] + 1
        if attempt > 1:
            self._stats.retries += 1
        body = orjson.dumps({"event": "message", **message.to_json()})
        headers = signature_headers(self._secret, int(time.time()), body, message.id)
        headers["Notifyd-Attempt"] = str(attempt)
        headers["User-Agent"] = "notifyd-webhook"
        status: int | None = None
        retry_after: float | None = None
        try:
            answer = await post(
                self._target, body, headers, timeout=self._timeout, ssl_context=self._ssl
            )
            status = answer.status
            retry_after = parse_retry_after(
                answer.headers.get("retry-after"), maximum=self._retry_max
            )
            error = f"HTTP {status}"
        except TimeoutError:
            error = f"no answer within {self._timeout:.1f}s"
        except HttpError as exc:
            error = str(exc)
        outcome = classify_status(status)
        if outcome is Outcome.SENT:
            # Delivered: a shutdown arriving now must not leave it pending
            # (to be sent again by the next instance).
            await asyncio.shield(store.finish([message_id], "sent"))
            self._stats.sent += 1
            return True
        self._stats.failed += 1
        if outcome is Outcome.REJECTED:
            await store.finish([message_id], "rejected", error)
            logger.error(
                "webhook: message %s rejected by the receiver (%s); not retried", message_id, error
            )
            return True
        delay = (
            retry_after
            if retry_after is not None
            else backoff_delay(
                attempt, initial=self._retry_initial, maximum=self._retry_max, jitter=0
            )
        )
        await store.retry_later(message_id, delay, error)
        logger.warning(
            "webhook: message %s attempt %d failed (%s); retrying in %.1fs",
            message_id,
            attempt,
            error,
            delay,
        )
        return False
