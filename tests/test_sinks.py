"""
Sinks: the webhook (signed, retried, exactly once across instances and
restarts, offline fallback), the log sink, third-party sinks through entry
points, and a failing or hanging sink leaving the WebSocket push alone.

The webhook tests POST to a real HTTP server on 127.0.0.1 that checks the
signatures with its own HMAC code.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
import textwrap
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from notifyd.db import role_sql
from notifyd.exceptions import ConfigError
from notifyd.metrics import registry_for, render_metrics
from notifyd.sinks.policy import (
    Outcome,
    classify_status,
    parse_retry_after,
    parse_webhook_url,
    sign,
    type_allowed,
    verify,
)

from .certificates import self_signed
from .conftest import TIMEOUT, insert
from .processes import clean_env, run_cli
from .receiver import Receiver, until, until_async

WEBHOOK_SECRET = "whsec-" + "k" * 26

# -- the rules, without I/O ----------------------------------------------------


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    """sign() equals an HMAC computed independently over "<ts>.<body>"."""
    body = b'{"id":"m1"}'
    expected = hmac.new(b"secret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(b"secret", 1700000000, body) == f"v1={expected}"


def test_verify_accepts_a_fresh_signature_and_rejects_tampering_wrong_key_and_replays():
    """verify() fails on a changed body, another key, or a timestamp outside the tolerance."""
    body = b'{"id":"m1"}'
    signature = sign(b"secret", 1000, body)
    assert verify(b"secret", "1000", signature, body, now=1100)
    assert not verify(b"secret", "1000", signature, b'{"id":"m2"}', now=1100)
    assert not verify(b"other", "1000", signature, body, now=1100)
    assert not verify(b"secret", "1000", signature, body, now=1000 + 301)
    assert not verify(b"secret", "soon", signature, body, now=1000)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SENT), (204, Outcome.SENT), (None, Outcome.RETRY), (500, Outcome.RETRY),
        (503, Outcome.RETRY), (408, Outcome.RETRY), (429, Outcome.RETRY), (400, Outcome.REJECTED),
        (401, Outcome.REJECTED), (404, Outcome.REJECTED), (301, Outcome.REJECTED),
    ],
)  # fmt: skip
def test_status_decides_sent_retry_or_rejected(status, outcome):
    """2xx sent; 5xx, 408, 429 and no answer retried; other answers rejected for good."""
    assert classify_status(status) is outcome


def test_retry_after_seconds_are_used_capped_and_dates_ignored():
    """A numeric Retry-After is honoured up to the maximum; an HTTP date or junk is not."""
    assert parse_retry_after("3", maximum=60) == 3.0
    assert parse_retry_after("3600", maximum=60) == 60.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", maximum=60) is None
    assert parse_retry_after(None, maximum=60) is None
    assert parse_retry_after("-1", maximum=60) is None


def test_type_filter_passes_everything_when_empty_and_only_listed_types_otherwise():
    """An untyped message passes only the empty filter."""
    assert type_allowed(None, [])
    assert type_allowed("sms", [])
    assert type_allowed("sms", ["sms", "mail"])
    assert not type_allowed("chat", ["sms"])
    assert not type_allowed(None, ["sms"])


def test_webhook_url_is_split_for_the_request_line_and_host_header():
    """Default ports are left out of Host; the query stays in the target."""
    target = parse_webhook_url("https://gw.example.com/hook?a=1")
    assert (target.tls, target.host, target.port, target.target, target.host_header) == (
        True, "gw.example.com", 443, "/hook?a=1", "gw.example.com",
    )  # fmt: skip
    local = parse_webhook_url("http://127.0.0.1:8099")
    assert (local.port, local.target, local.host_header) == (8099, "/", "127.0.0.1:8099")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        (None, "needs NOTIFYD_WEBHOOK_URL"),
        ("ftp://example.com/x", "scheme must be http or https"),
        ("http:///nohost", "no host"),
        ("http://example.com:99999/", "bad port"),
        ("https://user:pw@example.com/", "credentials"),
        ("http://exa mple.com/", "white space"),
    ],
)
def test_bad_webhook_urls_are_config_errors_naming_the_setting(url, fragment):
    """Each bad URL gives one line that says what is wrong."""
    with pytest.raises(ConfigError) as caught:
        parse_webhook_url(url)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


# -- the webhook, end to end ---------------------------------------------------


@pytest.fixture
async def receiver():
    """
    A running receiver that checks signatures with the test secret.
    """
    server = Receiver(WEBHOOK_SECRET.encode())
    server.start()
    yield server
    server.stop()


def webhook_settings(receiver: Receiver, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "sinks": ["webhook"],
        "webhook_url": receiver.url,
        "webhook_secret": WEBHOOK_SECRET,
        "webhook_retry_initial_s": 0.05,
        "webhook_retry_max_s": 0.2,
        "webhook_poll_s": 0.5,
        "webhook_timeout_s": 2.0,
    }
    values.update(overrides)
    return values


async def dispatch_states(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT message_id, state FROM t_message_dispatch")
    return {row["message_id"]: row["state"] for row in rows}


async def test_webhook_posts_each_message_signed_with_its_id_as_idempotency_key(
    db, start_daemon, receiver
):
    """Every committed message is POSTed once, verifiably signed, and the row is marked sent."""
    daemon = await start_daemon(**webhook_settings(receiver))
    ids = [await insert(db, f"user{n}", f"title {n}", type="notice") for n in range(3)]
    posts = await receiver.wait_for(lambda posts: len(posts) >= 3)
    assert [post.message["id"] for post in posts] == ids
    for post, n in zip(posts, range(3), strict=True):
        assert post.verified
        assert post.path == "/hooks/notifyd?src=test"
        assert post.headers["Idempotency-Key"] == ids[n]
        assert post.headers["Content-Type"] == "application/json"
        assert post.message["toUser"] == f"user{n}"
        assert post.message["title"] == f"title {n}"
        assert post.message["type"] == "notice"
    await until_async(lambda: _all_in_state(db, ids, "sent"), what="dispatch rows marked sent")
    # The counter follows the database update, in the daemon's own time.
    await until(lambda: daemon.daemon.stats.sinks["webhook"].sent == 3, what="sent counted")
    text = render_metrics(registry_for(daemon.daemon.vitals, daemon.daemon.stats)).decode()
    assert 'notifyd_sink_sent_total{sink="webhook"} 3.0' in text


async def _all_in_state(db: asyncpg.Connection, ids: list[str], state: str) -> bool:
    states = await dispatch_states(db)
    return all(states.get(message_id) == state for message_id in ids)


def _tls_receiver(tmp_path: Path) -> tuple[Path, Receiver]:
    """
    A started receiver serving https with a self-signed certificate, and
    that certificate's file.
    """
    cert_file, key_file = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)
    receiver = Receiver(WEBHOOK_SECRET.encode(), tls=server_context)
    receiver.start()
    return cert_file, receiver


async def test_https_webhook_verifies_the_receiver_against_the_configured_ca(
    db, start_daemon, tmp_path
):
    """https:// with NOTIFYD_WEBHOOK_CA_FILE: the POST goes over TLS to a receiver that CA vouches for."""
    cert_file, receiver = _tls_receiver(tmp_path)
    try:
        await start_daemon(**webhook_settings(receiver, webhook_ca_file=cert_file))
        message = await insert(db, "alice", "over tls")
        posts = await receiver.wait_for(lambda posts: len(posts) >= 1)
        assert posts[0].message["id"] == message and posts[0].verified
        assert posts[0].headers["Host"] == f"localhost:{receiver.port}"
    finally:
        receiver.stop()


