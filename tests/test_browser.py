"""
The browser side, for real: notifyd.js and the demo page in headless
Chromium, against in-process daemons and the test PostgreSQL.

Pages that import the client are served by a tiny local http server on
another port (the "app"), so the module is imported cross-origin, as an app
would, and the app serves the token at ``/notifyd-token``. Waits are on
page-side state (``wait_for_function``) or on the database and the hub, each
with a deadline; never a fixed sleep.

The browser tests skip when no Chromium binary is found (Debian package
``chromium``; ``NOTIFYD_TEST_CHROMIUM`` names another) or Playwright is not
installed, and fail instead under CI (``CI`` set), which installs both. The
static-file tests need neither.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import mimetypes
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from websockets.asyncio.server import ServerConnection, serve

from notifyd import static
from notifyd.auth import TokenVerifier
from notifyd.daemon import Daemon

from .conftest import TIMEOUT, RunningDaemon, insert, make_settings, missing_tool

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "demo.png"
DEMO_USERS = ("alice", "bob")
CHROMIUM = (
    os.environ.get("NOTIFYD_TEST_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = TIMEOUT * 1000

StartDaemon = Callable[..., Awaitable[RunningDaemon]]


# -- plumbing ---------------------------------------------------------------


async def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, *, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """
    One raw HTTP/1.1 request; the server closes the connection after answering.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


class AppServer:
    """
    The app's origin: serves test pages, other static files and the
    signed-in user's token.
    """

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        self.files: dict[str, tuple[str, bytes]] = {}
        self.token = ""
        self.token_requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, path: str, body: str | bytes, content_type: str | None = None) -> None:
        """
        Serve ``body`` at ``path``, typed by its extension unless given.
        """
        if content_type is None:
            content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
            if content_type.startswith(("text/", "application/javascript")):
                content_type += "; charset=utf-8"
        self.files[path] = (content_type, body.encode() if isinstance(body, str) else body)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            while (await reader.readline()).strip():
                pass
            path = request_line.decode().split()[1].partition("?")[0]
            if path == "/notifyd-token":
                self.token_requests += 1
                status, content_type, body = "200 OK", "text/plain", self.token.encode()
            elif path in self.files:
                content_type, body = self.files[path]
                status = "200 OK"
            elif path in self.pages:
                status, content_type, body = (
                    "200 OK",
                    "text/html; charset=utf-8",
                    self.pages[path].encode(),
                )
            else:
                status, content_type, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, IndexError):
            pass
        finally:
            writer.close()


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = TIMEOUT
) -> None:
    """
    Poll server-side state (the database, the hub) until ``check`` holds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def is_read(db: asyncpg.Connection, message_id: str) -> bool:
    return (
        await db.fetchval("SELECT is_read FROM t_message_real_time WHERE id = $1", message_id)
        == "1"
    )


def sessions(running: RunningDaemon, user: str) -> int:
    return len(running.daemon.hub.sessions_of(user) or ())


# A page that records what the client does, for the tests to wait on.
HARNESS = """<!doctype html>
<meta charset="utf-8">
<title>harness</title>
<script type="module">
  import { createClient } from "MODULE_URL";
  const options = JSON.parse(new URLSearchParams(location.search).get("options") || "{}");
  const t = (window.t = {
    ids: [], titles: [], states: [], hellos: [], resyncs: 0, unread: null,
    unreadEvents: [], countsAtMessage: [], reads: [], deleted: [],
  });
  const client = (window.client = createClient({
    token: () => fetch("/notifyd-token").then((response) => response.text()),
    initialDelayMs: 100,
    maxDelayMs: 1000,
    restartDelayMs: 200,
    ...options,
  }));
  client.on("message", (message) => {
    t.ids.push(message.id);
    t.titles.push(message.title);
    t.countsAtMessage.push(client.counts);
  });
  client.on("state", ({ state }) => t.states.push(state));
  client.on("hello", (hello) => t.hellos.push(hello));
  client.on("resync", () => (t.resyncs += 1));
  client.on("read", (read) => t.reads.push(read));
  client.on("deleted", ({ ids }) => t.deleted.push(...ids));
  client.on("unread", ({ count, byType }) => {
    t.unread = count;
    t.unreadEvents.push({ count, byType });
  });
</script>
"""

# The seed's own frontend snippet, unchanged but for the URL.
SEED_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>seed</title>
<script>
  var ws = new WebSocket("WS_URL");
  ws.onmessage = function (event) {
    var data = JSON.parse(event.data);
    if (data.title && data.content) {
      document.body.dataset.got = data.title + "|" + data.content;
    }
  };
</script>
"""


