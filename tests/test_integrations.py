"""
The recipes of docs/integrations.md, run with the real client libraries:
Java (Debian's JDK and PostgreSQL JDBC driver, the seed's MyBatis-Plus
entity), Python (psycopg 3 and SQLAlchemy Core) and Node (node-postgres
from npm). Each inserts from its own process or driver; every row must
arrive over a real WebSocket with the seed's field names and values.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zoneinfo
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from .conftest import TIMEOUT, Client, missing_tool
from .npm import node_modules

REPO = Path(__file__).resolve().parent.parent
INTEGRATIONS = REPO / "contrib" / "integrations"
# Only so that the seed's entity compiles unchanged: MyBatis-Plus's
# annotations (Debian does not package MyBatis-Plus).
ANNOTATION_STUBS = Path(__file__).resolve().parent / "java"
POSTGRESQL_JAR = Path("/usr/share/java/postgresql.jar")
LOMBOK_JAR = Path("/usr/share/java/lombok.jar")
# Short-lived JVMs start faster with the quick JIT tier only and the serial
# collector (javac here: 3.3 s -> 2.2 s wall on a loaded 2-core machine).
_QUICK_JVM = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
# A Chinese app's JVM: its LocalDateTime is Shanghai time.
JVM_ZONE = "Asia/Shanghai"

# node-postgres, by major version (npm picks the newest 8.x).
NODE_PACKAGES = ("pg@8",)

SEED_FIELDS = {
    "id",
    "title",
    "sendUser",
    "toUser",
    "type",
    "content",
    "sendTime",
    "skipUrl",
    "isRead",
}


def _dsn_parts(dsn: str) -> dict[str, Any]:
    parts = urlsplit(dsn)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "database": parts.path.lstrip("/"),
        "user": unquote(parts.username or "postgres"),
        "password": unquote(parts.password) if parts.password else None,
    }


async def _collect(client: Client, count: int) -> list[dict[str, Any]]:
    """
    The first ``count`` message frames ``client`` receives.
    """
    received: list[dict[str, Any]] = []
    while len(received) < count:
        frame = await client.recv(timeout=3 * TIMEOUT)
        if frame["event"] == "message":
            received.append(frame)
    return received


async def _open_users(daemon, open_client, users: list[str]) -> dict[str, Client]:
    return {user: await open_client(daemon.url(user)) for user in users}


def _assert_each_arrived_once_to_its_user(
    saved: list[dict[str, Any]], arrived: dict[str, list[dict[str, Any]]], send_time
) -> None:
    """
    Every saved entity arrived exactly once, to its addressee only, with the
    seed's field names and the values the app set (``send_time`` compares
    the app's sendTime with the frame's).
    """
    by_id = {row["id"]: row for row in saved}
    assert len(by_id) == len(saved)
    seen: set[str] = set()
    for user, frames in arrived.items():
        for frame in frames:
            assert SEED_FIELDS <= set(frame), frame
            assert frame["id"] not in seen, f"{frame['id']} arrived twice"
            seen.add(frame["id"])
            row = by_id[frame["id"]]
            assert frame["toUser"] == user == row["toUser"]
            for name in ("title", "sendUser", "type", "content", "skipUrl", "isRead"):
                assert frame[name] == row[name], (name, frame, row)
            send_time(row.get("sendTime"), frame["sendTime"])
    assert seen == set(by_id)


# -- Java: Spring Boot + MyBatis-Plus's saveBatch, as JDBC -------------------


@pytest.fixture(scope="module")
def java_classes(tmp_path_factory) -> Path:
    """
    contrib/integrations/java compiled by Debian's javac, with Lombok for
    the entity's @Data.
    """
    javac = shutil.which("javac")
    if javac is None or shutil.which("java") is None:
        missing_tool("no JDK: apt-get install default-jdk-headless")
    for jar, package in (
        (POSTGRESQL_JAR, "libpostgresql-jdbc-java"),
        (LOMBOK_JAR, "liblombok-java"),
    ):
        if not jar.is_file():
            missing_tool(f"{jar} is missing: apt-get install {package}")
    out = tmp_path_factory.mktemp("java")
    sources = sorted(INTEGRATIONS.glob("java/*.java")) + sorted(ANNOTATION_STUBS.rglob("*.java"))
    result = subprocess.run(
        [
            javac, *(f"-J{flag}" for flag in _QUICK_JVM), "-encoding", "UTF-8", "-d", str(out),
            "-cp", f"{POSTGRESQL_JAR}:{LOMBOK_JAR}", "-processorpath", str(LOMBOK_JAR),
            *map(str, sources),
        ],
        capture_output=True, text=True, timeout=12 * TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _jdbc_url(dsn: str, **options: str) -> str:
    parts = _dsn_parts(dsn)
    query = {"user": parts["user"], **options}
    if parts["password"]:
        query["password"] = parts["password"]
    suffix = "&".join(f"{key}={value}" for key, value in query.items())
    return f"jdbc:postgresql://{parts['host']}:{parts['port']}/{parts['database']}?{suffix}"


def _same_instant_in_the_jvm_zone(local: str, sent: str) -> None:
    """
    The frame's sendTime (with its offset) is the instant the app's
    LocalDateTime meant in the JVM's zone, to the millisecond frames carry.
    """
    # Java's clock has nanoseconds; PostgreSQL rounds them to microseconds
    # (…228999856 is stored as …229000), then frames carry milliseconds.
    whole, _, fraction = local.partition(".")
    nanos = int((fraction or "0").ljust(9, "0")[:9])
    expected = datetime.datetime.fromisoformat(whole).replace(
        tzinfo=zoneinfo.ZoneInfo(JVM_ZONE)
    ) + datetime.timedelta(microseconds=round(nanos / 1000))
    expected = expected.replace(microsecond=expected.microsecond // 1000 * 1000)
    actual = datetime.datetime.fromisoformat(sent)
    assert actual.utcoffset() is not None, sent
    assert actual == expected, (local, sent)


@pytest.mark.parametrize("rewrite", ["false", "true"])
async def test_java_savebatch_of_the_seed_entity_arrives_row_by_row_with_its_fields(
    java_classes, daemon, open_client, dsn, rewrite
):
    """MessageRealTime saved as one JDBC batch (as MyBatis-Plus's saveBatch does, with and without reWriteBatchedInserts): every row reaches its user with the seed's names and values."""
    users = ["alice", "bob", "carol"]
    clients = await _open_users(daemon, open_client, users)
    count = 250
    process = await asyncio.create_subprocess_exec(
        "java", *_QUICK_JVM, f"-Duser.timezone={JVM_ZONE}",
        "-cp", f"{java_classes}:{POSTGRESQL_JAR}", "com.example.message.MessageBatch",
        _jdbc_url(dsn, reWriteBatchedInserts=rewrite), str(count), ",".join(users),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 12 * TIMEOUT)
    assert process.returncode == 0, err.decode()
    saved = [json.loads(line) for line in out.decode().splitlines()]
    assert len(saved) == count
    # ASSIGN_ID: a snowflake id, as a string of digits, set before the INSERT.
    assert all(row["id"].isdigit() and len(row["id"]) >= 18 for row in saved)
    arrived = {
        user: await _collect(client, sum(row["toUser"] == user for row in saved))
        for user, client in clients.items()
    }
    _assert_each_arrived_once_to_its_user(saved, arrived, _same_instant_in_the_jvm_zone)
    # Rows without a skip URL left SKIP_URL out of the INSERT: null, as sent.
    assert any(row["skipUrl"] is None for row in saved)
    for user, frames in arrived.items():
        # One transaction: each user's rows arrive in the order they were saved.
        order = [row["id"] for row in saved if row["toUser"] == user]
        assert [frame["id"] for frame in frames] == order


# -- Python: psycopg 3 and SQLAlchemy Core -------------------------------------


@pytest.fixture(scope="module")
def recipe() -> ModuleType:
    """
    contrib/integrations/python/messages.py, imported from its file.
    """
    spec = importlib.util.spec_from_file_location(
        "notifyd_recipe_messages", INTEGRATIONS / "python" / "messages.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _utc_now_ms(sent: str) -> datetime.datetime:
    parsed = datetime.datetime.fromisoformat(sent)
    assert parsed.utcoffset() is not None, sent
    return parsed


async def test_psycopg_sends_on_commit_only_and_a_rollback_delivers_nothing(
    recipe, daemon, open_client, dsn
):
    """psycopg 3: a message waits for its transaction's commit; a rolled-back transaction and savepoint deliver nothing."""
    import psycopg

    alice = await open_client(daemon.url("alice"))
    message = recipe.Message
    app = await asyncio.to_thread(psycopg.connect, dsn)
    other = await asyncio.to_thread(psycopg.connect, dsn, autocommit=True)
    try:

        def rolled_back() -> None:
            # An exception leaving the block rolls the transaction back.
            with contextlib.suppress(RuntimeError), app.transaction():
                recipe.send(app, message("alice", "rolled back", "never sent"))
                raise RuntimeError("the order failed")

        def open_transaction() -> str:
            kept = recipe.send(app, message("alice", "kept", "c", type="order"))
            # Inside a transaction, transaction() is a savepoint.
            with contextlib.suppress(RuntimeError), app.transaction():
                recipe.send(app, message("alice", "savepoint rolled back", "never"))
                raise RuntimeError("one line failed")
            return kept

        def send_many() -> None:
            with app.transaction():
                recipe.send_many(
                    app,
                    [message("alice", f"many {i}", "c", skip_url=f"/orders/{i}") for i in range(3)],
                )

        await asyncio.to_thread(rolled_back)
        kept_id = await asyncio.to_thread(open_transaction)
        # "kept" waits for its commit: a message committed meanwhile by
        # another connection arrives, and nothing before it.
        await asyncio.to_thread(recipe.send, other, message("alice", "committed meanwhile", "c"))
        frames = await _collect(alice, 1)
        await asyncio.to_thread(app.commit)
        frames += await _collect(alice, 1)
        await asyncio.to_thread(send_many)
        frames += await _collect(alice, 3)
    finally:
        await asyncio.to_thread(app.close)
        await asyncio.to_thread(other.close)
    assert [frame["title"] for frame in frames] == [
        "committed meanwhile",
        "kept",
        "many 0",
        "many 1",
        "many 2",
    ]
    assert frames[1]["id"] == kept_id and frames[1]["type"] == "order"
    assert frames[1]["isRead"] == "0" and frames[1]["sendUser"] is None
    assert [frame["skipUrl"] for frame in frames[2:]] == ["/orders/0", "/orders/1", "/orders/2"]
    assert all(SEED_FIELDS <= set(frame) for frame in frames)


async def test_sqlalchemy_core_insert_is_delivered_and_a_rolled_back_one_is_not(
    recipe, daemon, open_client, dsn
):
    """SQLAlchemy Core over psycopg 3: engine.begin() delivers every row of an executemany; a rolled-back transaction delivers nothing."""
    import sqlalchemy as sa

    users = ["alice", "bob"]
    clients = await _open_users(daemon, open_client, users)
    message = recipe.Message
    saved = [
        message(users[i % 2], f"核心 {i}", f"content {i}", type="system", send_user="admin")
        for i in range(40)
    ]
    engine = sa.create_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))

    def scenario() -> None:
        with engine.connect() as connection:
            transaction = connection.begin()
            connection.execute(*recipe.insert_messages([message("alice", "rolled back", "no")]))
            transaction.rollback()
        with engine.begin() as connection:
            connection.execute(*recipe.insert_messages(saved))
        engine.dispose()

    await asyncio.to_thread(scenario)
    for user, client in clients.items():
        frames = await _collect(client, 20)
        expected = [item for item in saved if item.to_user == user]
        assert [frame["title"] for frame in frames] == [item.title for item in expected]
        for frame, item in zip(frames, expected, strict=True):
            assert (frame["toUser"], frame["content"], frame["type"], frame["sendUser"]) == (
                item.to_user,
                item.content,
                item.type,
                item.send_user,
            )
            assert frame["isRead"] == "0" and frame["id"]
            _utc_now_ms(frame["sendTime"])
    # Nothing else is on its way: a marker committed last is the next frame.
    with contextlib.closing(await asyncio.to_thread(_connect, dsn)) as marker:
        await asyncio.to_thread(recipe.send, marker, message("alice", "marker", "m"))
    assert [frame["title"] for frame in await _collect(clients["alice"], 1)] == ["marker"]