async def test_https_webhook_refuses_a_receiver_it_cannot_verify(db, start_daemon, tmp_path):
    """Without the CA, the self-signed receiver is not trusted: nothing is posted, the attempt fails."""
    _cert_file, receiver = _tls_receiver(tmp_path)
    try:
        daemon = await start_daemon(**webhook_settings(receiver))
        await insert(db, "alice", "not over untrusted tls")
        stats = daemon.daemon.stats.sinks["webhook"]
        await until(lambda: stats.failed >= 1, what="a failed attempt")
        assert receiver.ids() == [] and stats.sent == 0
    finally:
        receiver.stop()


async def test_webhook_type_filter_posts_only_the_listed_types(db, start_daemon, receiver):
    """With NOTIFYD_WEBHOOK_TYPES=sms a chat message never reaches the receiver."""
    await start_daemon(**webhook_settings(receiver, webhook_types=["sms"]))
    await insert(db, "alice", "chat", type="chat")
    await insert(db, "alice", "untyped")
    sms = await insert(db, "alice", "sms", type="sms")
    marker = await insert(db, "alice", "marker", type="sms")
    await receiver.wait_for(lambda posts: marker in [p.message["id"] for p in posts])
    assert receiver.ids() == [sms, marker]


async def test_offline_fallback_posts_only_what_no_session_saw_in_time(
    db, start_daemon, open_client, receiver
):
    """Mode offline: a message a live session had (or the app marked read) is not sent; an unseen one is, after the delay."""
    delay = 0.4
    daemon = await start_daemon(
        **webhook_settings(receiver, webhook_mode="offline", webhook_offline_after_s=delay)
    )
    alice = await open_client(daemon.url("alice"))
    seen = await insert(db, "alice", "for alice")
    await alice.messages_until("for alice")
    read_in_time = await insert(db, "carol", "read elsewhere")
    await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", read_in_time)
    await insert(db, "*", "announcement")
    inserted_at = time.monotonic()
    unseen = await insert(db, "bob", "for bob")
    posts = await receiver.wait_for(lambda posts: len(posts) >= 1)
    assert posts[0].message["id"] == unseen and posts[0].verified
    assert posts[0].at - inserted_at >= delay * 0.9
    await until_async(
        lambda: _all_in_state(db, [seen, read_in_time], "seen"), what="seen messages settled"
    )
    assert receiver.ids() == [unseen]
    # Announcements have no single addressee who could be offline.
    assert await db.fetchval("SELECT count(*) FROM t_message_dispatch") == 3


