"""
One HTTP/1.1 POST over asyncio streams, for the webhook sink.

Why not aiohttp or httpx: the webhook needs one request shape (a small JSON
body, a handful of headers) and one fact from the answer (the status, and
``Retry-After``). That is some sixty lines over ``asyncio.open_connection``
with the stdlib's TLS, against a dependency tree for everything else. Each
POST uses its own connection (``Connection: close``): webhook rates are low,
and a fresh connection cannot be a half-closed pooled one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

from .policy import WebhookTarget

__all__ = ["HttpAnswer", "post"]

_MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """
    The status line and the headers of an answer (names lower-cased).
    """

    status: int
    headers: dict[str, str]


class HttpError(Exception):
    """
    No usable answer: connection refused or reset, a malformed answer.
    """


async def post(
    target: WebhookTarget,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpAnswer:
    """
    POST ``body`` and return the answer's status and headers; the body of
    the answer is not read. Raises :class:`HttpError` or ``TimeoutError``
    (the whole exchange is bounded by ``timeout``).
    """
    async with asyncio.timeout(timeout):
        try:
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=(ssl_context or ssl.create_default_context()) if target.tls else None,
                server_hostname=target.host if target.tls else None,
                limit=_MAX_HEADER_BYTES,
            )
        except (OSError, ssl.SSLError) as exc:
            raise HttpError(f"cannot connect to {target.host_header}: {exc}") from None
        try:
            lines = [
                f"POST {target.target} HTTP/1.1",
                f"Host: {target.host_header}",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                "Connection: close",
                *(f"{name}: {value}" for name, value in headers.items()),
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            return await _read_head(reader)
        except (
            OSError,
            ssl.SSLError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as exc:
            raise HttpError(f"{target.host_header}: {type(exc).__name__}: {exc}") from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> HttpAnswer:
    # 1xx interim answers (100 Continue, 103 Early Hints) precede the real one.
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP answer: {status_line[:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            continue
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return HttpAnswer(status, headers)
