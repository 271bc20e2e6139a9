"""
Who the client is behind a reverse proxy (notifyd.peers), without I/O; and
a bad NOTIFYD_TRUSTED_PROXIES stopping the CLI with one line.
"""

from __future__ import annotations

import ipaddress

import pytest

from notifyd.cli import EXIT_USAGE
from notifyd.exceptions import ConfigError
from notifyd.origin import origin_warning
from notifyd.peers import TrustedProxies, parse_address, parse_network
from notifyd.settings import load_settings

from .processes import clean_env, run_cli

PROXIES = TrustedProxies.from_list(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("entry", "network"),
    [
        ("127.0.0.1", "127.0.0.1/32"),
        (" 10.0.0.0/8 ", "10.0.0.0/8"),
        ("::1", "::1/128"),
        ("fd00::/8", "fd00::/8"),
        ("::ffff:10.1.2.3", "10.1.2.3/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
    ],
)
def test_trusted_proxy_entries_are_addresses_or_networks(entry, network):
    """An address is a one-address network; IPv4-mapped entries become IPv4."""
    assert parse_network(entry) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("nginx", "'nginx' is not an IP address or network"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an IP address or network"),
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set (write the network, such as 10.0.0.0/8)"),
        ("*", "'*' is not an IP address or network"),
    ],
)
def test_a_bad_trusted_proxy_entry_is_named_in_one_line(entry, reason):
    """A typo is refused with the entry and what is wrong with it, never guessed at."""
    with pytest.raises(ValueError) as raised:
        TrustedProxies.from_list(["127.0.0.1", entry])
    assert str(raised.value) == reason
    with pytest.raises(ConfigError) as config:
        load_settings(trusted_proxies=f"127.0.0.1,{entry}")
    assert str(config.value).startswith("invalid setting NOTIFYD_TRUSTED_PROXIES: ")
    assert reason in str(config.value) and "\n" not in str(config.value)


async def test_serve_with_a_bad_trusted_proxy_exits_2_with_one_line():
    """`notifyd serve` with NOTIFYD_TRUSTED_PROXIES=10.0.0.300 prints one line and exits 2."""
    env = clean_env(
        NOTIFYD_DSN="postgresql://x@127.0.0.1:1/x", NOTIFYD_TRUSTED_PROXIES="10.0.0.300"
    )
    result = await run_cli("serve", env=env)
    assert result.code == EXIT_USAGE
    assert result.stderr_lines == [
        "notifyd: invalid setting NOTIFYD_TRUSTED_PROXIES: "
        "Value error, '10.0.0.300' is not an IP address or network"
    ]


def test_settings_keep_the_list_and_only_a_loopback_bind_without_proxies_is_local():
    """A proxy in front makes a loopback bind reachable: the origin warning then applies."""
    settings = load_settings(trusted_proxies="127.0.0.1, 10.0.0.0/8")
    assert settings.trusted_proxies == ["127.0.0.1", "10.0.0.0/8"]
    assert settings.is_loopback and not settings.local_only
    assert load_settings().local_only
    warning = origin_warning(allowed_origins=[], is_loopback=settings.local_only)
    assert warning is not None and "NOTIFYD_TRUSTED_PROXIES" in warning


@pytest.mark.parametrize(
    ("hop", "address"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("203.0.113.7:5000", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:5000", "2001:db8::1"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("203.0.113.7:5000:1", None),
    ],
)
def test_forwarded_hops_are_read_as_proxies_write_them(hop, address):
    """Ports and brackets are dropped; names and garbage are not addresses."""
    parsed = parse_address(hop)
    assert (None if parsed is None else str(parsed)) == address


def test_the_header_is_ignored_from_an_untrusted_peer():
    """A client that connects directly cannot choose its address by sending the header."""
    assert PROXIES.forwarded_client("203.0.113.9", ["198.51.100.1"]) is None
    assert PROXIES.forwarded_client("192.168.1.1", ["10.0.0.1"]) is None
    assert PROXIES.forwarded_client("?", ["198.51.100.1"]) is None


def test_no_trusted_proxies_believes_no_one():
    """The default: every peer is its own client, loopback included."""
    assert not TrustedProxies.from_list([])
    assert TrustedProxies.from_list([" ", ""]).forwarded_client("127.0.0.1", ["1.2.3.4"]) is None


def test_the_nearest_untrusted_hop_is_the_client():
    """Read from the right past trusted proxies; what the client wrote further left is ignored."""
    assert PROXIES.forwarded_client("127.0.0.1", ["198.51.100.1"]) == "198.51.100.1"
    # The client sent "6.6.6.6"; nginx appended the address it saw.
    assert PROXIES.forwarded_client("127.0.0.1", ["6.6.6.6, 198.51.100.1"]) == "198.51.100.1"
    # Two trusted proxies in a row (a load balancer, then nginx).
    assert (
        PROXIES.forwarded_client("127.0.0.1", ["6.6.6.6, 198.51.100.1, 10.1.2.3"]) == "198.51.100.1"
    )
    assert PROXIES.forwarded_client("::ffff:127.0.0.1", ["198.51.100.1"]) == "198.51.100.1"


def test_repeated_headers_are_one_list_in_order():
    """Two X-Forwarded-For headers read as their values joined, the last one nearest."""
    assert PROXIES.forwarded_client("127.0.0.1", ["6.6.6.6", "198.51.100.1"]) == "198.51.100.1"
    assert PROXIES.forwarded_client("127.0.0.1", ["198.51.100.1", "10.0.0.2"]) == "198.51.100.1"


def test_a_trusted_peer_without_the_header_is_the_client():
    """A health check from the proxy itself carries no header: the proxy is the client."""
    assert PROXIES.forwarded_client("127.0.0.1", []) is None
    assert PROXIES.forwarded_client("127.0.0.1", [""]) is None


def test_garbage_stops_the_walk_at_the_last_address_read():
    """An unreadable hop cannot be believed, nor anything the client wrote beyond it."""
    assert PROXIES.forwarded_client("127.0.0.1", ["198.51.100.1, unknown, 10.0.0.2"]) == (
        "10.0.0.2"
    )
    assert PROXIES.forwarded_client("127.0.0.1", ["198.51.100.1, nonsense"]) is None


def test_a_chain_of_trusted_proxies_gives_its_leftmost():
    """Traffic from inside the trusted networks is attributed to its first hop."""
    assert PROXIES.forwarded_client("127.0.0.1", ["10.0.0.7, 10.0.0.2"]) == "10.0.0.7"


def test_a_long_forged_chain_is_read_only_near_its_end():
    """A header padded with thousands of trusted-looking hops is not walked to its start."""
    forged = ", ".join(["203.0.113.66"] + ["10.0.0.1"] * 5000)
    assert PROXIES.forwarded_client("127.0.0.1", [forged]) == "10.0.0.1"
    assert PROXIES.forwarded_client("127.0.0.1", [forged + ", 198.51.100.1"]) == "198.51.100.1"


def test_ipv6_clients_and_proxies():
    """IPv6 peers and hops are compared as addresses, not as text."""
    assert PROXIES.forwarded_client("fd00::5", ["2001:db8::1"]) == "2001:db8::1"
    assert PROXIES.forwarded_client("fd00:0:0::5", ["[2001:db8::1]:443"]) == "2001:db8::1"
    assert PROXIES.forwarded_client("2001:db8::9", ["2001:db8::1"]) is None