def _connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True)


# -- Node: node-postgres ---------------------------------------------------------

# What an app's code does with the recipe: a batch committed, one rolled back.
_NODE_DRIVER = r"""
const { Pool } = require('pg');
const { sendMessage, sendMessages, inTransaction } = require(process.env.RECIPE);

async function main() {
  const pool = new Pool({ connectionString: process.env.DATABASE_URL });
  try {
    await inTransaction(pool, async (client) => {
      await sendMessage(client, { toUser: 'alice', title: 'rolled back', content: 'never' });
      throw new Error('the order failed');
    }).catch((error) => {
      if (error.message !== 'the order failed') throw error;
    });
    const messages = JSON.parse(process.env.MESSAGES);
    const ids = await inTransaction(pool, (client) => sendMessages(client, messages));
    const single = await inTransaction(pool, (client) =>
      sendMessage(client, { toUser: 'alice', title: 'single', content: 'one', type: 'order' }));
    console.log(JSON.stringify({ ids, single }));
  } finally {
    await pool.end();
  }
}
main().catch((error) => { console.error(error); process.exit(1); });
"""


async def test_node_postgres_batch_is_delivered_and_a_rolled_back_one_is_not(
    daemon, open_client, dsn, tmp_path
):
    """node-postgres (pg from npm), run by Node: a batch committed in a transaction arrives row by row; a rolled-back one never does."""
    node = shutil.which("node")
    if node is None:
        missing_tool("node is not installed: apt-get install nodejs")
    modules = await asyncio.to_thread(node_modules, *NODE_PACKAGES)
    users = ["alice", "bob"]
    clients = await _open_users(daemon, open_client, users)
    messages = [
        {
            "toUser": users[i % 2],
            "title": f"节点 {i}",
            "content": f'line one\nline "two" {i}',
            "type": "system" if i % 3 else None,
            "sendUser": "admin",
            "skipUrl": f"https://app.example.com/orders/{i}" if i % 2 else None,
        }
        for i in range(30)
    ]
    driver = tmp_path / "driver.js"
    driver.write_text(_NODE_DRIVER)
    env = {
        **os.environ,
        "NODE_PATH": str(modules),
        "RECIPE": str(INTEGRATIONS / "node" / "send.js"),
        "DATABASE_URL": dsn,
        "MESSAGES": json.dumps(messages),
    }
    process = await asyncio.create_subprocess_exec(
        node, str(driver), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 6 * TIMEOUT)
    assert process.returncode == 0, err.decode()
    result = json.loads(out)
    saved = [
        {**message, "id": id_, "isRead": "0"}
        for message, id_ in zip(messages, result["ids"], strict=True)
    ]

    def any_send_time(_: object, sent: str) -> None:
        assert datetime.datetime.fromisoformat(sent).utcoffset() is not None

    arrived = {
        user: await _collect(client, sum(m["toUser"] == user for m in messages))
        for user, client in clients.items()
    }
    _assert_each_arrived_once_to_its_user(saved, arrived, any_send_time)
    for user, frames in arrived.items():
        assert [frame["id"] for frame in frames] == [r["id"] for r in saved if r["toUser"] == user]
    # The single send comes next: the rolled-back row was never sent.
    (single,) = await _collect(clients["alice"], 1)
    assert (single["id"], single["title"], single["type"]) == (result["single"], "single", "order")


