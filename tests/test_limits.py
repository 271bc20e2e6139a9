"""
The pure decisions behind the hostile-client defences: token buckets,
per-address counters, the origin policy and the subprotocol token.
"""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers

from notifyd.credentials import bearer_subprotocol, offered_subprotocols, token_from_handshake
from notifyd.limits import (
    BURST_SECONDS,
    AddressCounter,
    AddressRateLimiter,
    TokenBucket,
    address_key,
)
from notifyd.origin import OriginPolicy, origin_warning
from notifyd.settings import Settings


def test_bucket_allows_a_burst_of_four_seconds_worth_then_refuses():
    """10/s: 40 at once pass, the 41st is refused."""
    bucket = TokenBucket.per_second(10, now=0.0)
    assert all(bucket.take(0.0) for _ in range(int(10 * BURST_SECONDS)))
    assert not bucket.take(0.0)


def test_bucket_refills_at_its_rate():
    """After emptying, 0.5 s at 10/s earns exactly 5 more events."""
    bucket = TokenBucket.per_second(10, now=0.0)
    while bucket.take(0.0):
        pass
    assert sum(bucket.take(0.5) for _ in range(10)) == 5


def test_bucket_with_rate_zero_allows_everything():
    """0 means the limit is off."""
    bucket = TokenBucket.per_second(0, now=0.0)
    assert all(bucket.take(0.0) for _ in range(100_000))


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("?", "?"),
    ],
)
def test_addresses_are_limited_per_ipv4_address_and_per_ipv6_64(address, key):
    """A host rotating through its IPv6 /64 stays one key."""
    assert address_key(address) == key


def test_rate_limiter_keeps_addresses_apart():
    """One address spending its bucket does not cost another anything."""
    limiter = AddressRateLimiter(1)
    assert sum(limiter.allow("10.0.0.1", 0.0) for _ in range(10)) == BURST_SECONDS
    assert limiter.allow("10.0.0.2", 0.0)


def test_rate_limiter_forgets_refilled_addresses_so_memory_stays_bounded():
    """Past prune_above, addresses whose buckets refilled are dropped."""
    limiter = AddressRateLimiter(100, prune_above=1000)
    for i in range(1000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    limiter.allow("192.0.2.1", 60.0)
    assert len(limiter) == 1


def test_rate_limiter_off_keeps_no_state():
    """Rate 0: nothing is stored per address."""
    limiter = AddressRateLimiter(0)
    for i in range(100):
        assert limiter.allow(f"10.0.0.{i}", 0.0)
    assert len(limiter) == 0


def test_address_counter_refuses_past_the_limit_and_frees_on_release():
    """Two per address: a third waits until one is released."""
    counter = AddressCounter(2)
    assert counter.acquire("a") and counter.acquire("a")
    assert not counter.acquire("a")
    assert counter.acquire("b")
    counter.release("a")
    assert counter.acquire("a")
    for _ in range(5):
        counter.release("b")
    assert counter.count("b") == 0 and len(counter) == 1


def test_address_counter_off_counts_nothing():
    """Limit 0: every connection is accepted and nothing is kept."""
    counter = AddressCounter(0)
    assert all(counter.acquire("a") for _ in range(50_000))
    assert len(counter) == 0


@pytest.mark.parametrize(
    ("origins", "allowed"),
    [
        (["https://app.example.com"], True),
        (["https://APP.example.com:443/"], True),
        (["http://app.example.com"], False),
        (["https://app.example.com.evil.example"], False),
        (["https://evil.example"], False),
        (["null"], False),
        (["https://app.example.com", "https://app.example.com"], False),
        ([], True),
    ],
)
def test_origin_allow_list(origins, allowed):
    """Only the listed origin (normalised) passes; several Origin headers are ambiguous."""
    policy = OriginPolicy.from_list(["https://app.example.com"])
    assert (policy.refusal(origins) is None) is allowed


def test_empty_or_star_allow_list_allows_every_origin():
    """No list (or *) means no origin check."""
    for listed in ([], ["*"], ["https://a.example", "*"]):
        assert OriginPolicy.from_list(listed).refusal(["https://evil.example"]) is None


def test_require_origin_refuses_handshakes_without_one():
    """With require, a missing Origin is refused even when every origin is allowed."""
    assert OriginPolicy.from_list([], require=True).refusal([]) == "no origin"
    assert OriginPolicy.from_list([], require=False).refusal([]) is None


def test_origin_refusal_reason_never_quotes_the_header():
    """The reason is a fixed text for the log."""
    reason = OriginPolicy.from_list(["https://a.example"]).refusal(
        ["https://evil.example/<script>"]
    )
    assert reason == "origin not allowed"


@pytest.mark.parametrize(
    ("host", "origins", "warns"),
    [
        ("0.0.0.0", [], True),
        ("10.1.2.3", ["*"], True),
        ("0.0.0.0", ["https://app.example.com"], False),
        ("127.0.0.1", [], False),
        ("localhost", [], False),
        ("::1", [], False),
    ],
)
def test_serve_warning_when_reachable_without_an_allow_list(host, origins, warns):
    """Warn on a non-loopback bind without a real allow-list, not otherwise."""
    settings = Settings(host=host, allowed_origins=origins)
    warning = origin_warning(
        allowed_origins=settings.allowed_origins, is_loopback=settings.is_loopback
    )
    assert (warning is not None) is warns


def test_bearer_subprotocol_entry_carries_the_token():
    """notifyd.v1, bearer.<jwt>: the token is everything after the prefix."""
    headers = Headers([("Sec-WebSocket-Protocol", "notifyd.v1, bearer.aaa.bbb.ccc")])
    assert offered_subprotocols(headers) == ["notifyd.v1", "bearer.aaa.bbb.ccc"]
    assert bearer_subprotocol(offered_subprotocols(headers)) == "aaa.bbb.ccc"
    assert token_from_handshake(query={}, headers=headers, cookie_name="c") == "aaa.bbb.ccc"


def test_subprotocol_entries_are_read_across_repeated_headers():
    """Two Sec-WebSocket-Protocol headers count as one list."""
    headers = Headers(
        [("Sec-WebSocket-Protocol", "notifyd.v1"), ("Sec-WebSocket-Protocol", "Bearer.t0k")]
    )
    assert bearer_subprotocol(offered_subprotocols(headers)) == "t0k"


@pytest.mark.parametrize("value", ["notifyd.v1", "bearer.", "", " , ,", "xbearer.abc"])
def test_no_bearer_entry_means_no_subprotocol_token(value):
    """An empty bearer entry or a different name carries no token."""
    headers = Headers([("Sec-WebSocket-Protocol", value)])
    assert bearer_subprotocol(offered_subprotocols(headers)) is None
