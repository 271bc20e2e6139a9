"""
The webhook's rules, without I/O: signing, verifying, type filter, URL
checks and the meaning of an HTTP status (the retry schedule is
:func:`notifyd.backoff.backoff_delay`).

Signature scheme (also in docs/sinks.md): the sender puts the Unix time in
``Notifyd-Timestamp`` and ``v1=<hex HMAC-SHA256(secret, timestamp + "." +
body)>`` in ``Notifyd-Signature``. The receiver recomputes it over the raw
body, compares in constant time and rejects timestamps older than a few
minutes (a replayed request); within that window ``Idempotency-Key`` (the
message id) lets it drop a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from ..exceptions import ConfigError

__all__ = [
    "Outcome",
    "WebhookTarget",
    "classify_status",
    "parse_retry_after",
    "parse_webhook_url",
    "sign",
    "signature_headers",
    "type_allowed",
    "verify",
]

SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300.0


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """
    ``v1=<hex>``: HMAC-SHA256 over ``"<timestamp>.<body>"``.
    """
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def signature_headers(
    secret: bytes, timestamp: int, body: bytes, message_id: str
) -> dict[str, str]:
    """
    The headers that make a POST verifiable and deduplicable.
    """
    return {
        "Notifyd-Timestamp": str(timestamp),
        "Notifyd-Signature": sign(secret, timestamp, body),
        "Idempotency-Key": message_id,
    }


def verify(
    secret: bytes,
    timestamp: str,
    signature: str,
    body: bytes,
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> bool:
    """
    What a receiver does: true when ``signature`` is ours over ``body`` and
    ``timestamp`` is within ``tolerance_s`` of ``now``.
    """
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    if abs(now - sent_at) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, sent_at, body), signature)


class Outcome(Enum):
    """
    What an HTTP answer means for the message.
    """

    SENT = "sent"  # 2xx: done
    RETRY = "retry"  # 5xx, 408, 429, no answer: try again later
    REJECTED = "rejected"  # any other 4xx, 3xx: the receiver refuses it for good


def classify_status(status: int | None) -> Outcome:
    """
    The outcome of a POST answered with ``status`` (None: no answer, a
    connection error or a timeout).
    """
    if status is None or status >= 500 or status in (408, 425, 429):
        return Outcome.RETRY
    if 200 <= status < 300:
        return Outcome.SENT
    return Outcome.REJECTED


def parse_retry_after(value: str | None, *, maximum: float) -> float | None:
    """
    A ``Retry-After`` in seconds (capped at ``maximum``), or None when absent
    or not a number of seconds (HTTP dates are ignored).
    """
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, maximum)


def type_allowed(message_type: str | None, types: Collection[str]) -> bool:
    """
    Whether a message of ``message_type`` passes a filter of ``types``
    (empty: everything; a message without a type passes only an empty one).
    """
    return not types or (message_type is not None and message_type in types)


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """
    Where to POST: from ``NOTIFYD_WEBHOOK_URL``.
    """

    tls: bool
    host: str
    port: int
    target: str  # path and query, as the request line sends it
    host_header: str


def parse_webhook_url(url: str | None) -> WebhookTarget:
    """
    Check and split the webhook URL; :class:`ConfigError` in one line when
    it is missing or not an absolute http(s) URL with a host.
    """
    if not url:
        raise ConfigError("the webhook sink needs NOTIFYD_WEBHOOK_URL (an http:// or https:// URL)")
    if any(c.isspace() for c in url):
        raise ConfigError("invalid NOTIFYD_WEBHOOK_URL: it contains white space")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"invalid NOTIFYD_WEBHOOK_URL {url!r}: the scheme must be http or https")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"invalid NOTIFYD_WEBHOOK_URL {url!r}: bad port") from None
    host = parts.hostname
    if not host:
        raise ConfigError(f"invalid NOTIFYD_WEBHOOK_URL {url!r}: no host")
    if parts.username or parts.password:
        raise ConfigError(
            "invalid NOTIFYD_WEBHOOK_URL: credentials in the URL would be sent in clear; "
            "the HMAC signature authenticates the sender"
        )
    tls = scheme == "https"
    default_port = 443 if tls else 80
    port = port or default_port
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == default_port else f"{shown_host}:{port}"
    return WebhookTarget(tls, host, port, target, host_header)
