"""Network address entries as the settings write them (``sources.private_allowlist``): an IP address or a CIDR
network, optionally with a port. Parsed here, below the settings model, so settings can refuse a bad entry when
they load; the policy that uses them is :mod:`embedding_pipeline.sources.addresses`."""

from __future__ import annotations

import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_BRACKETED = re.compile(r"^\[(?P<host>[^\]]+)\](?::(?P<port>\d+))?$")


def parse_entry(entry: str) -> tuple[IPNetwork, int | None]:
    """One allow-list entry as (network, port or None); raises ValueError saying what is wrong with it."""
    text = entry.strip()
    port_text: str | None = None
    match = _BRACKETED.match(text)
    if match:
        host, port_text = match["host"], match["port"]
    elif text.count(":") == 1:  # IPv4 (or IPv4 network) with a port; bare IPv6 has several colons
        host, port_text = text.split(":")
    else:
        host = text
    try:
        network = ipaddress.ip_network(host, strict=True)
    except ValueError as exc:
        raise ValueError(f"bad allow-list entry {entry!r}: {exc}") from None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad allow-list entry {entry!r}: port must be 1-65535")
        port = int(port_text)
    return network, port
