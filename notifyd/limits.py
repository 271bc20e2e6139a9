"""
Rate limits and per-address counters for hostile clients, without I/O.

Every method takes ``now`` (monotonic seconds) from the caller, so the
decisions are plain arithmetic that tests can drive without a clock. A
limit of 0 means off: the objects then say yes without keeping any state,
which is the default for per-address limits (behind a load balancer or NAT,
thousands of users share one address).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = [
    "BURST_SECONDS",
    "LIMIT_NAMES",
    "AddressCounter",
    "AddressRateLimiter",
    "TokenBucket",
    "address_key",
]

# The ``limit`` label values of ``notifyd_limit_trips``, one per setting.
LIMIT_NAMES = (
    "sessions_per_user",  # NOTIFYD_MAX_SESSIONS_PER_USER
    "connections_per_address",  # NOTIFYD_MAX_CONNECTIONS_PER_ADDRESS
    "handshake_rate",  # NOTIFYD_HANDSHAKES_PER_S_PER_ADDRESS
    "pending_handshakes",  # NOTIFYD_MAX_PENDING_HANDSHAKES
    "frame_rate",  # NOTIFYD_CLIENT_FRAMES_PER_S
    "frame_size",  # NOTIFYD_MAX_FRAME_BYTES
    "read_ids",  # NOTIFYD_MAX_READ_IDS
    "history_concurrency",  # NOTIFYD_MAX_CONCURRENT_HISTORY
)

# A bucket holds this many seconds' worth of its rate: room for a page
# reload that opens several tabs, or a client catching up after a stall.
BURST_SECONDS = 4.0


def address_key(address: str) -> str:
    """
    The key a client address is limited under: an IPv4 address as is, an
    IPv6 address by its /64, since one host usually holds a whole /64 and
    could otherwise rotate through it. IPv4-mapped IPv6 counts as IPv4.
    Anything unparsable is its own key. Never raises.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(slots=True)
class TokenBucket:
    """
    ``rate`` events per second on average, ``capacity`` at once; rate 0
    allows everything.
    """

    rate: float
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def per_second(cls, rate: float, now: float) -> TokenBucket:
        """
        A full bucket for ``rate`` events per second with bursts of
        :data:`BURST_SECONDS` worth (at least one event).
        """
        capacity = max(1.0, rate * BURST_SECONDS)
        return cls(rate, capacity, capacity, now)

    def take(self, now: float) -> bool:
        """
        Spend one token if there is one; whether the event is allowed.
        """
        if self.rate <= 0:
            return True
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def refill(self, now: float) -> None:
        """
        Add what the time since the last update earned, up to capacity.
        """
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.updated = now

    def full_at(self, now: float) -> bool:
        """
        Whether the bucket is full by ``now`` (so forgetting it loses nothing).
        """
        self.refill(now)
        return self.tokens >= self.capacity


class AddressRateLimiter:
    """
    A :class:`TokenBucket` per client address, forgotten once full again,
    so memory is bounded by the addresses active in the last few seconds.
    """

    def __init__(self, rate: float, *, prune_above: int = 10_000) -> None:
        self.rate = rate
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_above = prune_above

    def allow(self, address: str, now: float) -> bool:
        """
        Whether one more event from ``address`` is within the rate.
        """
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self._prune_above:
                self.prune(now)
            bucket = self._buckets[address] = TokenBucket.per_second(self.rate, now)
        return bucket.take(now)

    def prune(self, now: float) -> None:
        """
        Forget the addresses whose buckets have refilled.
        """
        for address in [a for a, bucket in self._buckets.items() if bucket.full_at(now)]:
            del self._buckets[address]

    def __len__(self) -> int:
        return len(self._buckets)


class AddressCounter:
    """
    Open connections per client address, at most ``limit`` each (0: no
    limit, nothing counted).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        """
        Count one more connection from ``address`` if it is within the limit.
        """
        if self.limit <= 0:
            return True
        count = self._open.get(address, 0)
        if count >= self.limit:
            return False
        self._open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        """
        One connection from ``address`` is gone; idempotent at zero.
        """
        count = self._open.get(address, 0)
        if count <= 1:
            self._open.pop(address, None)
        else:
            self._open[address] = count - 1

    def count(self, address: str) -> int:
        """
        Open connections counted for ``address``.
        """
        return self._open.get(address, 0)

    def __len__(self) -> int:
        return len(self._open)
