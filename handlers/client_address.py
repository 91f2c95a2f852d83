"""The client's address: the peer's, or what a trusted proxy in front of us says it is.

``X-Forwarded-For`` and ``Cf-Connecting-Ip`` are honoured only when the
connection comes from one of ``server.trusted_proxies`` (networks); from
anyone else they are ignored, since any client can send them. Behind a
chain of proxies, the client is the right-most ``X-Forwarded-For`` entry
that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Longer than any address; a longer header value is not one.
_MAX_HEADER = 2048


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(value.strip(), strict=False) for value in values if value.strip())


class TrustedProxies:
    __slots__ = ("_networks",)

    def __init__(self, networks: tuple[Network, ...]) -> None:
        self._networks = networks

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def client_ip(self, peer: str, headers: Mapping[str, str]) -> str:
        if not self._networks or not self._trusted(peer):
            return peer
        cloudflare = headers.get("Cf-Connecting-Ip")
        if cloudflare and len(cloudflare) <= 64 and _valid(cloudflare):
            return cloudflare.strip()
        forwarded = headers.get("X-Forwarded-For")
        if not forwarded or len(forwarded) > _MAX_HEADER:
            return peer
        for hop in reversed(forwarded.split(",")):
            hop = hop.strip()
            if not _valid(hop):
                return peer
            if not self._trusted(hop):
                return hop
        return peer


def _valid(address: str) -> bool:
    try:
        ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return True