async def test_offline_fallback_counts_a_session_on_another_instance_as_seen(
    db, start_daemon, open_client, receiver
):
    """The seen mark is in the database: a session on instance B stops instance A's POST."""
    # Long enough for instance B to record the mark on a busy machine.
    settings = webhook_settings(receiver, webhook_mode="offline", webhook_offline_after_s=1.0)
    await start_daemon(**settings)
    other = await start_daemon(**settings)
    alice = await open_client(other.url("alice"))
    seen = [await insert(db, "alice", f"seen {n}") for n in range(3)]
    await alice.messages_until("seen 2")
    unseen = await insert(db, "bob", "unseen")
    await receiver.wait_for(lambda posts: len(posts) >= 1)
    await until_async(lambda: _all_in_state(db, seen, "seen"), what="seen messages settled")
    assert receiver.ids() == [unseen]


async def test_receiver_down_then_up_gets_the_backlog_once_in_order(db, start_daemon, receiver):
    """Refused connections are retried; when the receiver is back, the backlog arrives oldest first, once.

    Messages committed during the outage have had fewer failures (a shorter
    backoff) than the oldest one: they must still wait behind it.
    """
    daemon = await start_daemon(**webhook_settings(receiver, webhook_retry_max_s=0.8))
    stats = daemon.daemon.stats.sinks["webhook"]
    receiver.stop()
    backlog = [await insert(db, "alice", f"backlog {n}") for n in range(3)]
    await until(lambda: stats.failed >= 4, what="failed attempts while the receiver is down")
    backlog += [await insert(db, "alice", f"later {n}") for n in range(3)]
    await until_async(
        lambda: _all_in_state(db, backlog, "pending"), what="the later messages queued"
    )
    failed = stats.failed
    await until(lambda: stats.failed > failed, what="one more failed attempt")
    assert receiver.ids() == []
    receiver.start()
    # A new message wakes the sender at once: it too waits its turn.
    marker = await insert(db, "alice", "after the backlog")
    posts = await receiver.wait_for(lambda posts: marker in [p.message["id"] for p in posts])
    assert [post.message["id"] for post in posts] == [*backlog, marker]
    assert all(post.verified for post in posts)
    assert int(posts[0].headers["Notifyd-Attempt"]) >= 5
    assert stats.retries >= 4


