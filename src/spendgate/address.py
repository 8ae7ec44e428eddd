"""Listen addresses as URLs: the one rule for "which URL reaches the proxy from here"."""

from __future__ import annotations

import ipaddress

_WILDCARD_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
"""A server bound to every address is reached on the loopback of the same family: asyncio
binds ``::`` IPv6-only, so 127.0.0.1 would not answer there."""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the proxy on this machine (``localhost``, 127/8, ::1)."""
    if host == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def http_url(host: str, port: int) -> str:
    """``http://host:port``, with an IPv6 literal in brackets (``http://[::1]:8787``)."""
    ip = _ip(host)
    if ip is not None and ip.version == 6:
        host = "[" + host.strip("[]").replace("%", "%25") + "]"  # a zone id's % is escaped
    return f"http://{host}:{port}"


def local_url(host: str, port: int) -> str:
    """The URL a client on this machine uses for a server listening on ``host``."""
    return http_url(_WILDCARD_LOOPBACK.get(host, host), port)
