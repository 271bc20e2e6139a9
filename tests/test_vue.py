"""
The Vue 3 recipe in Chromium: contrib/vue/inbox.html, an Element Plus
message center on useNotifyd.js, served as it is with Vue's and Element
Plus's own browser builds from npm (no bundler), against an in-process
daemon and the test PostgreSQL. Also the seed's front end after its
one-line change (docs/migrating-from-spring.md).

Pages are served from the "app" origin by a small static server here;
notifyd.js comes cross-origin from the daemon, as in production. Waits are
on page-side state or on the database, each with a deadline.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from . import test_browser
from .conftest import TIMEOUT, RunningDaemon, insert
from .npm import node_modules
from .test_browser import AppServer, sessions

# Chromium and a fresh profile per test, as the browser tests have them.
browser = test_browser.browser
context = test_browser.context

ROOT = Path(__file__).resolve().parent.parent
VUE_DIR = ROOT / "contrib" / "vue"
# By major version: npm picks the newest of each.
VUE_PACKAGES = ("vue@3", "element-plus@2")
WAIT_MS = TIMEOUT * 1000


@pytest.fixture(scope="module")
def vendor() -> dict[str, Path]:
    """
    Vue's and Element Plus's browser builds, from npm.
    """
    modules = node_modules(*VUE_PACKAGES)
    return {
        "/vendor/vue/vue.global.prod.js": modules / "vue" / "dist" / "vue.global.prod.js",
        "/vendor/element-plus/index.full.min.js": modules
        / "element-plus"
        / "dist"
        / "index.full.min.js",
        "/vendor/element-plus/index.css": modules / "element-plus" / "dist" / "index.css",
    }


@pytest.fixture
async def site(vendor: dict[str, Path]) -> AsyncIterator[AppServer]:
    server = AppServer()
    for path, file in vendor.items():
        server.add(path, file.read_bytes())
    for name in ("useNotifyd.js", "vue-global.js"):
        server.add(f"/vendor/{name}", (VUE_DIR / name).read_bytes())
    await server.start()
    yield server
    await server.stop()


async def _open_inbox(context: Any, site: AppServer, daemon: RunningDaemon, user: str) -> Any:
    html = (VUE_DIR / "inbox.html").read_text()
    assert html.count("https://push.example.com") == 1
    site.add(
        "/inbox.html", html.replace("https://push.example.com", f"http://127.0.0.1:{daemon.port}")
    )
    site.token = daemon.token(user)
    page = await context.new_page()
    await page.goto(site.origin + "/inbox.html")
    await page.wait_for_function(
        "() => document.querySelector('.state')?.textContent.trim() === 'open'", timeout=WAIT_MS
    )
    return page


async def _titles(page: Any) -> list[str]:
    return await page.eval_on_selector_all(  # type: ignore[no-any-return]
        ".messages .el-table__body tr.el-table__row td:first-child",
        "cells => cells.map(cell => cell.textContent.trim())",
    )


async def _until(page: Any, condition: str, arg: Any = None) -> None:
    await page.wait_for_function(condition, arg=arg, timeout=WAIT_MS)


# The page's observable state: rows, the bell's badge, a category's badge.
_ROWS = "() => [...document.querySelectorAll('.messages tr.el-table__row td:first-child')].map(c => c.textContent.trim())"
_BELL = """() => {
  const badge = document.querySelector('.bell .el-badge__content');
  return badge && badge.offsetParent !== null ? badge.textContent.trim() : '';
}"""


def _badge(type_: str) -> str:
    return f"""() => {{
  const badge = document.querySelector('.tab-{type_} .el-badge__content');
  return badge && badge.offsetParent !== null ? badge.textContent.trim() : '';
}}"""


async def _poll(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not await check():
        assert loop.time() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def test_vue_inbox_lists_pushes_counts_per_category_and_acts_in_element_plus(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any, site: AppServer
) -> None:
    """useNotifyd in an Element Plus page: first page, live pushes with a toast, badges per category, read/unread/delete/read-all reaching the database."""
    await insert(db, "alice", "Old order", type="order")
    await insert(db, "alice", "Old notice", type="system")
    await insert(db, "bob", "Not for alice", type="order")
    page = await _open_inbox(context, site, daemon, "alice")
    await _until(page, f"() => ({_ROWS})().length === 2")
    assert await page.evaluate(_ROWS) == ["Old notice", "Old order"]
    await _until(page, f"() => ({_BELL})() === '2'")
    assert await page.evaluate(_badge("order")) == "1"

    new_id = await insert(db, "alice", "New order", "It shipped", type="order")
    await _until(page, f"() => ({_ROWS})()[0] === 'New order'")
    await page.locator(".el-notification", has_text="It shipped").wait_for(timeout=WAIT_MS)
    await _until(page, f"() => ({_BELL})() === '3' && ({_badge('order')})() === '2'")

    # Read from the row: the database has it, and the badges follow.
    await page.locator("tr.el-table__row", has_text="New order").locator(".mark-read").click()

    async def new_is_read() -> bool:
        value = await db.fetchval("SELECT is_read FROM t_message_real_time WHERE id = $1", new_id)
        return value == "1"

    await _poll("the row's read reached the database", new_is_read)
    await _until(page, f"() => ({_BELL})() === '2' && ({_badge('order')})() === '1'")
    # Unread again, from the same row.
    await page.locator("tr.el-table__row", has_text="New order").locator(".mark-unread").click()
    await _until(page, f"() => ({_BELL})() === '3'")

    # The app's own UPDATE reaches the page like a click.
    await db.execute(
        "UPDATE t_message_real_time SET is_read = '1' WHERE to_user = 'alice' AND type = 'system'"
    )
    await _until(page, f"() => ({_BELL})() === '2' && ({_badge('system')})() === ''")

    # Delete a row: gone from the list, the counts and the database's inbox.
    await page.locator("tr.el-table__row", has_text="Old order").locator(".remove").click()
    await _until(page, f"() => !({_ROWS})().includes('Old order') && ({_BELL})() === '1'")

    # The order tab shows only orders; "Mark all read" there reads them.
    await page.locator(".el-tabs__item", has_text="order").click()
    await _until(page, f"() => JSON.stringify(({_ROWS})()) === JSON.stringify(['New order'])")
    await page.locator(".read-all").click()
    await _until(page, f"() => ({_BELL})() === ''")

    async def nothing_unread() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM t_message_real_time WHERE to_user = 'alice' AND is_read = '0'"
        )
        return bool(count == 0)

    await _poll("every message of alice read in the database", nothing_unread)
    assert "Not for alice" not in await page.content()


async def test_vue_inbox_loads_more_pages_and_keeps_pushes_on_top(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any, site: AppServer
) -> None:
    """ "Load more" pages back through history without duplicates, and a push during it stays first."""
    await db.execute(
        "INSERT INTO t_message_real_time (to_user, title, content, type) "
        "SELECT 'alice', 'Message ' || i, 'c', 'order' FROM generate_series(1, 45) AS i"
    )
    page = await _open_inbox(context, site, daemon, "alice")
    await _until(page, f"() => ({_ROWS})().length === 20")
    await insert(db, "alice", "Live one", type="order")
    await _until(page, f"() => ({_ROWS})()[0] === 'Live one'")
    for expected in (41, 46):
        await page.locator(".load-more").click()
        await _until(page, f"() => ({_ROWS})().length === {expected}")
    titles = await page.evaluate(_ROWS)
    assert titles == ["Live one"] + [f"Message {i}" for i in range(45, 0, -1)]
    await _until(page, "() => !document.querySelector('.load-more')")
    await _until(page, f"() => ({_BELL})() === '46'")


def test_docs_show_the_composable_as_the_page_uses_it() -> None:
    """The Vue code in docs/client.md is the tested page's, word for word."""
    text = (ROOT / "docs" / "client.md").read_text()
    section = text.partition("## Vue 3")[2].partition("\n## ")[0]
    blocks = re.findall(r"^```js\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert blocks, "docs/client.md's Vue 3 section has no js block"
    page = (VUE_DIR / "inbox.html").read_text()
    for block in blocks:
        for line in block.strip().splitlines():
            assert line.strip() in page, line


SEED_AFTER = """<!doctype html>
<meta charset="utf-8">
<title>seed</title>
<script>
  var userId = "alice";
  var token = "TOKEN";
  var ws = new WebSocket("NOTIFYD/ws/message/" + userId, ["notifyd.v1", "bearer." + token]);
  ws.onmessage = function (event) {
    var data = JSON.parse(event.data);
    if (data.title && data.content) {
      document.body.dataset.got = data.title + "|" + data.content;
    }
  };
</script>
"""


async def test_the_seed_front_end_after_its_one_line_change_receives_the_row(
    daemon: RunningDaemon, db: asyncpg.Connection, context: Any, site: AppServer
) -> None:
    """The seed's page with only its WebSocket line changed (path user, token in the subprotocol) gets the pushed row."""
    docs = (ROOT / "docs" / "migrating-from-spring.md").read_text()
    line = next(line for line in SEED_AFTER.splitlines() if "new WebSocket" in line)
    changed = line[line.index("new WebSocket") :].replace('"NOTIFYD', '"wss://push.example.com')
    assert changed in docs, changed
    site.add(
        "/seed.html",
        SEED_AFTER.replace("NOTIFYD", f"ws://127.0.0.1:{daemon.port}").replace(
            "TOKEN", daemon.token("alice")
        ),
    )
    page = await context.new_page()
    await page.goto(site.origin + "/seed.html")

    async def one_session() -> bool:
        return sessions(daemon, "alice") == 1

    await _poll("the seed page's session", one_session)
    await insert(db, "alice", "Hello", "from the seed")
    await page.wait_for_function(
        "() => document.body.dataset.got === 'Hello|from the seed'", timeout=WAIT_MS
    )