async def test_5xx_is_retried_until_it_succeeds(db, start_daemon, receiver):
    """A 503 answer is not the end: the same message comes again and is then marked sent."""
    receiver.status = 503
    await start_daemon(**webhook_settings(receiver))
    message = await insert(db, "alice", "flaky")
    await receiver.wait_for(lambda posts: len(posts) >= 2)
    receiver.status = 200
    await until_async(lambda: _all_in_state(db, [message], "sent"), what="sent after retries")
    ids = receiver.ids()
    assert set(ids) == {message} and len(ids) >= 3


async def test_a_receiver_that_never_answers_is_timed_out_and_retried(db, start_daemon):
    """A POST without an answer within NOTIFYD_WEBHOOK_TIMEOUT_S counts as failed and is tried again."""
    connections: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.read()  # until notifyd gives up and closes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        daemon = await start_daemon(
            sinks=["webhook"], webhook_url=f"http://127.0.0.1:{port}/", webhook_secret=WEBHOOK_SECRET,
            webhook_timeout_s=0.2, webhook_retry_initial_s=0.05, webhook_retry_max_s=0.1,
        )  # fmt: skip
        message = await insert(db, "alice", "into the void")
        stats = daemon.daemon.stats.sinks["webhook"]
        await until(
            lambda: stats.failed >= 2 and len(connections) >= 2, what="two timed-out attempts"
        )
        assert all(b"Idempotency-Key: " + message.encode() in head for head in connections)
        error = await db.fetchval(
            "SELECT last_error FROM t_message_dispatch WHERE message_id = $1", message
        )
        assert error == "no answer within 0.2s"
    finally:
        server.close()


async def test_4xx_rejects_the_message_for_good_and_the_next_one_goes_on(
    db, start_daemon, receiver
):
    """A 400 is final: the message is marked rejected and is not retried."""
    receiver.status = 400
    daemon = await start_daemon(**webhook_settings(receiver))
    rejected = await insert(db, "alice", "refused")
    await until_async(lambda: _all_in_state(db, [rejected], "rejected"), what="rejected")
    receiver.status = 200
    accepted = await insert(db, "alice", "accepted")
    await receiver.wait_for(lambda posts: accepted in [p.message["id"] for p in posts])
    assert receiver.ids() == [rejected, accepted]
    assert daemon.daemon.stats.sinks["webhook"].failed == 1


async def test_backlog_older_than_the_max_age_is_given_up(db, start_daemon, receiver):
    """While the receiver answers 503, a message passing NOTIFYD_WEBHOOK_MAX_AGE_S is expired."""
    receiver.status = 503
    daemon = await start_daemon(**webhook_settings(receiver, webhook_max_age_s=0.5))
    message = await insert(db, "alice", "too late")
    await until_async(lambda: _all_in_state(db, [message], "expired"), what="expired")
    await until(lambda: daemon.daemon.stats.sinks["webhook"].expired == 1, what="expiry counted")


async def test_two_instances_post_each_message_exactly_once(db, start_daemon, receiver):
    """Both instances fill and claim the same dispatch table; every message is POSTed once."""
    settings = webhook_settings(receiver, webhook_batch=2)
    first = await start_daemon(**settings)
    second = await start_daemon(**settings)
    ids = [await insert(db, f"user{n % 4}", f"m{n}") for n in range(30)]
    async with db.transaction():
        ids += [await insert(db, "bulk", f"bulk {n}") for n in range(10)]
    posts = await receiver.wait_for(lambda posts: len({p.message["id"] for p in posts}) >= 40)
    marker = await insert(db, "alice", "marker")
    posts = await receiver.wait_for(lambda posts: marker in [p.message["id"] for p in posts])
    posted = [post.message["id"] for post in posts]
    assert sorted(posted) == sorted([*ids, marker])
    await until_async(lambda: _all_in_state(db, [*ids, marker], "sent"), what="all marked sent")
    counters = [first.daemon.stats.sinks["webhook"], second.daemon.stats.sinks["webhook"]]
    await until(lambda: sum(c.sent for c in counters) >= 41, what="sends counted")
    assert sum(c.sent for c in counters) == 41


