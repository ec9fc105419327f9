"""Where a request may go: the Guard's rules on the target, then on every address its name resolves to (pinned)."""
from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from filters.hosts import Host
from filters.proxy.guard import Guard, Refusal

# Test only: "IP:PORT" of a DNS server (UDP) both proxy paths ask instead of the system resolver (getaddrinfo), so a
# test can make names resolve to loopback with a stub server of its own. Unset in production.
RESOLVER_ENV = "APPLIANCE_PROXY_RESOLVER"
# Test only: "IP:PORT,IP:PORT" of the tests' own origin servers on loopback, which the address rules let through
# (the ports rules still apply). The loopback networks stay refused for every other port. Unset in production.
REACH_ENV = "APPLIANCE_PROXY_TEST_REACH"
RESOLVE_TIMEOUT = 5.0
CACHE_TTL = 2.0  # seconds a checked answer is reused (the mitmproxy path checks in the request hook, pins at connect)
CACHE_MAX = 1024


def _hostport(text: str) -> tuple[str, int] | None:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class Destinations:
    """The Guard plus name resolution: check_target() before DNS, resolve() after it (every address checked; the
    caller connects only to what it returns). One per State, rebuilt on reload; shared by both proxy paths."""

    def __init__(self, guard: Guard, env: dict | None = None):
        env = os.environ if env is None else env
        self.guard = guard
        reach = (_hostport(x) for x in env.get(REACH_ENV, "").split(",") if x.strip())
        self.reach = frozenset(x for x in reach if x is not None)
        self.resolver = _hostport(env.get(RESOLVER_ENV, "")) if env.get(RESOLVER_ENV) else None
        self._cache: dict[tuple[str, int], tuple[float, list[str]]] = {}

    def check_target(self, host: Host, port: int, connect: bool) -> Refusal | None:
        """Guard.check_target, except for a test origin (REACH_ENV): its address or a loopback name on its port."""
        r = self.guard.check_target(host, port, connect)
        if r is not None and self.reach and (host.name if host.ip is not None else "127.0.0.1", port) in self.reach \
                and (host.ip is not None or r.reason == "loopback"):
            return self.guard.check_port(port, connect)
        return r

    def check_address(self, ip: str, port: int) -> Refusal | None:
        if (ip, port) in self.reach:
            return None
        return self.guard.check_address(ip)

    async def resolve(self, host: Host, port: int) -> tuple[list[str], Refusal | None]:
        """(addresses to connect to, None) or ([], the Refusal of the first refused address). A name with any refused
        address is refused whole (a name that mixes a public address and 127.0.0.1 is an attack, not a mirror).
        Raises OSError when the name does not resolve."""
        if host.ip is not None:
            addrs = [host.name]
        else:
            key = (host.name, port)
            hit = self._cache.get(key)
            now = time.monotonic()
            if hit is not None and hit[0] > now:
                addrs = hit[1]
            else:
                addrs = await self._lookup(host.name, port)
                if len(self._cache) >= CACHE_MAX:
                    self._cache.clear()
                self._cache[key] = (now + CACHE_TTL, addrs)
        for a in addrs:
            r = self.check_address(a, port)
            if r is not None:
                if host.ip is None:
                    r = type(r)(r.reason, f"{host.name} resolves to {r.detail}", r.status)
                return [], r
        return addrs, None

    async def _lookup(self, name: str, port: int) -> list[str]:
        if self.resolver is not None:
            addrs = await query(self.resolver, name)
        else:
            loop = asyncio.get_running_loop()
            infos = await asyncio.wait_for(loop.getaddrinfo(name, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
            addrs = [info[4][0] for info in infos]
        addrs = list(dict.fromkeys(a.partition("%")[0] if ":" in a else a for a in addrs))
        if not addrs:
            raise OSError(f"no address for {name}")
        return addrs


# ---------------------------------------------------------------- a minimal DNS client (test resolver only)

class _Answer(asyncio.DatagramProtocol):
    def __init__(self, qid: int):
        self.qid, self.fut = qid, asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) >= 2 and struct.unpack("!H", data[:2])[0] == self.qid and not self.fut.done():
            self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


async def query(server: tuple[str, int], name: str) -> list[str]:
    """A and AAAA records of `name` from one DNS server over UDP (recursion desired, no retries)."""
    out: list[str] = []
    for qtype in (1, 28):
        out += await _query(server, name, qtype)
    return out


async def _query(server: tuple[str, int], name: str, qtype: int) -> list[str]:
    loop = asyncio.get_running_loop()
    qid = random.getrandbits(16)
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)
    transport, proto = await loop.create_datagram_endpoint(lambda: _Answer(qid), remote_addr=server)
    try:
        transport.sendto(packet)
        data = await asyncio.wait_for(proto.fut, RESOLVE_TIMEOUT)
    finally:
        transport.close()
    return parse_answers(data, qtype)


def _skip_name(data: bytes, i: int) -> int:
    while True:
        n = data[i]
        if n & 0xC0 == 0xC0:
            return i + 2
        if n == 0:
            return i + 1
        i += n + 1


def parse_answers(data: bytes, qtype: int) -> list[str]:
    """The addresses of type `qtype` in a DNS response; [] for NXDOMAIN, a cut or a malformed packet."""
    try:
        _, flags, qd, an = struct.unpack("!HHHH", data[:8])
        if flags & 0x000F:
            return []
        i = 12
        for _ in range(qd):
            i = _skip_name(data, i) + 4
        out = []
        for _ in range(an):
            i = _skip_name(data, i)
            rtype, _, _, rdlen = struct.unpack("!HHIH", data[i:i + 10])
            rdata = data[i + 10:i + 10 + rdlen]
            i += 10 + rdlen
            if rtype == qtype == 1 and rdlen == 4:
                out.append(str(IPv4Address(rdata)))
            elif rtype == qtype == 28 and rdlen == 16:
                out.append(str(ip_address(IPv6Address(rdata))))
        return out
    except (struct.error, IndexError, ValueError):
        return []
