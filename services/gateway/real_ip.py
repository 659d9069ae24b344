"""The client's address, from the TCP peer and, only behind proxies we trust, their headers.

A client can put anything in ``X-Forwarded-For``; only the entries appended by our own proxies
are facts. So: the peer is the client unless the peer is a trusted proxy; then walk
``X-Forwarded-For`` from the right (each proxy appends the address it saw) past every trusted
hop, and the first address that is not ours is the client. Pure: no I/O, no aiohttp.

This runs on every request, so addresses are parsed with `socket.inet_pton` (C) and matched
as integers against precomputed masks; `ipaddress` only reads the configuration.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

DEFAULT_TRUSTED_PROXIES: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
"""Loopback only: a reverse proxy on the same host. Behind a load balancer, add its CIDRs
(never ``0.0.0.0/0``: anyone could then choose their own address)."""

UNKNOWN = "unknown"

_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"

Address = tuple[int, int, str]
"""(4 or 6, the address as an integer, its canonical text)."""


def parse_address(value: str) -> Address | None:
    """An address as proxies write it (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``),
    IPv4-mapped IPv6 folded to IPv4; None when it is not an address."""
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        try:
            packed = socket.inet_pton(socket.AF_INET6, text)
        except OSError:
            return None
        if not packed.startswith(_V4_MAPPED):
            return 6, int.from_bytes(packed, "big"), socket.inet_ntop(socket.AF_INET6, packed)
        packed = packed[12:]
    return 4, int.from_bytes(packed, "big"), socket.inet_ntop(socket.AF_INET, packed)


def parse_ip(value: str) -> str | None:
    """The canonical text of an address (see `parse_address`), or None."""
    found = parse_address(value)
    return found[2] if found is not None else None


class TrustedProxies:
    """A fixed set of networks whose forwarding headers we believe."""

    __slots__ = ("_v4", "_v6")

    def __init__(self, cidrs: Iterable[str]) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr.strip(), strict=False)
            pair = (int(net.network_address), int(net.netmask))
            (v4 if net.version == 4 else v6).append(pair)
        self._v4 = tuple(v4)
        self._v6 = tuple(v6)

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)

    def trusts(self, address: Address) -> bool:
        version, value, _ = address
        for network, mask in self._v4 if version == 4 else self._v6:
            if value & mask == network:
                return True
        return False

    def __contains__(self, text: object) -> bool:
        if not isinstance(text, str):
            return False
        address = parse_address(text)
        return address is not None and self.trusts(address)


def _plain(peer: str) -> str:
    # Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; logs and limits want a.b.c.d.
    if peer.startswith("::ffff:"):
        return parse_ip(peer) or peer
    return peer


def client_ip(peer: str | None, forwarded_for: str | None, real_ip: str | None,
              trusted: TrustedProxies) -> str:
    """The client's address.

    `forwarded_for` is every ``X-Forwarded-For`` header joined with commas, in order;
    `real_ip` the ``X-Real-IP`` header, used only when there is no ``X-Forwarded-For``.
    """
    if not peer:
        return UNKNOWN
    if not (forwarded_for or real_ip) or not trusted:
        return _plain(peer)  # the common case: no parsing at all
    peer_address = parse_address(peer)
    if peer_address is None:
        return peer
    if not trusted.trusts(peer_address):
        return peer_address[2]
    if forwarded_for:
        last = peer_address
        for part in reversed(forwarded_for.split(",")):
            address = parse_address(part)
            if address is None:
                # Garbage can only come from left of the last trusted hop: it vouched for
                # nothing further, so that hop is the best address we know.
                return last[2]
            if not trusted.trusts(address):
                return address[2]
            last = address
        return last[2]  # every hop is ours: the left-most is where the request started
    address = parse_address(real_ip or "")
    return address[2] if address is not None else peer_address[2]
