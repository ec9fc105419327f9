"""proxy.pac / wpad.dat: point browsers at the VIPs, in an order chosen per client; local names stay direct."""
from __future__ import annotations

import hashlib
import ipaddress
from typing import Sequence

CONTENT_TYPE = "application/x-ns-proxy-autoconfig"
# Part of the documented assignment (docs/ha.md): changing it moves clients between nodes, so it is versioned.
HASH_KEY = b"carpguard-pac-v1"
CACHE_MAX = 1024  # rendered PACs kept (one per order: n! for n VIPs, 2 for the usual pair)


def render(vips: str | Sequence[str], port: int, direct_nets: list[str] | None = None) -> bytes:
    """The PAC text: local names (and direct_nets) DIRECT, everything else to the VIPs in the order given, the first
    as primary and each next one a fallback. No DIRECT at the end: a filter must not be bypassed when it is down."""
    vips = [vips] if isinstance(vips, str) else list(vips)
    nets = "".join(
        f'    if (isInNet(host, "{n.split("/")[0]}", "{_mask(n)}")) return "DIRECT";\n' for n in (direct_nets or [])
    )
    proxies = "; ".join(f"PROXY {v}:{port}" for v in vips)
    return (
        "function FindProxyForURL(url, host) {\n"
        '    if (isPlainHostName(host) || host == "localhost" || shExpMatch(host, "127.*")) return "DIRECT";\n'
        f"{nets}"
        f'    return "{proxies}";\n'
        "}\n"
    ).encode()


def _mask(net: str) -> str:
    bits = int(net.split("/")[1]) if "/" in net else 32
    m = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    return ".".join(str((m >> s) & 255) for s in (24, 16, 8, 0))


def client_key(client: str) -> str | None:
    """The client's address as hashed: canonical text, an IPv4-mapped IPv6 address as its IPv4 (a dual-stack
    listener reports ::ffff:a.b.c.d); None for anything that is not an address."""
    try:
        ip = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def score(client: str, vip: str) -> int:
    """BLAKE2b (8-byte digest, key HASH_KEY) of "<client> <vip>" as a big-endian integer: the same on every node,
    Python version and restart (unlike hash(), which is salted per process)."""
    h = hashlib.blake2b(f"{client} {vip}".encode(), digest_size=8, key=HASH_KEY)
    return int.from_bytes(h.digest(), "big")


def order(client: str, vips: Sequence[str]) -> tuple[str, ...]:
    """The VIPs for this client, highest score first (rendezvous hashing): primaries spread evenly, and when one
    VIP fails its clients' next choices spread evenly over the rest. An unreadable client gets the VIPs as given."""
    key = client_key(client)
    if key is None or len(vips) < 2:
        return tuple(vips)
    return tuple(sorted(vips, key=lambda v: (-score(key, v), v)))


class Pacs:
    """The PACs of one config: every VIP (cluster.vip first), the port and the direct nets; one rendering per order."""

    def __init__(self, vips: Sequence[str], port: int, direct_nets: list[str] | None = None):
        self.vips = tuple(vips)
        self.port = port
        self.direct_nets = list(direct_nets or [])
        self._cache: dict[tuple[str, ...], bytes] = {}

    def for_client(self, client: str) -> bytes:
        """The PAC this client gets (the same bytes from every node)."""
        key = order(client, self.vips)
        body = self._cache.get(key)
        if body is None:
            body = render(key, self.port, self.direct_nets)
            if len(self._cache) < CACHE_MAX:
                self._cache[key] = body
        return body
