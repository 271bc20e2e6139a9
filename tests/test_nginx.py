"""
notifyd behind Debian's nginx, with contrib/nginx/notifyd.conf as shipped:
TLS terminated by nginx, the WebSocket upgrade, failover between two
instances, the client address from a trusted proxy, and a forged
X-Forwarded-For that changes nothing.

The config is used as shipped but for its addresses and paths, each
replaced by a test one (a replacement that no longer matches fails the test,
so the file and the test cannot drift apart). Clients connect from
127.0.0.3 and 127.0.0.4, nginx reaches notifyd from 127.0.0.1 (the one
trusted proxy), and a client that goes around nginx connects from
127.0.0.2.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import ssl
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from . import test_browser
from .certificates import self_signed
from .conftest import SECRET, TIMEOUT, insert, missing_tool
from .processes import (
    NotifydProcess,
    free_port,
    mint,
    running_notifyd,
    serve_env,
    wait_until_healthy,
)

# Chromium, for the browser client through nginx (as the browser tests have it).
browser = test_browser.browser
AppServer = test_browser.AppServer

SHIPPED = Path(__file__).resolve().parent.parent / "contrib" / "nginx" / "notifyd.conf"
ORIGIN = "https://app.example.com"


def _nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx",) if os.access(path, os.X_OK)), None
    )
    if found is None:
        missing_tool("nginx is not installed: apt-get install nginx-light")
    return found


def _rendered(directory: Path, upstreams: tuple[int, int], http_port: int, https_port: int) -> str:
    """
    The shipped config with the test's ports and paths, inside a minimal
    nginx.conf that keeps every file nginx writes in ``directory``.
    """
    cert_file, key_file = self_signed(directory)
    text = SHIPPED.read_text()
    for old, new in (
        ("server 127.0.0.1:8081 ", f"server 127.0.0.1:{upstreams[0]} "),
        ("server 127.0.0.1:8082 ", f"server 127.0.0.1:{upstreams[1]} "),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("/etc/letsencrypt/live/push.example.com/fullchain.pem", str(cert_file)),
        ("/etc/letsencrypt/live/push.example.com/privkey.pem", str(key_file)),
        ("/var/log/nginx/notifyd.access.log", str(directory / "access.log")),
    ):
        assert text.count(old) == 1, f"{old!r} is no longer in {SHIPPED}"
        text = text.replace(old, new)
    site = directory / "notifyd.conf"
    site.write_text(text)
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root nginx's workers would switch to nobody, who cannot read the
    # test's private temporary directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = directory / "nginx.conf"
    main.write_text(
        f"{user}worker_processes 1;\n"
        f"pid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"{temp}\n"
        f"    access_log off;\n"
        f"    include {site};\n"
        "}\n"
    )
    return str(main)


@contextlib.asynccontextmanager
async def _running_nginx(config: str, directory: Path, port: int) -> AsyncIterator[None]:
    nginx = _nginx_binary()
    check = await asyncio.create_subprocess_exec(
        nginx, "-t", "-q", "-p", str(directory), "-c", config,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(check.communicate(), TIMEOUT)
    assert check.returncode == 0, output.decode()
    process = await asyncio.create_subprocess_exec(
        nginx, "-p", str(directory), "-c", config, "-g", "daemon off;",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                assert process.returncode is None, (directory / "error.log").read_text()
                assert loop.time() < deadline, "nginx did not start listening"
                await asyncio.sleep(0.05)
            else:
                writer.close()
                await writer.wait_closed()
                break
        yield
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()


class Proxied:
    """
    Two notifyd instances (the second may be absent) behind nginx over TLS.
    """

    def __init__(self, directory: Path, instances: list[NotifydProcess | None], ports: list[int]):
        self.directory = directory
        self.instances = instances
        self.ports = ports
        self.https_port = free_port()
        self.http_port = free_port()

    @functools.cached_property
    def tls(self) -> ssl.SSLContext:
        """
        A client context that trusts the test's self-signed certificate only.
        """
        return ssl.create_default_context(cafile=str(self.directory / "cert.pem"))

    async def open(
        self,
        user: str,
        *,
        source: str = "127.0.0.3",
        since: str | None = None,
        origin: str = ORIGIN,
        headers: dict[str, str] | None = None,
    ) -> tuple[ClientConnection, dict[str, Any]]:
        """
        A browser-like session through nginx: an Origin, the token in the
        first frame; returns it with its hello.
        """
        ws = await connect(
            f"wss://localhost:{self.https_port}/ws/message",
            ssl=self.tls,
            origin=origin,  # type: ignore[arg-type]
            additional_headers=headers,
            local_addr=(source, 0),
            open_timeout=TIMEOUT,
        )
        auth: dict[str, Any] = {"action": "auth", "token": mint(user)}
        if since is not None:
            auth["since"] = since
        await ws.send(json.dumps(auth))
        hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert hello["event"] == "hello", hello
        return ws, hello

    def get(self, path: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"https://localhost:{self.https_port}{path}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=self.tls) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as error:
            with error:  # it holds the response's socket
                return error.code, error.read()

    def serving(self, line_fragment: str) -> int:
        """
        The index of the instance whose log has a line with ``line_fragment``.
        """
        found = [
            index
            for index, instance in enumerate(self.instances)
            if instance is not None and line_fragment in instance.output()
        ]
        assert len(found) == 1, found
        return found[0]


@contextlib.asynccontextmanager
async def _behind_nginx(
    dsn: str, directory: Path, *, instances: int = 2, **settings: str
) -> AsyncIterator[Proxied]:
    """
    ``instances`` notifyd processes (the other upstream's port stays
    closed, as a stopped instance's would) behind nginx.
    """
    _nginx_binary()
    ports = [free_port(), free_port()]
    env = {
        "NOTIFYD_JWT_SECRET": SECRET,
        "NOTIFYD_TRUSTED_PROXIES": "127.0.0.1",
        "NOTIFYD_ALLOWED_ORIGINS": ORIGIN,
        "NOTIFYD_LOG_LEVEL": "INFO",
        **settings,
    }
    async with contextlib.AsyncExitStack() as stack:
        started: list[NotifydProcess | None] = []
        for port in ports[:instances]:
            server = await stack.enter_async_context(
                running_notifyd("serve", env=serve_env(dsn, port, **env))
            )
            started.append(server)
        for port, server in zip(ports, started, strict=False):
            assert server is not None
            await wait_until_healthy(port, server)
        started += [None] * (2 - instances)
        proxied = Proxied(directory, started, ports)
        config = _rendered(directory, (ports[0], ports[1]), proxied.http_port, proxied.https_port)
        await stack.enter_async_context(_running_nginx(config, directory, proxied.https_port))
        yield proxied


async def _next_message(ws: ClientConnection) -> dict[str, Any]:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        if frame["event"] == "message":
            return frame


async def test_client_through_nginx_over_tls_gets_pushes_and_resumes_after_an_upstream_stops(
    dsn, db, tmp_path
):
    """Over nginx's TLS a session gets its pushes; when its instance stops it resumes on the other with nothing lost."""
    async with _behind_nginx(dsn, tmp_path) as proxied:
        ws, hello = await proxied.open("alice")
        await insert(db, "alice", "through nginx")
        first = await _next_message(ws)
        assert first["title"] == "through nginx"
        # The instance that holds the session logged it with the client's
        # address and the nginx hop it came through.
        opened = "opened: user=alice"
        serving = proxied.serving(opened)
        line = next(
            line for line in proxied.instances[serving].output().splitlines() if opened in line
        )
        assert "remote=127.0.0.3 via=127.0.0.1:" in line, line

        stopped = proxied.instances[serving]
        assert stopped is not None
        assert await stopped.stop() == 0
        with pytest.raises(ConnectionClosed) as closed:
            await _next_message(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        await insert(db, "alice", "while away")

        ws, hello = await proxied.open("alice", since=first["cursor"])
        assert hello["recovered"] is True, hello
        assert (await _next_message(ws))["title"] == "while away"
        await insert(db, "alice", "after failover")
        assert (await _next_message(ws))["title"] == "after failover"
        other = proxied.instances[1 - serving]
        assert other is not None and opened in other.output()
        await ws.close()


async def test_only_the_client_and_health_paths_are_served_through_nginx(dsn, tmp_path):
    """notifyd.js and the health paths come through with notifyd's headers; /metrics and the demo page do not."""
    async with _behind_nginx(dsn, tmp_path) as proxied:
        status, body = await asyncio.to_thread(proxied.get, "/notifyd.js")
        assert status == 200 and b"createClient" in body
        status, _ = await asyncio.to_thread(proxied.get, "/notifyd.d.ts")
        assert status == 200
        status, body = await asyncio.to_thread(proxied.get, "/readyz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, _ = await asyncio.to_thread(proxied.get, "/healthz")
        assert status == 200
        for hidden in ("/metrics", "/demo", "/"):
            status, _ = await asyncio.to_thread(proxied.get, hidden)
            assert status == 404, hidden
        # Plain http is sent to https.
        request = urllib.request.Request(f"http://127.0.0.1:{proxied.http_port}/healthz")
        opener = urllib.request.build_opener(_NoRedirect())
        with pytest.raises(urllib.error.HTTPError) as redirect:
            await asyncio.to_thread(opener.open, request, None, TIMEOUT)
        with redirect.value as response:
            assert response.code == 301
            assert response.headers["Location"].startswith("https://")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


async def test_a_forged_forwarded_for_changes_neither_limits_nor_logs(dsn, tmp_path):
    """Limits and remote= follow the client nginx saw; X-Forwarded-For sent by a client, through nginx or around it, changes nothing."""
    # One instance up, the other upstream down: nginx fails over to the live
    # one every time, so every session below meets the same limits.
    async with _behind_nginx(
        dsn, tmp_path, instances=1, NOTIFYD_MAX_CONNECTIONS_PER_ADDRESS="1"
    ) as proxied:
        server = proxied.instances[0]
        assert server is not None
        # Two clients behind one proxy address are two addresses.
        first, _ = await proxied.open("alice", source="127.0.0.3")
        second, _ = await proxied.open("bob", source="127.0.0.4")
        # A second session from 127.0.0.3 is over its limit, whatever it
        # claims to be: nginx appends the address it saw.
        with pytest.raises(InvalidStatus) as refused:
            await proxied.open(
                "alice", source="127.0.0.3", headers={"X-Forwarded-For": "203.0.113.50"}
            )
        assert refused.value.response.status_code == 429
        await server.wait_for_output(
            "limit connections_per_address reached: remote=127.0.0.3", timeout=TIMEOUT
        )
        # The origin check's refusal names the client too.
        with pytest.raises(InvalidStatus) as forbidden:
            await proxied.open("bob", source="127.0.0.4", origin="https://evil.example")
        assert forbidden.value.response.status_code == 403
        line = await server.wait_for_output("reason=origin not allowed", timeout=TIMEOUT)
        assert "remote=127.0.0.4 via=127.0.0.1:" in line, line

        # Around nginx, from an address that is not a trusted proxy, the
        # header is ignored: the peer is the client, in limits and logs.
        direct = f"ws://127.0.0.1:{proxied.ports[0]}/ws/message?token={mint('carol')}"
        around = await connect(
            direct,
            additional_headers={"X-Forwarded-For": "203.0.113.51"},
            local_addr=("127.0.0.2", 0),
            open_timeout=TIMEOUT,
        )
        assert json.loads(await asyncio.wait_for(around.recv(), TIMEOUT))["event"] == "hello"
        line = await server.wait_for_output("opened: user=carol", timeout=TIMEOUT)
        assert f"remote=127.0.0.2:{around.local_address[1]}" in line, line
        assert "via=" not in line and "203.0.113" not in line, line
        with pytest.raises(InvalidStatus) as again:
            async with connect(
                direct,
                additional_headers={"X-Forwarded-For": "203.0.113.52"},
                local_addr=("127.0.0.2", 0),
                open_timeout=TIMEOUT,
            ):
                pass
        assert again.value.response.status_code == 429
        assert "203.0.113" not in server.output()
        for ws in (first, second, around):
            await ws.close()


async def test_metrics_loopback_only_goes_by_the_forwarded_client(start_daemon):
    """With NOTIFYD_METRICS_LOOPBACK_ONLY, a remote client forwarded by a local proxy is refused; a forged header from elsewhere changes nothing."""
    daemon = await start_daemon(trusted_proxies=["127.0.0.1"], metrics_loopback_only=True)

    async def status(source: str, forwarded: str | None) -> int:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", daemon.port, local_addr=(source, 0)
        )
        header = f"X-Forwarded-For: {forwarded}\r\n" if forwarded else ""
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        await writer.wait_closed()
        return int(line.split()[1])

    assert await status("127.0.0.1", None) == 200
    assert await status("127.0.0.1", "127.0.0.5") == 200
    assert await status("127.0.0.1", "203.0.113.5") == 403
    # 127.0.0.2 is on this machine but not a trusted proxy: its header is ignored.
    assert await status("127.0.0.2", "203.0.113.5") == 200


BROWSER_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>through nginx</title>
<script type="module">
  import { createClient } from "NOTIFYD_JS";
  window.got = [];
  const client = createClient({
    token: () => fetch("/notifyd-token").then((response) => response.text()),
    restartDelayMs: 200,
  });
  client.on("message", (message) => window.got.push(message.title));
  client.on("state", ({ state }) => { document.body.dataset.state = state; });
</script>
"""


async def test_notifyd_js_in_chromium_through_nginx_resumes_on_the_other_instance(
    dsn, db, tmp_path, browser
):
    """notifyd.js loaded through nginx over TLS opens wss:// through it; when its instance stops it reconnects through nginx and gets each message once."""
    app = AppServer()
    await app.start()
    try:
        async with _behind_nginx(dsn, tmp_path, NOTIFYD_ALLOWED_ORIGINS=app.origin) as proxied:
            app.token = mint("alice")
            app.pages["/"] = BROWSER_PAGE.replace(
                "NOTIFYD_JS", f"https://localhost:{proxied.https_port}/notifyd.js"
            )
            # Chromium does not know the test's self-signed certificate (the
            # websockets clients above verify it against that certificate).
            context = await browser.new_context(ignore_https_errors=True)
            try:
                page = await context.new_page()
                await page.goto(app.origin + "/")
                await page.wait_for_function(
                    "() => document.body.dataset.state === 'open'", timeout=TIMEOUT * 1000
                )
                await insert(db, "alice", "one")
                await page.wait_for_function(
                    "() => window.got.includes('one')", timeout=TIMEOUT * 1000
                )
                serving = proxied.serving("opened: user=alice")
                stopped = proxied.instances[serving]
                assert stopped is not None
                assert await stopped.stop() == 0
                await insert(db, "alice", "while away")
                await page.wait_for_function(
                    "() => window.got.includes('while away')", timeout=3 * TIMEOUT * 1000
                )
                await insert(db, "alice", "after")
                await page.wait_for_function(
                    "() => window.got.includes('after')", timeout=TIMEOUT * 1000
                )
                assert await page.evaluate("window.got") == ["one", "while away", "after"]
                other = proxied.instances[1 - serving]
                assert other is not None and "opened: user=alice" in other.output()
            finally:
                await context.close()
    finally:
        await app.stop()