async def test_messages_committed_while_stopped_are_posted_after_a_restart(
    dsn, db, start_daemon, receiver
):
    """The fill snapshot is in the database: a restart goes on where the last instance stopped."""
    first = await start_daemon(**webhook_settings(receiver))
    before = await insert(db, "alice", "before")
    await receiver.wait_for(lambda posts: len(posts) >= 1)
    # Stopped between the POST and its 2xx, it would be sent again (same
    # Idempotency-Key); this test is about what was committed while stopped.
    await until_async(lambda: _all_in_state(db, [before], "sent"), what="sent")
    await first.daemon.stop()
    during = [await insert(db, "alice", f"while stopped {n}") for n in range(3)]
    await start_daemon(**webhook_settings(receiver))
    posts = await receiver.wait_for(lambda posts: len(posts) >= 4)
    assert [post.message["id"] for post in posts] == [before, *during]


async def test_webhook_works_under_the_least_privilege_role(db, login_role, start_daemon, receiver):
    """role.sql grants what the dispatch tables need, and nothing else is needed."""
    await db.execute(role_sql())
    daemon_dsn = await login_role("IN ROLE notifyd_daemon")
    await start_daemon(
        dsn=daemon_dsn,
        **webhook_settings(receiver, webhook_mode="offline", webhook_offline_after_s=0.1),
    )
    message = await insert(db, "bob", "as notifyd_daemon")
    await receiver.wait_for(lambda posts: len(posts) >= 1)
    await until_async(lambda: _all_in_state(db, [message], "sent"), what="sent")


async def test_a_role_without_dispatch_rights_cannot_start_the_webhook(
    db, login_role, start_daemon, receiver
):
    """Startup names the missing right on the dispatch table instead of failing later."""
    role_dsn = await login_role("")
    role = role_dsn.split("//", 1)[1].split("@", 1)[0]
    await db.execute(role_sql())
    await db.execute(f"GRANT notifyd_daemon TO {role}")
    await db.execute("REVOKE UPDATE ON t_message_dispatch FROM notifyd_daemon")
    with pytest.raises(
        Exception, match="lacks SELECT, INSERT, UPDATE and DELETE on t_message_dispatch"
    ):
        await start_daemon(dsn=role_dsn, **webhook_settings(receiver))


# -- the log sink ----------------------------------------------------------------


async def test_log_sink_writes_one_json_line_per_message_saying_whether_a_session_had_it(
    db, start_daemon, open_client, tmp_path
):
    """One line per routed message of the listed types, with online true only for a live addressee."""
    path = tmp_path / "audit.jsonl"
    daemon = await start_daemon(sinks=["log"], log_sink_path=str(path), log_sink_types=["audit"])
    alice = await open_client(daemon.url("alice"))
    to_alice = await insert(db, "alice", "online", type="audit")
    to_bob = await insert(db, "bob", "offline", type="audit")
    await insert(db, "alice", "not audited", type="chat")
    await alice.messages_until("not audited")
    stats = daemon.daemon.stats.sinks["log"]
    await until(lambda: stats.sent + stats.skipped >= 3, what="log sink done")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["id"], line["online"]) for line in lines] == [(to_alice, True), (to_bob, False)]
    assert lines[0]["title"] == "online" and lines[0]["toUser"] == "alice"
    assert stats.skipped == 1


# -- third-party sinks through entry points --------------------------------------


