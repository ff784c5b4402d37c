"""Which network addresses URL downloads may connect to.

Only globally routable addresses are allowed by default: a URL in a manifest must not be able to reach the
pipeline's own machine, its private network or a cloud metadata service (``169.254.169.254``). Exceptions are
listed in ``sources.private_allowlist``; each entry is an IP address or a CIDR network, optionally with a port::

    127.0.0.1           10.0.0.0/8          ::1
    127.0.0.1:8080      10.0.0.0/8:443      [::1]:8080      [fd00::/8]:443

``sources.allow_private_urls: true`` switches the policy off entirely (a trusted, intranet-only deployment).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from embedding_pipeline.runtime.addresses import IPAddress, IPNetwork, parse_entry


class AddressRefused(Exception):
    """The host resolves only to addresses the policy refuses."""

    def __init__(self, host: str, addresses: list[str]):
        self.host, self.addresses = host, addresses
        super().__init__(f"refused: {host} resolves to a non-public address ({', '.join(addresses)})")


def unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, 6to4), so the IPv4 rules apply to it."""
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped or ip.sixtofour or ip
    return ip


def is_public(ip: IPAddress) -> bool:
    ip = unwrap(ip)
    # is_global alone lets multicast through (224.0.0.0/4 counts as global), so list the other classes too.
    # fec0::/10 (IPv6 site-local, deprecated but still routed inside some sites) counts as global to Python.
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or site_local
    )


@dataclass(frozen=True)
class AddressPolicy:
    allow_all: bool = False
    allowlist: tuple[tuple[IPNetwork, int | None], ...] = ()

    @classmethod
    def from_settings(cls, allow_all: bool, entries: list[str]) -> "AddressPolicy":
        return cls(allow_all, tuple(parse_entry(e) for e in entries))

    def allows(self, ip: IPAddress, port: int) -> bool:
        if self.allow_all or is_public(ip):
            return True
        candidates = {ip, unwrap(ip)}
        return any(
            candidate.version == network.version and candidate in network and entry_port in (None, port)
            for network, entry_port in self.allowlist
            for candidate in candidates
        )

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` that may be connected to, in resolver order.

        Raises :class:`AddressRefused` when there are none, and ``socket.gaierror`` when ``host`` does not resolve.
        Addresses the policy refuses are dropped rather than failing the host: only allowed ones are ever used.
        """
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        allowed: list[str] = []
        refused: list[str] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            text = str(sockaddr[0])
            ip = ipaddress.ip_address(text.split("%")[0])  # drop an IPv6 zone id before parsing
            target = allowed if self.allows(ip, port) else refused
            if text not in target:
                target.append(text)
        if not allowed:
            raise AddressRefused(host, refused or ["no address"])
        return allowed
