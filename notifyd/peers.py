"""
Who the client is when notifyd runs behind a reverse proxy.

Behind nginx every TCP connection comes from the proxy, so the per-address
limits would count every user as one, and the logs would name the proxy.
The proxy passes the client's address on in ``X-Forwarded-For``, appending
the address it saw to whatever the client sent; anyone can send that header,
so it is believed only from the proxies listed in
``NOTIFYD_TRUSTED_PROXIES``, and only as far back as the chain stays within
them. From any other peer the header is ignored.

Everything here is pure: no I/O, no logging.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FORWARDED_FOR", "TrustedProxies", "parse_address", "parse_network"]

FORWARDED_FOR = "X-Forwarded-For"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# More hops than any real chain of proxies; a longer header is read only
# this far from the right, so its length costs nothing.
_MAX_HOPS = 32


def parse_network(entry: str) -> IPNetwork:
    """
    One ``NOTIFYD_TRUSTED_PROXIES`` entry: an address (``10.0.0.5``,
    ``::1``) or a network (``10.0.0.0/8``, ``fd00::/8``).

    Raises :class:`ValueError` with a one-line reason naming the entry.
    """
    text = entry.strip()
    try:
        # strict: 10.0.0.1/8 is almost always a typo for 10.0.0.0/8 or 10.0.0.1.
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        if "/" in text:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                pass
            else:
                raise ValueError(
                    f"{text!r} has host bits set (write the network, such as "
                    f"{ipaddress.ip_network(text, strict=False)})"
                ) from None
        raise ValueError(f"{text!r} is not an IP address or network") from None
    return _unmapped_network(network)


def parse_address(text: str) -> IPAddress | None:
    """
    The address in one ``X-Forwarded-For`` hop, or None when it is not one.

    Accepts what proxies write: ``203.0.113.7``, ``2001:db8::1``,
    ``[2001:db8::1]``, and with a port ``203.0.113.7:5000`` or
    ``[2001:db8::1]:5000``. ``unknown`` and obfuscated names are None.
    An IPv4-mapped IPv6 address is its IPv4 address.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _unmapped(address)


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """
    The proxies whose ``X-Forwarded-For`` is believed; empty trusts none.
    """

    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_list(cls, entries: Iterable[str]) -> TrustedProxies:
        """
        From ``NOTIFYD_TRUSTED_PROXIES`` entries; raises :class:`ValueError`
        naming the first bad one.
        """
        return cls(tuple(parse_network(entry) for entry in entries if entry.strip()))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: IPAddress) -> bool:
        """
        Whether ``address`` is one of the trusted proxies.
        """
        return any(address in network for network in self.networks)

    def forwarded_client(self, peer: str, forwarded_for: Iterable[str]) -> str | None:
        """
        The client's address that a trusted proxy forwarded, for a
        connection from ``peer`` (the TCP peer's address) carrying these
        ``X-Forwarded-For`` header values in the order received; None when
        nothing is believed and the peer is the client.

        None unless ``peer`` is a trusted proxy. Then the hops are read from
        the right (the nearest proxy's entry last), skipping trusted proxies:
        the first hop that is not one is the client; everything to its left
        was written by the client and is ignored. A hop that is not an
        address ends the walk at the last address read, since nothing beyond
        it can be trusted; a chain of trusted proxies only gives its
        leftmost. Never raises.
        """
        current = parse_address(peer)
        if current is None or not self.trusts(current):
            return None
        forwarded: IPAddress | None = None
        # Only the last _MAX_HOPS hops are split out, however long the header.
        hops: list[str] = []
        for value in reversed(list(forwarded_for)):
            hops = value.rsplit(",", _MAX_HOPS) + hops
            if len(hops) > _MAX_HOPS:
                break
        for hop in reversed(hops[-_MAX_HOPS:]):
            address = parse_address(hop)
            if address is None:
                break
            forwarded = address
            if not self.trusts(address):
                break
        return None if forwarded is None else str(forwarded)


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _unmapped_network(network: IPNetwork) -> IPNetwork:
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; addresses are
    # unmapped before they are compared, so mapped networks are unmapped too.
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network