@pytest.fixture
def plugin_sinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Install a distribution exposing sinks in the notifyd.sinks group, the
    way a third-party package would (a dist-info with entry_points.txt).
    """
    (tmp_path / "notifyd_test_plugin.py").write_text(
        textwrap.dedent(
            """
            import asyncio

            class Raising:
                runs = 0
                async def __call__(self, message, online):
                    raise RuntimeError("gateway exploded")
                async def run(self):
                    Raising.runs += 1
                    raise RuntimeError("background loop exploded")

            class Hanging:
                async def __call__(self, message, online):
                    await asyncio.Event().wait()

            class Recording:
                def __init__(self, context):
                    self.context = context
                async def __call__(self, message, online):
                    self.context.options.setdefault("seen", []).append((message.title, online))

            def raising(context):
                return Raising()

            def hanging(context):
                return Hanging()

            def recording(context):
                return Recording(context)

            def broken(context):
                raise ValueError("needs option 'token'")
            """
        )
    )
    dist = tmp_path / "notifyd_test_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: notifyd-test-plugin\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[notifyd.sinks]\n"
        "raising = notifyd_test_plugin:raising\n"
        "hanging = notifyd_test_plugin:hanging\n"
        "recording = notifyd_test_plugin:recording\n"
        "broken = notifyd_test_plugin:broken\n"
        "missing = notifyd_test_plugin_gone:create\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


async def test_raising_and_hanging_sinks_leave_the_websocket_push_alone(
    db, start_daemon, open_client, plugin_sinks
):
    """A sink that raises and one that hangs are counted (failed, dropped); every frame still arrives, the daemon stays up."""
    daemon = await start_daemon(
        sinks=["raising", "hanging", "recording"], sink_queue_size=2, sink_timeout_s=3 * TIMEOUT
    )
    alice = await open_client(daemon.url("alice"))
    async with db.transaction():
        for n in range(10):
            await insert(db, "alice", f"m{n}")
    received = await alice.messages_until("m9")
    assert [frame["title"] for frame in received] == [f"m{n}" for n in range(10)]
    sinks = daemon.daemon.stats.sinks
    # All frames are out while the hanging sink is still in its first call.
    assert sinks["hanging"].failed == 0 and sinks["hanging"].sent == 0
    await until(lambda: sinks["raising"].failed == 2, what="raising sink failures")
    assert sinks["hanging"].dropped == 8
    assert sinks["raising"].dropped == 8
    assert sinks["recording"].dropped == 8
    import notifyd_test_plugin

    await until(lambda: notifyd_test_plugin.Raising.runs >= 2, what="run() restarted")
    assert not daemon.daemon.failed
    # The WebSocket path still works after all that.
    await insert(db, "alice", "still here")
    await alice.messages_until("still here")


async def test_a_sink_call_over_the_timeout_is_cancelled_counted_and_the_next_one_runs(
    db, start_daemon, plugin_sinks
):
    """NOTIFYD_SINK_TIMEOUT_S bounds each call: a hanging sink fails message by message instead of stalling."""
    daemon = await start_daemon(sinks=["hanging"], sink_timeout_s=0.1)
    for n in range(3):
        await insert(db, "nobody", f"m{n}")
    stats = daemon.daemon.stats.sinks["hanging"]
    await until(lambda: stats.failed == 3, what="three timed-out calls")
    assert stats.queue_depth == 0 and stats.dropped == 0


async def test_a_third_party_sink_gets_each_message_with_the_online_flag(
    db, start_daemon, open_client, plugin_sinks
):
    """A sink from another distribution's entry point receives messages and its options."""
    daemon = await start_daemon(sinks=["recording"], sink_options={"recording": {"k": "v"}})
    alice = await open_client(daemon.url("alice"))
    await insert(db, "alice", "to alice")
    await insert(db, "bob", "to bob")
    manager = daemon.daemon.sinks
    assert manager is not None
    options = manager._sinks[0].context.options
    await until(lambda: len(options.get("seen", [])) >= 2, what="recorded messages")
    assert options["k"] == "v"
    assert options["seen"] == [("to alice", True), ("to bob", False)]
    await alice.messages_until("to alice")