def docs_example() -> str:
    """
    The fenced html example of docs/client.md, as written.
    """
    text = (ROOT / "docs" / "client.md").read_text()
    blocks = re.findall(r"^```html\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "docs/client.md must have exactly one ```html example"
    return blocks[0]


# -- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    """
    Headless Chromium (Debian's), driven by Playwright, for this module's
    tests only; skipped without them (failed under CI).
    """
    if CHROMIUM is None:
        missing_tool("no Chromium found: apt-get install chromium (or set NOTIFYD_TEST_CHROMIUM)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing_tool("playwright is not installed: pip install -e '.[test]'")
    playwright = await async_playwright().start()
    try:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
    except BaseException:
        await playwright.stop()
        raise
    yield chromium
    await chromium.close()
    await playwright.stop()


@pytest.fixture
async def context(browser: Any) -> AsyncIterator[Any]:
    """
    A fresh browser profile (storage, locks, channels) for one test. Console
    output is printed, so a failure shows it; an uncaught exception in a page
    fails the test.
    """
    ctx = await browser.new_context()
    ctx.set_default_timeout(WAIT_MS)
    errors: list[str] = []

    def watch(page: Any) -> None:
        page.on("console", lambda message: print(f"[console {message.type}] {message.text}"))
        page.on("pageerror", lambda error: errors.append(f"{page.url}: {error}"))

    ctx.on("page", watch)
    yield ctx
    await ctx.close()
    assert not errors, f"uncaught errors in pages: {errors}"


@pytest.fixture
async def app() -> AsyncIterator[AppServer]:
    """
    The app's own origin, on another port than notifyd.
    """
    server = AppServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def demo_daemon(dsn: str) -> AsyncIterator[RunningDaemon]:
    """
    A daemon as `notifyd demo` runs it: demo users alice and bob, so the
    message center is at / and demo_send is allowed.
    """
    settings = make_settings(dsn)
    verifier = TokenVerifier.from_settings(settings)
    demo_users = {user: verifier.mint(user) for user in DEMO_USERS}
    async with Daemon(settings, verifier, demo_users=demo_users) as instance:
        yield RunningDaemon(instance, verifier)


def harness_url(app: AppServer, **options: Any) -> str:
    return f"{app.origin}/harness?options={quote(json.dumps(options))}"


async def open_harness(
    context: Any, app: AppServer, running: RunningDaemon, user: str, **options: Any
) -> Any:
    """
    A harness page for ``user`` whose client is open.
    """
    app.token = running.token(user)
    app.pages["/harness"] = HARNESS.replace(
        "MODULE_URL", f"http://127.0.0.1:{running.port}/notifyd.js"
    )
    page = await context.new_page()
    await page.goto(harness_url(app, **options))
    await wait_open(page)
    return page


# The client drops a repeated message id as a second line of defence; the
# resume tests turn that off, so exactly-once is the cursors' doing.
NO_DEDUPE = {"dedupeSize": 0}


async def wait_open(page: Any) -> None:
    await page.wait_for_function(
        "() => window.client && window.client.state === 'open'", timeout=WAIT_MS
    )


async def open_demo(context: Any, running: RunningDaemon, user: str) -> Any:
    """
    ``user``'s message center at / (demo mode), live.
    """
    page = await context.new_page()
    await page.goto(f"http://127.0.0.1:{running.port}/?user={user}")
    await page.locator('#status[data-state="open"]').wait_for()
    return page


async def show_all_messages(page: Any) -> None:
    """
    The bell leads to the message center with every message listed.
    """
    await page.locator("#bell").click()
    await page.locator('#panel .cat[data-category="all"][aria-current="true"]').wait_for()


async def select_category(page: Any, category: str) -> None:
    await page.locator(f'.cat[data-category="{category}"]').click()
    await page.locator(f'.cat[data-category="{category}"][aria-current="true"]').wait_for()
    await page.wait_for_function("() => !document.querySelector('#more').disabled")


async def wait_category_badge(page: Any, category: str, text: str | None) -> None:
    """
    Until ``category``'s badge shows ``text`` (None: hidden, no unread).
    """
    await page.wait_for_function(
        """([category, text]) => {
          const badge = document.querySelector(`.cat[data-category="${category}"] .cat-badge`);
          return text === null ? badge.hidden : !badge.hidden && badge.textContent === text;
        }""",
        arg=[category, text],
    )


async def category_badges(page: Any) -> dict[str, str]:
    """
    The visible category badges, category -> text.
    """
    return await page.eval_on_selector_all(  # type: ignore[no-any-return]
        ".cat",
        """(buttons) => Object.fromEntries(buttons
          .map((b) => [b.dataset.category, b.querySelector('.cat-badge')])
          .filter(([, badge]) => !badge.hidden)
          .map(([category, badge]) => [category, badge.textContent]))""",
    )


async def wait_badge(page: Any, text: str) -> None:
    await page.wait_for_function(
        "(text) => document.querySelector('#badge').textContent === text", arg=text
    )


async def wait_ids(page: Any, count: int) -> list[str]:
    await page.wait_for_function("(n) => window.t.ids.length >= n", arg=count, timeout=WAIT_MS)
    return await page.evaluate("() => window.t.ids")


# -- serving the files (no browser needed) ---------------------------------


async def test_client_module_is_served_with_js_type_cors_etag_and_a_switch(
    start_daemon: StartDaemon,
) -> None:
    """/notifyd.js: JS content type, CORS for allowed origins only, 304 on ETag, 404 when turned off."""
    running = await start_daemon(allowed_origins=["https://app.example.com"])
    status, headers, body = await http_get(
        running.port, "/notifyd.js", {"Origin": "https://app.example.com"}
    )
    assert status == 200
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    assert "Origin" in headers["vary"]
    assert headers["cache-control"] == "no-cache"
    assert int(headers["content-length"]) == len(body)
    assert b"export function createClient" in body
    etag = headers["etag"]

    status, headers, _ = await http_get(
        running.port, "/notifyd.js", {"Origin": "https://evil.example"}
    )
    assert status == 200 and "access-control-allow-origin" not in headers

    status, headers, body = await http_get(running.port, "/notifyd.js?v=2", {"If-None-Match": etag})
    assert (status, body, headers["etag"]) == (304, b"", etag)
    status, _, _ = await http_get(running.port, "/notifyd.js", {"If-None-Match": '"other"'})
    assert status == 200

    status, headers, _ = await http_get(running.port, "/notifyd.d.ts")
    assert status == 200 and headers["content-type"].startswith("application/typescript")
    for path in ("/demo", "/demo.html"):
        status, headers, body = await http_get(running.port, path)
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert b"demo.js" in body and "content-security-policy" in headers
    status, headers, body = await http_get(running.port, "/notifyd.js", method="HEAD")
    assert (status, body, headers["etag"]) == (200, b"", etag)
    status, headers, _ = await http_get(running.port, "/notifyd.js", method="DELETE")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    status, _, _ = await http_get(running.port, "/healthz")
    assert status in (200, 503)

    everyone = await start_daemon()
    _, headers, _ = await http_get(
        everyone.port, "/notifyd.js", {"Origin": "https://anyone.example"}
    )
    assert headers["access-control-allow-origin"] == "*"

    off = await start_daemon(serve_static=False)
    for path in ("/notifyd.js", "/notifyd.d.ts", "/demo"):
        status, _, _ = await http_get(off.port, path)
        assert status == 404


def test_static_responses_follow_http_rules() -> None:
    """HEAD has headers and no body, other methods get 405, W/ ETags and normalised origins match."""
    ok = static.respond(
        "GET", "/notifyd.js", origin=None, if_none_match=None, enabled=True, allowed_origins=[]
    )
    assert ok is not None and ok.status == 200
    etag = dict(ok.headers)["ETag"]
    head = static.respond(
        "HEAD", "/notifyd.js", origin=None, if_none_match=None, enabled=True, allowed_origins=[]
    )
    assert (
        head is not None
        and head.body == b""
        and dict(head.headers)["Content-Length"] == str(len(ok.body))
    )
    post = static.respond(
        "POST", "/notifyd.js", origin=None, if_none_match=None, enabled=True, allowed_origins=[]
    )
    assert post is not None and post.status == 405 and dict(post.headers)["Allow"] == "GET, HEAD"
    demo = static.respond(
        "GET", "/demo", origin=None, if_none_match=None, enabled=True, allowed_origins=[]
    )
    assert demo is not None
    demo_etag = dict(demo.headers)["ETag"]
    weak = static.respond(
        "GET",
        "/demo",
        origin=None,
        if_none_match=f'"x", W/{demo_etag}',
        enabled=True,
        allowed_origins=[],
    )
    assert weak is not None and weak.status == 304
    assert (
        static.respond(
            "GET", "/nope", origin=None, if_none_match=None, enabled=True, allowed_origins=[]
        )
        is None
    )
    cors = static.respond(
        "GET",
        "/notifyd.js",
        origin="https://app.example.com",
        if_none_match=etag,
        enabled=True,
        allowed_origins=["HTTPS://App.Example.com:443/"],
    )
    assert cors is not None and cors.status == 304
    assert dict(cors.headers)["Access-Control-Allow-Origin"] == "https://app.example.com"


# -- the client in the browser ----------------------------------------------


async def test_docs_example_runs_cross_origin_receives_and_marks_read(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any, app: AppServer
) -> None:
    """The docs/client.md example, verbatim, imports the module cross-origin, gets a pushed row and marks it read."""
    example = docs_example()
    assert example.count("http://localhost:8080/notifyd.js") == 1
    app.pages["/"] = example.replace("http://localhost:8080", f"http://127.0.0.1:{daemon.port}")
    app.token = daemon.token("u1")
    page = await context.new_page()
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(app.origin + "/")
    await page.wait_for_function("() => document.querySelector('#status').textContent === 'open'")
    # First-frame auth: the token is in no URL (which only asks for the
    # counts on message frames).
    assert sockets == [f"ws://127.0.0.1:{daemon.port}/ws/message?counts=inline"]

    message_id = await insert(db, "u1", "Your order shipped", "Parcel 1Z999 is on its way")
    item = page.locator(f'#messages li[data-id="{message_id}"]')
    await item.wait_for()
    assert await item.text_content() == "Your order shipped: Parcel 1Z999 is on its way"
    await page.wait_for_function("() => document.title === '(1) My app'")

    await item.click()
    await eventually(lambda: is_read(db, message_id), "is_read = '1' in the database")
    await page.wait_for_function(
        f"() => document.querySelector('li[data-id=\"{message_id}\"]').classList.contains('read')"
    )
    await page.wait_for_function("() => document.title === 'My app'")


async def test_seed_snippet_receives_a_pushed_message(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any, app: AppServer
) -> None:
    """The seed's own frontend snippet (token in the URL) still gets the pushed row."""
    app.pages["/seed"] = SEED_PAGE.replace("WS_URL", daemon.url("u1"))
    page = await context.new_page()
    await page.goto(app.origin + "/seed")
    await eventually(lambda: sessions(daemon, "u1") == 1, "the seed page's session")
    await insert(db, "u1", "Hello", "from the seed")
    await page.wait_for_function("() => document.body.dataset.got === 'Hello|from the seed'")


async def test_client_resumes_after_daemon_restart_each_message_once(
    start_daemon: StartDaemon, db: asyncpg.Connection, context: Any, app: AppServer
) -> None:
    """Messages sent while notifyd is down arrive once each after it comes back on the same port."""
    first = await start_daemon()
    port = first.port
    page = await open_harness(context, app, first, "u1", **NO_DEDUPE)
    before = await insert(db, "u1", "before")
    await wait_ids(page, 1)

    await first.daemon.stop()
    await page.wait_for_function("() => window.client.state !== 'open'")
    missed = [await insert(db, "u1", f"missed {i}") for i in range(3)]
    second = await start_daemon(port=port)

    await wait_ids(page, 4)
    after = await insert(db, "u1", "after")
    ids = await wait_ids(page, 5)
    assert ids == [before, *missed, after]
    hellos = await page.evaluate("() => window.t.hellos")
    assert len(hellos) == 2 and hellos[1]["recovered"] is True
    assert sessions(second, "u1") == 1


async def test_cursor_survives_page_reload(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any, app: AppServer
) -> None:
    """After a reload the page gets what it missed and what is new, nothing it had already."""
    page = await open_harness(context, app, daemon, "u1", **NO_DEDUPE)
    seen = await insert(db, "u1", "seen")
    await wait_ids(page, 1)
    cursor = await page.evaluate("() => window.client.cursor")
    assert (
        cursor
        and await page.evaluate(
            "(key) => sessionStorage.getItem(key)",
            f"notifyd.cursor:ws://127.0.0.1:{daemon.port}/ws/message",
        )
        == cursor
    )

    await page.goto("about:blank")
    await eventually(lambda: sessions(daemon, "u1") == 0, "the session to end")
    missed = await insert(db, "u1", "missed while reloading")
    await page.goto(harness_url(app, **NO_DEDUPE))
    await wait_open(page)
    new = await insert(db, "u1", "new")
    ids = await wait_ids(page, 2)
    assert ids == [missed, new], (seen, ids)
    assert (await page.evaluate("() => window.t.hellos"))[0]["recovered"] is True


async def test_two_tabs_share_one_socket_and_hand_over(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any, app: AppServer
) -> None:
    """Two tabs: one server session, both get messages, a follower's actions and reload work, closing the leader hands over."""
    leader = await open_harness(context, app, daemon, "u1")
    follower = await context.new_page()
    await follower.goto(f"{app.origin}/harness")
    await wait_open(follower)
    assert await leader.evaluate("() => window.client.role") == "leader"
    assert await follower.evaluate("() => window.client.role") == "follower"
    assert sessions(daemon, "u1") == 1

    first = await insert(db, "u1", "to both")
    assert await wait_ids(leader, 1) == [first]
    assert await wait_ids(follower, 1) == [first]
    assert sessions(daemon, "u1") == 1

    # The follower's actions go through the leader's socket.
    page = await follower.evaluate("() => window.client.history({ limit: 5 })")
    assert [m["id"] for m in page["messages"]] == [first]
    await follower.evaluate("(id) => window.client.markRead([id])", first)
    await eventually(lambda: is_read(db, first), "the follower's markRead in the database")
    await follower.wait_for_function("() => window.t.unread === 0")

    # A follower that reloads gets what it missed from the leader.
    await follower.goto("about:blank")
    missed = await insert(db, "u1", "missed by the follower")
    await wait_ids(leader, 2)
    await follower.goto(f"{app.origin}/harness")
    assert await wait_ids(follower, 1) == [missed]
    assert await follower.evaluate("() => window.client.role") == "follower"
    assert sessions(daemon, "u1") == 1

    await leader.close()
    await follower.wait_for_function(
        "() => window.client.role === 'leader' && window.client.state === 'open'"
    )
    second = await insert(db, "u1", "after the leader left")
    assert await wait_ids(follower, 2) == [missed, second]
    await eventually(lambda: sessions(daemon, "u1") == 1, "one session after the handover")


async def test_resync_fires_once_when_replay_exceeds_limit(
    start_daemon: StartDaemon, db: asyncpg.Connection, context: Any, app: AppServer
) -> None:
    """More missed messages than NOTIFYD_REPLAY_LIMIT: one resync event, the newest ones, then live."""
    running = await start_daemon(replay_limit=3)
    page = await open_harness(context, app, running, "u1", **NO_DEDUPE)
    await insert(db, "u1", "seen")
    await wait_ids(page, 1)

    await page.goto("about:blank")
    await eventually(lambda: sessions(running, "u1") == 0, "the session to end")
    missed = [await insert(db, "u1", f"missed {i}") for i in range(5)]
    await page.goto(harness_url(app, **NO_DEDUPE))
    await page.wait_for_function("() => window.t.resyncs >= 1")
    live = await insert(db, "u1", "live")
    ids = await wait_ids(page, 4)
    assert ids == [*missed[-3:], live]
    assert await page.evaluate("() => window.t.resyncs") == 1
    assert (await page.evaluate("() => window.t.hellos"))[0]["recovered"] is False


async def test_demo_page_badge_counts_and_drops_on_read(
    daemon: RunningDaemon, db: asyncpg.Connection, browser: Any, context: Any
) -> None:
    """The demo shows the unread badge, lists pushed rows with a toast, and a read in one window updates another."""
    url = f"http://127.0.0.1:{daemon.port}/demo#token={daemon.token('u1')}"
    page = await context.new_page()
    await page.goto(url)
    await page.locator('#status[data-state="open"]').wait_for()
    await show_all_messages(page)
    other_context = await browser.new_context()  # another browser: its own connection
    try:
        other = await other_context.new_page()
        await other.goto(url)
        await other.locator('#status[data-state="open"]').wait_for()
        await show_all_messages(other)

        first = await insert(db, "u1", "Welcome", "Glad you are here", skip_url="/inbox/1")
        await insert(db, "u1", "Order shipped", "Parcel 1Z999")
        for window in (page, other):
            await window.wait_for_function(
                "() => document.querySelector('#badge').textContent === '2'"
            )
            assert await window.locator("#list li").count() == 2
        assert await page.get_attribute("#bell", "aria-label") == "Messages, 2 unread messages"
        assert await page.locator("#login").is_hidden() and await page.locator("#more").is_hidden()
        await page.locator(".toast", has_text="Order shipped").wait_for()
        assert await page.get_attribute(f'li[data-id="{first}"] a', "href") == "/inbox/1"

        await page.locator(f'li[data-id="{first}"] .msg-body').click()
        await eventually(lambda: is_read(db, first), "the click's read in the database")
        for window in (page, other):
            await window.wait_for_function(
                "() => document.querySelector('#badge').textContent === '1'"
            )
            await window.locator(f'li[data-id="{first}"]:not(.unread)').wait_for()

        await other.locator("#mark-all").click()
        await page.wait_for_function("() => document.querySelector('#badge').hidden")
        assert await page.locator("#list li.unread").count() == 0
    finally:
        await other_context.close()


async def test_demo_page_lists_history_and_loads_more(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any
) -> None:
    """The demo lists the newest 20 messages from history on load, and "Load more" pages back to the rest."""
    ids = [await insert(db, "u1", f"Old {i}") for i in range(22)]
    page = await context.new_page()
    await page.goto(f"http://127.0.0.1:{daemon.port}/demo#token={daemon.token('u1')}")
    await page.wait_for_function("() => document.querySelectorAll('#list li').length === 20")
    assert await page.locator("#badge").text_content() == "22"
    await show_all_messages(page)
    listed = await page.eval_on_selector_all(
        "#list li", "(items) => items.map((li) => li.dataset.id)"
    )
    assert listed == ids[::-1][:20]
    await page.locator("#more").click()
    await page.wait_for_function("() => document.querySelectorAll('#list li').length === 22")
    listed = await page.eval_on_selector_all(
        "#list li", "(items) => items.map((li) => li.dataset.id)"
    )
    assert listed == ids[::-1]
    assert await page.locator("#more").is_hidden()


async def test_client_counts_from_an_old_server_and_from_message_frames(
    daemon: RunningDaemon, context: Any, app: AppServer
) -> None:
    """
    `client.counts` is null before hello, has an empty byType from a server
    without per-type counts, takes the per-type counts of unread frames and
    those a message frame carries (in place when the message event fires,
    announced after it), and ignores a duplicate's.
    """
    authed = asyncio.Event()
    go_on = asyncio.Event()

    async def scripted(ws: ServerConnection) -> None:
        assert json.loads(await ws.recv())["action"] == "auth"
        authed.set()
        await go_on.wait()
        message = {"event": "message", "title": "t", "content": "c", "type": "comment"}
        for frame in (
            {"event": "hello", "version": 1, "user": "u1", "cursor": "c0", "unread": 2},
            {"event": "unread", "count": 3},
            {"event": "unread", "count": 5, "byType": {"comment": 2, "system": 3}},
            {
                **message,
                "cursor": "c1",
                "id": "m1",
                "unread": 6,
                "unreadByType": {"comment": 3, "system": 3},
            },
            {**message, "cursor": "c2", "id": "m1", "unread": 1, "unreadByType": {"x": 1}},
            {**message, "cursor": "c3", "id": "m2"},
        ):
            await ws.send(json.dumps(frame))
        await ws.wait_closed()

    async with serve(scripted, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        app.token = daemon.token("u1")
        app.pages["/harness"] = HARNESS.replace(
            "MODULE_URL", f"http://127.0.0.1:{daemon.port}/notifyd.js"
        )
        page = await context.new_page()
        await page.goto(harness_url(app, url=f"ws://127.0.0.1:{port}/", share=False))
        await asyncio.wait_for(authed.wait(), TIMEOUT)
        assert await page.evaluate("() => [window.client.counts, window.client.unread]") == [
            None,
            None,
        ]
        go_on.set()
        assert await wait_ids(page, 2) == ["m1", "m2"]
        new = {"count": 6, "byType": {"comment": 3, "system": 3}}
        assert await page.evaluate("() => window.t.unreadEvents") == [
            {"count": 2, "byType": {}},
            {"count": 3, "byType": {}},
            {"count": 5, "byType": {"comment": 2, "system": 3}},
            new,
        ]
        at_message = {"total": 6, "byType": new["byType"]}
        assert await page.evaluate("() => window.t.countsAtMessage") == [at_message, at_message]
        assert await page.evaluate("() => [window.client.counts, window.client.unread]") == [
            at_message,
            6,
        ]
        assert await page.evaluate("() => Object.isFrozen(window.client.counts.byType)")
        await page.close()


async def test_client_counts_per_type_from_the_server_in_every_tab(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any, app: AppServer
) -> None:
    """
    `client.counts` follows the server's per-type counts (no type counts
    under ""), in the tab holding the socket and in a tab that joins later;
    marking a type read drops only that type.
    """
    leader = await open_harness(context, app, daemon, "u1")
    assert await leader.evaluate("() => window.client.counts") == {"total": 0, "byType": {}}
    await insert(db, "u1", "A comment", type="comment")
    await insert(db, "u1", "No type")
    await leader.wait_for_function("() => window.t.unread === 2")
    both = {"total": 2, "byType": {"comment": 1, "": 1}}
    assert await leader.evaluate("() => window.client.counts") == both
    assert (await leader.evaluate("() => window.t.unreadEvents"))[-1] == {
        "count": 2,
        "byType": both["byType"],
    }

    follower = await context.new_page()
    await follower.goto(f"{app.origin}/harness")
    await wait_open(follower)
    assert await follower.evaluate("() => window.client.role") == "follower"
    assert await follower.evaluate("() => window.client.counts") == both

    await follower.evaluate("() => window.client.markAllRead('comment')")
    only_untyped = {"total": 1, "byType": {"": 1}}
    for tab in (leader, follower):
        await tab.wait_for_function("() => window.t.unread === 1")
        assert await tab.evaluate("() => window.client.counts") == only_untyped


async def test_client_mark_unread_and_delete_from_a_follower_tab_reach_every_tab(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any, app: AppServer
) -> None:
    """
    A follower tab's markUnread and delete go out on the leader's socket;
    both tabs get the `read` event with isRead "0", the `deleted` event and
    the new counts. delete() with more ids than one frame takes (1200
    unknown ones and the real one) still deletes the real one.
    """
    leader = await open_harness(context, app, daemon, "u1")
    follower = await context.new_page()
    await follower.goto(f"{app.origin}/harness")
    await wait_open(follower)
    assert await follower.evaluate("() => window.client.role") == "follower"
    message = await insert(db, "u1", "Read it, then not", type="comment")
    await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", message)
    for tab in (leader, follower):
        await tab.wait_for_function("() => window.t.reads.length === 1")
        assert await tab.evaluate("() => window.client.counts") == {"total": 0, "byType": {}}

    await follower.evaluate("(id) => window.client.markUnread(id)", message)
    for tab in (leader, follower):
        await tab.wait_for_function("() => window.t.reads.length === 2")
        assert (await tab.evaluate("() => window.t.reads"))[1] == {
            "ids": [message],
            "isRead": "0",
        }
        await tab.wait_for_function("() => window.t.unread === 1")
        assert await tab.evaluate("() => window.client.counts") == {
            "total": 1,
            "byType": {"comment": 1},
        }
    assert not await is_read(db, message)

    unknown = [f"no-such-message-{i}" for i in range(1200)]
    await follower.evaluate(
        "(ids) => window.client.delete(ids)", [*unknown[:600], message, *unknown[600:]]
    )
    for tab in (leader, follower):
        await tab.wait_for_function("() => window.t.deleted.length === 1")
        assert await tab.evaluate("() => window.t.deleted") == [message]
        await tab.wait_for_function("() => window.t.unread === 0")
        assert await tab.evaluate("() => window.client.counts") == {"total": 0, "byType": {}}
    page = await leader.evaluate("() => window.client.history({ limit: 5 })")
    assert page["messages"] == []
    assert sessions(daemon, "u1") == 1


async def test_client_gives_up_after_repeated_4401_and_on_4409(
    start_daemon: StartDaemon, context: Any, app: AppServer, open_client: Any
) -> None:
    """4401 asks for a new token each time and stops after 3 ("unauthorized"); 4409 stops at once ("replaced")."""
    running = await start_daemon(max_sessions_per_user=1)
    app.token = "not-a-token"
    app.pages["/harness"] = HARNESS.replace(
        "MODULE_URL", f"http://127.0.0.1:{running.port}/notifyd.js"
    )
    page = await context.new_page()
    await page.goto(f"{app.origin}/harness")
    await page.wait_for_function("() => window.client.state === 'unauthorized'")
    assert app.token_requests == 3
    assert (
        await page.evaluate("() => window.t.states.filter((s) => s === 'connecting').length") == 3
    )

    app.token = running.token("u1")
    await page.evaluate("() => window.client.reconnect()")
    await wait_open(page)

    await open_client(running.url("u1"))  # a newer session of u1 takes the only place
    await page.wait_for_function("() => window.client.state === 'replaced'")
    error = await page.evaluate(
        "() => window.client.history().then(() => null, (error) => error.code)"
    )
    assert error == "replaced"
    assert sessions(running, "u1") == 1


# -- notifyd demo: the message center at / ----------------------------------


async def test_demo_mode_alone_serves_the_page_at_root_and_takes_demo_send(
    demo_daemon: RunningDaemon, daemon: RunningDaemon, db: asyncpg.Connection, open_client: Any
) -> None:
    """Only a demo-mode daemon serves / (with the demo user's token) and inserts for demo_send; a serve-style one says 404 and unknown_action."""
    status, headers, body = await http_get(demo_daemon.port, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "no-store" and "content-security-policy" in headers
    assert b'name="notifyd-demo"' in body and b"&quot;user&quot;: &quot;alice&quot;" in body
    status, _, body = await http_get(demo_daemon.port, "/?user=bob")
    assert status == 200 and b"&quot;user&quot;: &quot;bob&quot;" in body
    assert (await http_get(demo_daemon.port, "/?user=mallory"))[0] == 404
    assert (await http_get(demo_daemon.port, "/demo"))[0] == 200

    bob = await open_client(demo_daemon.url("bob"))
    alice = await open_client(demo_daemon.url("alice"))
    await alice.send(
        {
            "action": "demo_send",
            "to": "bob",
            "title": "Hi Bob",
            "content": "from Alice",
            "skipUrl": "/x",
        }
    )
    frame = (await bob.messages_until("Hi Bob"))[-1]
    assert (frame["sendUser"], frame["toUser"], frame["content"], frame["skipUrl"]) == (
        "alice",
        "bob",
        "from Alice",
        "/x",
    )
    await alice.send({"action": "demo_send", "to": "mallory", "title": "Hi", "id": "s1"})
    error = await alice.recv_event("error")
    assert (error["code"], error["id"]) == ("invalid", "s1")

    # notifyd serve: no page at /, and demo_send does not exist.
    assert (await http_get(daemon.port, "/"))[0] == 404
    served = await open_client(daemon.url("alice"))
    await served.send({"action": "demo_send", "to": "bob", "title": "Nope", "id": "s2"})
    error = await served.recv_event("error")
    assert (error["code"], error["id"]) == ("unknown_action", "s2")
    assert await db.fetchval("SELECT count(*) FROM t_message_real_time WHERE title = 'Nope'") == 0


async def test_demo_root_page_shows_toast_and_badge_for_a_sql_insert(
    demo_daemon: RunningDaemon, db: asyncpg.Connection, context: Any
) -> None:
    """The demo page at / says who it is, links the other user, and shows a toast and the badge for a row inserted with SQL."""
    page = await open_demo(context, demo_daemon, "alice")
    await page.locator("#who", has_text="alice").wait_for()
    assert await page.get_attribute('#users a[href="?user=bob"]', "href") == "?user=bob"
    assert await page.locator("#send").is_visible()

    await insert(
        db,
        "alice",
        "Your order shipped",
        "Parcel 1Z999 is on its way",
        skip_url="https://example.com/orders/17",
    )
    toast = page.locator(".toast", has_text="Your order shipped")
    await toast.wait_for()
    assert await toast.locator("p").text_content() == "Parcel 1Z999 is on its way"
    assert await toast.locator("a").get_attribute("href") == "https://example.com/orders/17"
    await wait_badge(page, "1")
    assert await page.locator("#badge").is_visible()
    assert await page.get_attribute("#bell", "aria-label") == "Messages, 1 unread message"
    assert await page.locator("#announce").text_content() == "1 unread message"


async def test_demo_two_windows_of_one_user_mark_read_moves_the_badge(
    demo_daemon: RunningDaemon, db: asyncpg.Connection, context: Any
) -> None:
    """Two windows of alice's page: a read in one drops the badge in the other, and "mark all read" clears both."""
    first = await open_demo(context, demo_daemon, "alice")
    second = await open_demo(context, demo_daemon, "alice")
    one = await insert(db, "alice", "One")
    await insert(db, "alice", "Two")
    for window in (first, second):
        await wait_badge(window, "2")

    await show_all_messages(first)
    await first.locator(f'li[data-id="{one}"] .msg-body').click()
    await eventually(lambda: is_read(db, one), "the click's read in the database")
    await wait_badge(second, "1")
    await show_all_messages(second)
    await second.locator(f'li[data-id="{one}"]:not(.unread)').wait_for()

    await second.locator("#mark-all").click()
    await first.wait_for_function("() => document.querySelector('#badge').hidden")
    await first.wait_for_function("() => document.querySelectorAll('#list li.unread').length === 0")


async def listed(page: Any) -> list[tuple[str, str]]:
    """
    The listed messages, newest first, as (id, category).
    """
    items = await page.eval_on_selector_all(
        "#list li", "(items) => items.map((li) => [li.dataset.id, li.dataset.category])"
    )
    return [(id_, category) for id_, category in items]


async def test_demo_category_lists_its_messages_pages_and_filters_unread(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any
) -> None:
    """
    A category lists only its type ("other" the rest, found pages back),
    pages with "load more", takes live messages of its type only, and
    "unread only" leaves the read ones out.
    """
    others = [
        await insert(db, "u1", "No type"),
        await insert(db, "u1", "Odd type", type="newsletter"),
    ]
    comments = [await insert(db, "u1", f"Comment {i}", type="comment") for i in range(22)]
    systems = [await insert(db, "u1", f"Notice {i}", type="system") for i in range(3)]
    await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", systems[0])
    page = await context.new_page()
    await page.goto(f"http://127.0.0.1:{daemon.port}/demo#token={daemon.token('u1')}")
    await page.wait_for_function("() => document.querySelectorAll('#list li').length === 20")

    await select_category(page, "comment")
    await page.wait_for_function("() => document.querySelectorAll('#list li').length === 20")
    assert await listed(page) == [(i, "comment") for i in comments[::-1][:20]]
    await page.locator("#more").click()
    await page.wait_for_function("() => document.querySelectorAll('#list li').length === 22")
    assert await listed(page) == [(i, "comment") for i in comments[::-1]]
    assert await page.locator("#more").is_hidden()
    assert await page.locator("#pane-title").text_content() == "Comments"

    live_system = await insert(db, "u1", "Live notice", type="system")
    await page.locator(".toast", has_text="Live notice").wait_for()
    live_comment = await insert(db, "u1", "Live comment", type="comment")
    await page.locator(f'#list li[data-id="{live_comment}"]').wait_for()
    assert await listed(page) == [(i, "comment") for i in [live_comment, *comments[::-1]]]

    await select_category(page, "other")
    await page.wait_for_function("() => document.querySelectorAll('#list li').length === 2")
    assert await listed(page) == [(i, "other") for i in others[::-1]]
    assert await page.locator("#more").is_hidden()

    await select_category(page, "system")
    await page.wait_for_function("() => document.querySelectorAll('#list li').length === 4")
    await page.locator("#unread-only").check()
    await page.wait_for_function("() => document.querySelectorAll('#list li').length === 3")
    assert await listed(page) == [(i, "system") for i in [live_system, *systems[:0:-1]]]
    assert await page.locator("#list li.unread").count() == 3


async def test_demo_page_speaks_chinese_to_a_zh_cn_browser(
    daemon: RunningDaemon, db: asyncpg.Connection, browser: Any
) -> None:
    """With the browser's language zh-CN, the page, its categories, bell and announcements are in Chinese."""
    context = await browser.new_context(locale="zh-CN")
    context.set_default_timeout(WAIT_MS)
    try:
        page = await context.new_page()
        await page.goto(f"http://127.0.0.1:{daemon.port}/demo#token={daemon.token('u1')}")
        await page.locator('#status[data-state="open"]').wait_for()
        assert await page.evaluate("() => navigator.language") == "zh-CN"
        assert await page.get_attribute("html", "lang") == "zh-CN"
        assert await page.locator("#status").text_content() == "已连接"
        assert await page.locator("#panel-title").text_content() == "我的消息"
        names = await page.eval_on_selector_all(
            ".cat-name", "(names) => names.map((n) => n.textContent)"
        )
        assert names == ["全部消息", "评论", "赞和收藏", "新增粉丝", "私信", "系统通知", "其他"]
        assert await page.locator("#mark-all").inner_text() == "全部标为已读"
        assert await page.locator("label[for=unread-only]").inner_text() == "只看未读"
        assert await page.locator("#empty").text_content() == "这里还没有消息。"

        await insert(db, "u1", "新评论", type="comment")
        await wait_badge(page, "1")
        # Full-width punctuation is what Chinese text uses.
        bell_label = "消息，1 条未读消息"  # noqa: RUF001
        assert await page.get_attribute("#bell", "aria-label") == bell_label
        assert await page.locator("#announce").text_content() == "1 条未读消息"
        title = await page.locator("#list .msg-title").text_content()
        assert title == "未读：新评论"  # noqa: RUF001
        assert await page.locator("#list .msg-type").text_content() == "评论"
        delete = page.locator("#list .msg-delete")
        assert await delete.get_attribute("aria-label") == "删除：新评论"  # noqa: RUF001
        assert await delete.get_attribute("title") == "删除"
        await page.locator("#list .msg-body").click()
        mark_unread = page.locator("#list .msg-unread")
        await mark_unread.wait_for()
        assert await mark_unread.get_attribute("aria-label") == "标为未读：新评论"  # noqa: RUF001
        assert await mark_unread.get_attribute("title") == "标为未读"
        assert await page.locator(".toast .toast-type").text_content() == "评论"
    finally:
        await context.close()


async def test_demo_category_badges_move_on_both_pages_of_one_user(
    demo_daemon: RunningDaemon, db: asyncpg.Connection, context: Any
) -> None:
    """
    Two pages of alice: a comment moves the comment badge and the bell on
    both, opening it on one puts both back; "mark all read" in one category
    clears that badge only.
    """
    first = await open_demo(context, demo_daemon, "alice")
    second = await open_demo(context, demo_daemon, "alice")
    for window in (first, second):
        assert await category_badges(window) == {}
    comment = await insert(db, "alice", "New comment", "Nice post", type="comment")
    for window in (first, second):
        await wait_category_badge(window, "comment", "1")
        await wait_badge(window, "1")
        assert await category_badges(window) == {"all": "1", "comment": "1"}
        assert (
            await window.get_attribute('.cat[data-category="comment"]', "aria-label")
            == "Comments, 1 unread message"
        )
        assert await window.get_attribute("#bell", "aria-label") == "Messages, 1 unread message"

    await first.locator(f'li[data-id="{comment}"] .msg-body').click()
    await eventually(lambda: is_read(db, comment), "the click's read in the database")
    for window in (first, second):
        await wait_category_badge(window, "comment", None)
        await window.wait_for_function("() => document.querySelector('#badge').hidden")
        assert await category_badges(window) == {}
        assert await window.get_attribute('.cat[data-category="comment"]', "aria-label") == (
            "Comments"
        )

    await insert(db, "alice", "Another comment", type="comment")
    notice = await insert(db, "alice", "Maintenance tonight", type="system")
    for window in (first, second):
        await wait_badge(window, "2")
        assert await category_badges(window) == {"all": "2", "comment": "1", "system": "1"}
    await select_category(second, "comment")
    await second.locator("#mark-all").click()
    for window in (first, second):
        await wait_category_badge(window, "comment", None)
        await wait_badge(window, "1")
        assert await category_badges(window) == {"all": "1", "system": "1"}
    await first.wait_for_function("() => document.querySelectorAll('#list li.unread').length === 1")
    assert await first.locator("#list li.unread").get_attribute("data-id") == notice
    assert not await is_read(db, notice)


async def test_demo_badges_follow_the_counts_carried_on_message_frames(
    demo_daemon: RunningDaemon, db: asyncpg.Connection, context: Any
) -> None:
    """
    The page's client opts in to counts on message frames: each new message
    reaches the tab holding the socket as one frame with the counts and no
    unread frame, and the bell and category badges of both pages of the
    user (the second one gets the frames relayed) follow those counts.
    """
    received: list[dict[str, Any]] = []

    def watch(socket: Any) -> None:
        socket.on("framereceived", lambda payload: received.append(json.loads(payload)))

    first = await context.new_page()
    first.on("websocket", watch)
    await first.goto(f"http://127.0.0.1:{demo_daemon.port}/?user=alice")
    await first.locator('#status[data-state="open"]').wait_for()
    second = await open_demo(context, demo_daemon, "alice")
    [session] = demo_daemon.daemon.hub.sessions_of("alice") or []
    assert session.inline_counts

    expected = {"all": "1", "comment": "1"}
    await insert(db, "alice", "A comment", type="comment")
    for page in (first, second):
        await wait_badge(page, "1")
        await wait_category_badge(page, "comment", "1")
        assert await category_badges(page) == expected
    await insert(db, "alice", "A like", type="like")
    await insert(db, "alice", "Another comment", type="comment")
    expected = {"all": "3", "comment": "2", "like": "1"}
    for page in (first, second):
        await wait_badge(page, "3")
        await wait_category_badge(page, "comment", "2")
        assert await category_badges(page) == expected

    pushed = [frame for frame in received if frame["event"] in ("message", "unread")]
    assert [frame["event"] for frame in pushed] == ["message"] * 3
    assert (pushed[-1]["unread"], pushed[-1]["unreadByType"]) == (3, {"comment": 2, "like": 1})
    assert demo_daemon.daemon.stats.inline_counts >= 2


async def listed_ids(page: Any) -> list[str]:
    return await page.eval_on_selector_all(  # type: ignore[no-any-return]
        "#list li", "(items) => items.map((li) => li.dataset.id)"
    )


async def test_demo_delete_on_one_page_leaves_both_lists_and_moves_both_badges(
    demo_daemon: RunningDaemon, db: asyncpg.Connection, context: Any
) -> None:
    """
    Two pages of alice: deleting an unread comment on one removes it from
    both lists and drops both pages' comment badge and bell; deleting a read
    message changes the lists only, and an announcement is hidden for alice
    alone. What is deleted stays out after a reload (history leaves it out),
    and the row itself is kept.
    """
    first = await open_demo(context, demo_daemon, "alice")
    second = await open_demo(context, demo_daemon, "alice")
    bob = await open_demo(context, demo_daemon, "bob")
    notice = await insert(db, "alice", "Maintenance tonight", type="system")
    comment = await insert(db, "alice", "New comment", "Nice post", type="comment")
    for window in (first, second):
        await wait_badge(window, "2")
        await show_all_messages(window)
        await window.wait_for_function("() => document.querySelectorAll('#list li').length === 2")
        assert await category_badges(window) == {"all": "2", "comment": "1", "system": "1"}
    delete = first.locator(f'li[data-id="{comment}"] .msg-delete')
    assert await delete.get_attribute("aria-label") == "Delete: New comment"
    assert await delete.get_attribute("title") == "Delete"
    # An unread message has nothing to mark unread.
    assert await first.locator(f'li[data-id="{comment}"] .msg-unread').count() == 0

    await delete.click()
    for window in (first, second):
        await window.locator(f'#list li[data-id="{comment}"]').wait_for(state="detached")
        await wait_category_badge(window, "comment", None)
        await wait_badge(window, "1")
        assert await listed_ids(window) == [notice]
        assert await category_badges(window) == {"all": "1", "system": "1"}
    assert await db.fetchval(
        "SELECT count(*) FROM t_message_hidden WHERE user_id = 'alice' AND message_id = $1",
        comment,
    )
    assert await db.fetchval("SELECT count(*) FROM t_message_real_time WHERE id = $1", comment)

    # A read message: gone from both lists, the counts stay.
    await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", notice)
    for window in (first, second):
        await window.wait_for_function("() => document.querySelector('#badge').hidden")
    await second.locator(f'li[data-id="{notice}"] .msg-delete').click()
    for window in (first, second):
        await window.locator(f'#list li[data-id="{notice}"]').wait_for(state="detached")
        await window.locator("#empty").wait_for()
        assert await category_badges(window) == {}

    # An announcement: alice deletes her copy, bob keeps his.
    announcement = await insert(db, "*", "Welcome, everyone", type="system")
    for window in (first, second, bob):
        await wait_badge(window, "1")
    await show_all_messages(bob)
    await first.locator(f'li[data-id="{announcement}"] .msg-delete').click()
    for window in (first, second):
        await window.locator(f'#list li[data-id="{announcement}"]').wait_for(state="detached")
        await window.wait_for_function("() => document.querySelector('#badge').hidden")
    await bob.locator(f'#list li[data-id="{announcement}"].unread').wait_for()
    assert await category_badges(bob) == {"all": "1", "system": "1"}

    await first.reload()
    await first.locator('#status[data-state="open"]').wait_for()
    await first.wait_for_function("() => !document.querySelector('#more').disabled")
    await first.locator("#empty").wait_for()
    assert await listed_ids(first) == []
    assert await category_badges(first) == {}


async def test_demo_expiry_withdraws_from_both_pages_and_moves_both_badges(
    demo_daemon: RunningDaemon, db: asyncpg.Connection, context: Any
) -> None:
    """
    Two pages of alice: a message and an announcement with an expire_at
    show on both, then at their expire_at leave both lists, and both pages'
    category badges and bell drop to what is left; a reload lists what is
    left only.
    """
    first = await open_demo(context, demo_daemon, "alice")
    second = await open_demo(context, demo_daemon, "alice")
    expire_at = await db.fetchval("SELECT clock_timestamp() + interval '4 seconds'")
    stays = await insert(db, "alice", "New comment", type="comment")
    sale = await insert(db, "alice", "Flash sale", type="system", expire_at=expire_at)
    notice = await insert(db, "*", "Sale for everyone", type="system", expire_at=expire_at)
    for window in (first, second):
        await wait_badge(window, "3")
        await show_all_messages(window)
        await window.wait_for_function("() => document.querySelectorAll('#list li').length === 3")
        assert await category_badges(window) == {"all": "3", "comment": "1", "system": "2"}
    for window in (first, second):
        for gone in (sale, notice):
            await window.locator(f'#list li[data-id="{gone}"]').wait_for(state="detached")
        await wait_category_badge(window, "system", None)
        await wait_badge(window, "1")
        assert await listed_ids(window) == [stays]
        assert await category_badges(window) == {"all": "1", "comment": "1"}
    await first.reload()
    await first.locator('#status[data-state="open"]').wait_for()
    await first.wait_for_function("() => !document.querySelector('#more').disabled")
    await show_all_messages(first)
    await first.wait_for_function("() => document.querySelectorAll('#list li').length === 1")
    assert await listed_ids(first) == [stays]
    assert await category_badges(first) == {"all": "1", "comment": "1"}


async def test_demo_mark_unread_on_one_page_moves_both_badges_up(
    demo_daemon: RunningDaemon, db: asyncpg.Connection, context: Any
) -> None:
    """
    Two pages of alice: a read message has a "mark unread" button; clicking
    it on one page marks it unread in the database, in both lists, and puts
    both pages' category badge and bell back up.
    """
    first = await open_demo(context, demo_daemon, "alice")
    second = await open_demo(context, demo_daemon, "alice")
    await insert(db, "alice", "Still unread", type="system")
    comment = await insert(db, "alice", "Old comment", type="comment")
    for window in (first, second):
        await wait_badge(window, "2")
        await show_all_messages(window)
    await first.locator(f'li[data-id="{comment}"] .msg-body').click()
    await eventually(lambda: is_read(db, comment), "the click's read in the database")
    for window in (first, second):
        await wait_badge(window, "1")
        await window.locator(f'li[data-id="{comment}"]:not(.unread) .msg-unread').wait_for()
        assert await category_badges(window) == {"all": "1", "system": "1"}
    mark_unread = second.locator(f'li[data-id="{comment}"] .msg-unread')
    assert await mark_unread.get_attribute("aria-label") == "Mark unread: Old comment"
    assert await mark_unread.get_attribute("title") == "Mark unread"

    await mark_unread.click()
    for window in (first, second):
        await wait_category_badge(window, "comment", "1")
        await wait_badge(window, "2")
        await window.locator(f'li[data-id="{comment}"].unread').wait_for()
        assert await window.locator(f'li[data-id="{comment}"] .msg-unread').count() == 0
        assert await category_badges(window) == {"all": "2", "comment": "1", "system": "1"}
    assert not await is_read(db, comment)
    # Focus stays on the message whose button went away.
    assert await second.evaluate("() => document.activeElement.closest('li')?.dataset.id") == (
        comment
    )


def overlap(a: Any, b: Any) -> bool:
    """
    Whether two bounding boxes share any area.
    """
    return bool(
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


def inside(inner: Any, outer: Any) -> bool:
    return bool(
        inner["x"] >= outer["x"]
        and inner["y"] >= outer["y"]
        and inner["x"] + inner["width"] <= outer["x"] + outer["width"]
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"]
    )


async def test_demo_message_buttons_fit_a_phone(
    daemon: RunningDaemon, db: asyncpg.Connection, browser: Any
) -> None:
    """On a 375 px wide screen, a read message with a link shows its link and both buttons, and nothing is wider than the screen."""
    context = await browser.new_context(viewport={"width": 375, "height": 800})
    context.set_default_timeout(WAIT_MS)
    try:
        message = await insert(
            db,
            "u1",
            "A rather long title for a message on a small screen",
            "And content that wraps onto more than one line of this narrow list",
            skip_url="https://example.com/orders/17",
            type="system",
        )
        await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", message)
        page = await context.new_page()
        await page.goto(f"http://127.0.0.1:{daemon.port}/demo#token={daemon.token('u1')}")
        row = page.locator(f'#list li[data-id="{message}"]')
        await row.locator(".msg-unread").wait_for()
        controls = (".msg-body", ".msg-link", ".msg-unread", ".msg-delete")
        boxes = {control: await row.locator(control).bounding_box() for control in controls}
        for control, box in boxes.items():
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, control
        for index, first in enumerate(controls):
            for second in controls[index + 1 :]:
                assert not overlap(boxes[first], boxes[second]), (first, second)
        # The time stays inside its message, clear of the link and buttons.
        assert inside(await row.locator(".msg-time").bounding_box(), boxes[".msg-body"])
        assert await page.evaluate("() => document.documentElement.scrollWidth") <= 375
    finally:
        await context.close()


async def test_demo_form_sends_from_alice_to_bob_and_screenshots_the_page(
    demo_daemon: RunningDaemon, db: asyncpg.Connection, browser: Any
) -> None:
    """Alice's form sends to Bob, whose page gets the toast and the badge; Bob's message center, with its category badges, is docs/demo.png."""
    context = await browser.new_context(viewport={"width": 1000, "height": 700})
    context.set_default_timeout(WAIT_MS)
    try:
        await insert(
            db,
            "bob",
            "Welcome to notifyd",
            "Messages arrive the moment they are committed",
            type="system",
        )
        read = await insert(
            db, "bob", "Invoice 2041 paid", "Thank you, we received 42.00 EUR", type="system"
        )
        await db.execute("UPDATE t_message_real_time SET is_read = '1' WHERE id = $1", read)
        await insert(
            db,
            "bob",
            "Your order shipped",
            "Parcel 1Z999 is on its way",
            skip_url="https://example.com/orders/17",
            type="system",
        )
        await insert(db, "bob", "dave followed you", "You have 12 followers now", type="follow")
        await insert(db, "bob", "carol liked your post", "Push, not poll", type="like")
        await insert(
            db, "bob", "carol commented on your post", "Great write-up, thanks!", type="comment"
        )
        alice = await open_demo(context, demo_daemon, "alice")
        bob = await open_demo(context, demo_daemon, "bob")
        await wait_badge(bob, "5")

        await alice.select_option("#send-to", "bob")
        await alice.select_option("#send-type", "private")
        await alice.fill("#send-title", "Lunch at noon?")
        await alice.fill("#send-content", "The usual place, table for two")
        await alice.fill("#send-url", "/calendar/lunch")
        await alice.locator("#send-button").click()
        await alice.locator("#send-status", has_text="Sent to bob.").wait_for()

        toast = bob.locator(".toast", has_text="Lunch at noon?")
        await toast.wait_for()
        assert await toast.locator("a").get_attribute("href") == "/calendar/lunch"
        await wait_badge(bob, "6")
        row = await db.fetchrow(
            "SELECT send_user, content, type FROM t_message_real_time"
            " WHERE title = 'Lunch at noon?'"
        )
        assert (row["send_user"], row["content"]) == ("alice", "The usual place, table for two")
        # The form's category is demo_send's `type`: under "Private messages".
        assert row["type"] == "private"

        await show_all_messages(bob)
        titles = await bob.eval_on_selector_all(
            "#list .msg-title", "(items) => items.map((t) => t.textContent)"
        )
        assert [t.removeprefix("Unread: ") for t in titles] == [
            "Lunch at noon?",
            "carol commented on your post",
            "carol liked your post",
            "dave followed you",
            "Your order shipped",
            "Invoice 2041 paid",
            "Welcome to notifyd",
        ]
        assert await bob.locator("#list li.unread").count() == 6
        sent = bob.locator("#list li", has_text="Lunch at noon?")
        assert await sent.get_attribute("data-category") == "private"
        assert await category_badges(bob) == {
            "all": "6",
            "comment": "1",
            "like": "1",
            "follow": "1",
            "private": "1",
            "system": "2",
        }
        await bob.screenshot(path=str(SCREENSHOT), animations="disabled")
        assert SCREENSHOT.stat().st_size > 10_000
    finally:
        await context.close()


# -- hostile origins and token lifetime ------------------------------------


async def test_page_on_an_unlisted_origin_cannot_open_a_session_and_a_listed_one_can(
    start_daemon: StartDaemon, db: asyncpg.Connection, context: Any, app: AppServer
) -> None:
    """The browser's own Origin header decides: unlisted gets 403 (no session), listed gets its messages."""
    refusing = await start_daemon(allowed_origins=["https://app.example.com"])
    app.pages["/seed"] = SEED_PAGE.replace("WS_URL", refusing.url("u1"))
    page = await context.new_page()
    await page.goto(app.origin + "/seed")
    await eventually(
        lambda: refusing.daemon.stats.auth_failures["origin not allowed"] >= 1,
        "the refused handshake",
    )
    assert sessions(refusing, "u1") == 0

    accepting = await start_daemon(allowed_origins=[app.origin])
    app.pages["/seed"] = SEED_PAGE.replace("WS_URL", accepting.url("u1"))
    await page.goto(app.origin + "/seed")
    await eventually(lambda: sessions(accepting, "u1") == 1, "the listed origin's session")
    await insert(db, "u1", "Hello", "from a listed origin")
    await page.wait_for_function("() => document.body.dataset.got === 'Hello|from a listed origin'")


async def test_client_refreshes_its_token_in_place_before_it_expires(
    start_daemon: StartDaemon,
    db: asyncpg.Connection,
    context: Any,
    app: AppServer,
    open_client: Any,
) -> None:
    """
    A 4 s token: the client asks for a new one and sends `refresh`; a twin
    session with the same token is closed with 4401 at exp, the browser's
    session stays open on the same socket and still receives.
    """
    running = await start_daemon(jwt_leeway_s=0)
    short = running.token("u1", ttl_s=4)
    app.token = short
    app.pages["/harness"] = HARNESS.replace(
        "MODULE_URL", f"http://127.0.0.1:{running.port}/notifyd.js"
    )
    page = await context.new_page()
    await page.goto(harness_url(app))
    await eventually(lambda: app.token_requests >= 1, "the first token request")
    app.token = running.token("u1")
    await wait_open(page)
    twin = await open_client(running.url("u1", token=short))
    await eventually(lambda: app.token_requests >= 2, "the refresh asking for a token")
    await asyncio.wait_for(twin.ws.wait_closed(), TIMEOUT)
    assert twin.ws.close_code == 4401
    assert await page.evaluate("() => window.t.states") == ["connecting", "open"]
    await insert(db, "u1", "after-refresh")
    await page.wait_for_function("() => window.t.titles.includes('after-refresh')")
    assert await page.evaluate("() => window.t.states") == ["connecting", "open"]


async def test_client_shed_with_1013_waits_the_servers_hint_then_connects(
    start_daemon: StartDaemon, context: Any, app: AppServer, open_client: Any
) -> None:
    """
    With the pending-handshake limit taken, the browser's handshake is
    closed with 1013 and a retry_ms of at least 1 s: the client waits at
    least that long (its own backoff here stays below 1 s), and connects
    once there is room.
    """
    running = await start_daemon(max_pending_handshakes=1, auth_timeout_s=30)
    held = await open_client(running.url(None), hello=False)  # never authenticates
    app.token = running.token("u1")
    app.pages["/harness"] = HARNESS.replace(
        "MODULE_URL", f"http://127.0.0.1:{running.port}/notifyd.js"
    )
    page = await context.new_page()
    await page.goto(harness_url(app))
    await page.evaluate(
        """() => {
          window.t.shed = [];
          window.client.on("state", (d) => { if (d.code === 1013) window.t.shed.push(d.delay); });
        }"""
    )
    await page.wait_for_function("() => window.t.shed.length > 0", timeout=WAIT_MS)
    delays = await page.evaluate("() => window.t.shed")
    assert min(delays) >= 1000, delays

    await held.send({"action": "auth", "token": running.token("held")})
    await held.recv_event("hello")
    await wait_open(page)


async def test_client_retries_a_restarting_server_at_its_short_interval_then_backs_off(
    start_daemon: StartDaemon, db: asyncpg.Connection, context: Any, app: AppServer
) -> None:
    """
    After a 1012, the attempts that nothing accepts (the port closed) are
    retried after half to one and a half restartRetryMs with the backoff not growing,
    for restartRetryForMs; then the growing backoff takes over. The client
    resumes on the server started again on the same port.
    """
    first = await start_daemon()
    port = first.port
    page = await open_harness(
        context,
        app,
        first,
        "u1",
        initialDelayMs=5000,
        maxDelayMs=30000,
        restartRetryMs=200,
        restartRetryForMs=3000,
    )
    await page.evaluate(
        """() => {
          window.t.retries = [];
          window.client.on("state", ({ state, code, delay, attempt }) => {
            if (state === "reconnecting") window.t.retries.push({ code, delay, attempt });
          });
        }"""
    )
    await first.daemon.stop()
    await page.wait_for_function(
        "() => window.t.retries.some((r) => r.attempt >= 1)", timeout=WAIT_MS
    )
    retries = await page.evaluate("() => window.t.retries")
    assert retries[0]["code"] == 1012
    refused = retries[1 : next(i for i, r in enumerate(retries) if r["attempt"] >= 1)]
    assert len(refused) >= 5, retries
    assert all(r["code"] == 1006 and r["attempt"] == 0 for r in refused), retries
    assert all(100 <= r["delay"] <= 300 for r in refused), retries

    missed = await insert(db, "u1", "while restarting")
    await start_daemon(port=port)
    await page.evaluate("() => window.client.reconnect()")  # skip the backoff's wait
    await page.wait_for_function("(id) => window.t.ids.includes(id)", arg=missed, timeout=WAIT_MS)
