"""
Which web origins may open a WebSocket session: the defence against
cross-site WebSocket hijacking.

Browsers attach cookies (and HTTP auth) to a WebSocket handshake started by
any page on any site, and WebSockets are not covered by CORS: without an
origin check, a page on ``evil.example`` could open a session with the
victim's cookie and read their inbox. Browsers always send ``Origin`` on a
WebSocket handshake and scripts cannot forge it, so an allow-list of origins
closes that hole. Non-browser clients usually send no ``Origin``; they are
allowed unless ``NOTIFYD_REQUIRE_ORIGIN`` is set.

Everything here is pure: no I/O, no logging.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["OriginPolicy", "normalise_origin", "origin_warning"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_origin(origin: str) -> str:
    """
    An origin as browsers send it: lower case, no trailing slash, no default
    port (``https://App.example.com:443/`` -> ``https://app.example.com``).
    """
    text = origin.strip().rstrip("/").lower()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return text
    if not parts.scheme or not parts.hostname:
        return text
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """
    The handshake's origin decision.

    ``allowed`` holds normalised origins; empty (or containing ``*``) allows
    every origin. ``require`` refuses handshakes that carry no ``Origin``.
    """

    allowed: frozenset[str]
    require: bool = False

    @classmethod
    def from_list(cls, origins: Iterable[str], *, require: bool = False) -> OriginPolicy:
        """
        Build a policy from ``NOTIFYD_ALLOWED_ORIGINS`` entries.
        """
        allowed = frozenset(normalise_origin(item) for item in origins if item.strip())
        return cls(frozenset() if "*" in allowed else allowed, require)

    @property
    def restricts(self) -> bool:
        """
        Whether any origin can be refused at all.
        """
        return bool(self.allowed)

    def refusal(self, origins: list[str]) -> str | None:
        """
        Why a handshake with these ``Origin`` header values is refused, or
        None when it is allowed.

        ``origins`` holds every ``Origin`` header of the request: more than
        one is ambiguous and refused whenever origins are checked. The
        reason is a short fixed text for the log, never the header's value.
        Never raises.
        """
        if not origins:
            return "no origin" if self.require else None
        if len(origins) > 1:
            return "several origins" if self.restricts or self.require else None
        if not self.allowed:
            return None
        # "null" (sandboxed frames, file: pages) is never in a sane list,
        # and normalising keeps it "null".
        if normalise_origin(origins[0]) in self.allowed:
            return None
        return "origin not allowed"


def origin_warning(*, allowed_origins: Iterable[str], is_loopback: bool) -> str | None:
    """
    The warning ``serve`` logs at start when browsers on any site could
    open sessions on a reachable port (``is_loopback``: only this machine
    reaches it, :attr:`~notifyd.settings.Settings.local_only`); None when
    there is nothing to say.
    """
    if is_loopback or OriginPolicy.from_list(allowed_origins).restricts:
        return None
    return (
        "NOTIFYD_ALLOWED_ORIGINS is empty and other machines can reach the port (NOTIFYD_HOST "
        "is not loopback, or NOTIFYD_TRUSTED_PROXIES names a proxy in front): pages on any "
        "site can open WebSocket sessions with your users' cookies; list your app's origins"
    )