async def test_node_send_js_as_a_command_sends_one_message(daemon, open_client, dsn):
    """`node send.js USER TITLE CONTENT TYPE` inserts one message that arrives; without arguments it exits 2 with usage."""
    node = shutil.which("node")
    if node is None:
        missing_tool("node is not installed: apt-get install nodejs")
    modules = await asyncio.to_thread(node_modules, *NODE_PACKAGES)
    alice = await open_client(daemon.url("alice"))
    env = {**os.environ, "NODE_PATH": str(modules), "DATABASE_URL": dsn}
    script = str(INTEGRATIONS / "node" / "send.js")
    run = await asyncio.create_subprocess_exec(
        node, script, "alice", "From the shell", "It works", "system", "/inbox",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(run.communicate(), 6 * TIMEOUT)
    assert run.returncode == 0, err.decode()
    (frame,) = await _collect(alice, 1)
    assert frame["id"] == out.decode().strip()
    assert (frame["title"], frame["content"], frame["type"], frame["skipUrl"]) == (
        "From the shell",
        "It works",
        "system",
        "/inbox",
    )
    usage = await asyncio.create_subprocess_exec(
        node, script, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(usage.communicate(), 6 * TIMEOUT)
    assert usage.returncode == 2 and err.decode().startswith("usage:")
