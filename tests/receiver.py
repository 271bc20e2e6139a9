"""
A real HTTP receiver for webhook tests: the stdlib's HTTP server in a
thread, on 127.0.0.1, verifying signatures with its own HMAC code (not
notifyd's), as a gateway would.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .conftest import TIMEOUT


@dataclass(frozen=True)
class Post:
    """
    One request as received.
    """

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    at: float  # time.monotonic() on arrival

    @property
    def message(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class Receiver:
    """
    Records every POST; answers ``status`` (settable while running). After
    :meth:`hold`, answers past a number of acknowledgements are held back
    until :meth:`release`: the POST has arrived, its answer has not.
    """

    def __init__(self, secret: bytes, tls: ssl.SSLContext | None = None) -> None:
        self.secret = secret
        self.tls = tls
        self.status = 200
        self.posts: list[Post] = []
        self.answered = 0
        self._hold_after: int | None = None
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"https://localhost:{self.port}/hooks/notifyd?src=test"
        return f"http://127.0.0.1:{self.port}/hooks/notifyd?src=test"

    def start(self) -> None:
        """
        Listen (again on the same port after :meth:`stop`).
        """
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                timestamp = self.headers.get("Notifyd-Timestamp", "")
                expected = (
                    "v1="
                    + hmac.new(
                        receiver.secret, timestamp.encode() + b"." + body, hashlib.sha256
                    ).hexdigest()
                )
                verified = hmac.compare_digest(expected, self.headers.get("Notifyd-Signature", ""))
                fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
                with receiver._lock:
                    receiver.posts.append(
                        Post(
                            self.path,
                            dict(self.headers),
                            body,
                            verified and fresh,
                            time.monotonic(),
                        )
                    )
                if not receiver._may_answer():
                    # Held: the sender waits for an answer that only comes
                    # after release() (into a dead socket, if it was killed).
                    receiver._released.wait(30 * TIMEOUT)
                status = receiver.status
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender is gone

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def hold(self, after: int) -> None:
        """
        Answer the next ``after`` POSTs, then hold every answer back.
        """
        with self._lock:
            self._hold_after = self.answered + after
            self._released.clear()

    def release(self) -> None:
        """
        Answer normally again, the held requests too.
        """
        with self._lock:
            self._hold_after = None
        self._released.set()

    def _may_answer(self) -> bool:
        with self._lock:
            if self._hold_after is not None and self.answered >= self._hold_after:
                return False
            self.answered += 1
            return True

    def stop(self) -> None:
        """
        Stop listening: connections are refused until :meth:`start`.
        """
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()

    def snapshot(self) -> list[Post]:
        with self._lock:
            return list(self.posts)

    def ids(self) -> list[str]:
        return [post.message["id"] for post in self.snapshot()]

    async def wait_for(
        self, done: Callable[[list[Post]], bool], timeout: float = TIMEOUT
    ) -> list[Post]:
        """
        Poll (with a deadline) until ``done(posts)``.
        """
        return await until(lambda: done(self.snapshot()) and self.snapshot(), timeout)


async def until(
    condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition"
) -> Any:
    """
    Poll ``condition`` every 20 ms until it returns something truthy.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def until_async(
    condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition"
) -> Any:
    """
    Like :func:`until` for a coroutine function.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