@pytest.mark.parametrize(
    ("sinks", "fragment"),
    [
        (["nope"], "unknown sink 'nope' in NOTIFYD_SINKS"),
        (["broken"], "sink 'broken' rejected its configuration: ValueError: needs option 'token'"),
        (["missing"], "sink 'missing' (notifyd_test_plugin_gone:create) cannot be loaded"),
    ],
)
async def test_bad_sink_names_and_factories_are_config_errors(
    start_daemon, plugin_sinks, sinks, fragment
):
    """An unknown name, a factory that refuses its options or cannot be imported: ConfigError before the database."""
    with pytest.raises(ConfigError) as caught:
        await start_daemon(sinks=sinks)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("variables", "fragment"),
    [
        ({"NOTIFYD_SINKS": "log,nope"}, "unknown sink 'nope'"),
        ({"NOTIFYD_SINKS": "webhook", "NOTIFYD_WEBHOOK_URL": "ftp://x/"}, "NOTIFYD_WEBHOOK_URL"),
        (
            {"NOTIFYD_SINKS": "webhook", "NOTIFYD_WEBHOOK_URL": "http://127.0.0.1:9/"},
            "NOTIFYD_WEBHOOK_SECRET",
        ),
        (
            {"NOTIFYD_SINKS": "log", "NOTIFYD_LOG_SINK_PATH": "/nonexistent/dir/a.log"},
            "NOTIFYD_LOG_SINK_PATH",
        ),
        (
            {"NOTIFYD_SINKS": "log", "NOTIFYD_SINK_OPTIONS": "{bad"},
            "NOTIFYD_SINK_OPTIONS: Value error, not valid JSON",
        ),
        ({"NOTIFYD_SINKS": "log", "NOTIFYD_SINK_OPTIONS": '{"log": 1}'}, "NOTIFYD_SINK_OPTIONS"),
    ],
)
async def test_serve_with_a_bad_sink_configuration_exits_2_with_one_line(dsn, variables, fragment):
    """notifyd serve refuses a bad sink setup with exit code 2 and one line, no traceback."""
    env = clean_env(NOTIFYD_DSN=dsn, NOTIFYD_JWT_SECRET="s" * 32, NOTIFYD_PORT="0", **variables)
    result = await run_cli("serve", env=env, timeout=3 * TIMEOUT)
    assert result.code == 2, result
    lines = result.stderr_lines
    assert len(lines) == 1 and fragment in lines[0], lines


def test_the_example_email_sink_package_loads_by_its_entry_point_and_checks_its_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """docs/example-sink works as documented: found as 'email', options checked, mail built."""
    from notifyd.settings import Settings
    from notifyd.sinks.manager import SinkManager
    from notifyd.stats import Stats

    example = Path(__file__).parent.parent / "docs" / "example-sink"
    dist = tmp_path / "notifyd_email_sink-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: notifyd-email-sink\nVersion: 0.1.0\n"
    )
    entry = example / "pyproject.toml"
    line = next(row for row in entry.read_text().splitlines() if row.startswith("email = "))
    (dist / "entry_points.txt").write_text(f"[notifyd.sinks]\n{line.replace(chr(34), '')}\n")
    monkeypatch.syspath_prepend(str(example))
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ConfigError, match="needs NOTIFYD_SINK_OPTIONS"):
        SinkManager(Settings(sinks=["email"]), Stats())
    options = {"email": {"address": "{user}@example.com", "sender": "noreply@example.com"}}
    manager = SinkManager(Settings(sinks=["email"], sink_options=options), Stats())
    assert manager.names == ["email"]

    from datetime import UTC, datetime

    import notifyd_email_sink

    from notifyd.sinks import SinkMessage

    message = SinkMessage(
        "m1", 1, "u42", "Order shipped", "On its way", "order", "shop",
        datetime.now(UTC), "javascript:alert(1)", "0",
    )  # fmt: skip
    mail = notifyd_email_sink.build_mail(
        message, address="{user}@example.com", sender="noreply@example.com"
    )
    assert (mail["To"], mail["Subject"]) == ("u42@example.com", "Order shipped")
    assert "javascript" not in mail.get_content()


async def test_check_reports_the_configured_sinks_and_a_bad_one(dsn):
    """notifyd check says the sinks load (and the dispatch tables exist), or names the problem."""
    base = {"NOTIFYD_DSN": dsn, "NOTIFYD_JWT_SECRET": "s" * 32}
    good = await run_cli(
        "check",
        env=clean_env(
            **base, NOTIFYD_SINKS="webhook", NOTIFYD_WEBHOOK_URL="http://127.0.0.1:9/",
            NOTIFYD_WEBHOOK_SECRET=WEBHOOK_SECRET,
        ),
    )  # fmt: skip
    assert good.code == 0, good
    assert "ok: sinks configured: webhook" in good.stdout
    assert "ok: webhook dispatch tables present" in good.stdout
    bad = await run_cli("check", env=clean_env(**base, NOTIFYD_SINKS="nope"))
    assert bad.code == 1
    assert "problem: unknown sink 'nope'" in bad.stdout
