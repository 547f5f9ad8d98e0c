"""Which address a request comes from, behind reverse proxies (`-trusted-proxies`).

A request's client is its TCP peer, unless that peer is one of the trusted proxies:
then `X-Forwarded-For` is read from the right (each proxy appends the address it got
the request from) and the first address that is not a trusted proxy is the client.
Everything to the left of it was written by that untrusted client and proves nothing.
A peer that is not trusted is the client whatever the header says; loopback is no
exception unless it is listed. A malformed entry ends the walk: the nearest address
known to be genuine (the last trusted one) is taken, never the text.

Pure: no sockets, no HTTP. werkzeug's `ProxyFix` trusts a number of hops from any peer,
which is not what `-trusted-proxies` promises, hence this module.
"""
from __future__ import annotations

import ipaddress
from typing import Union

from wsgateway.config import Network

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

MAX_HOPS = 32  # X-Forwarded-For entries read from the right at most (each is one proxy more)


class TrustedProxies:
    """The client address of a request, given the proxies whose X-Forwarded-For we believe."""

    def __init__(self, networks: tuple[Network, ...] = ()) -> None:
        self._networks = networks

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The client's address for a request from `peer` carrying `forwarded_for`
        (the X-Forwarded-For value, repeated headers joined by commas; None if absent).
        An address from the header comes back in its canonical form."""
        if not self._networks or forwarded_for is None:
            return peer
        nearest = _address(peer)
        if nearest is None or not self._trusts(nearest):
            return peer
        for hop in forwarded_for.rsplit(",", MAX_HOPS)[::-1][:MAX_HOPS]:
            address = _address(hop.strip())
            if address is None:
                break
            nearest = address
            if not self._trusts(address):
                break
        return str(nearest)

    def _trusts(self, address: Address) -> bool:
        return any(address in network for network in self._networks)


def _address(text: str) -> Address | None:
    """An IP address (an IPv4-mapped IPv6 one as IPv4), or None when `text` is none."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
