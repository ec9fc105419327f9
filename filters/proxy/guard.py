"""The proxy's refusal rules (never-proxied destinations, ports, Host mismatch) as pure checks returning a Refusal."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, ClassVar, Iterable, Union

from filters.engine import Decision
from filters.hosts import BadHost, Host, canonical_host, host_port, shown
from filters.proxy.ifaddrs import local_addresses

CATEGORY = "appliance"  # the block page's category for every refusal (no list can allow it)
# Every reason code, in the order the rules are tried; the metric label appliance_proxy_refused_total{reason}.
REASONS = ("bad-host", "loopback", "unspecified", "link-local", "multicast", "broadcast", "cluster-address",
           "denied-destination", "connect-port", "port", "host-mismatch")
# The HTTP status per reason: 400 for input the proxy cannot read; 409 for a Host header that contradicts the
# request target, as Squid's host_verify_strict answers; 403 for everything refused by policy.
STATUS = {**{r: 403 for r in REASONS}, "bad-host": 400, "host-mismatch": 409}
DEFAULT_CONNECT_PORTS: tuple = (443,)
DEFAULT_SAFE_PORTS: tuple = (80, 21, 443, 70, 210, "1025-65535", 280, 488, 591, 777)  # Squid's Safe_ports
# Names a resolver answers from /etc/hosts or by rule (RFC 6761) with a loopback address: refused before DNS.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "localhost4", "localhost4.localdomain4",
                            "localhost6", "localhost6.localdomain6", "ip6-localhost", "ip6-loopback"})
BUILTIN = (  # (network, reason, what it is): refused whatever the config says
    ("127.0.0.0/8", "loopback", "loopback"),
    ("::1/128", "loopback", "loopback"),
    ("0.0.0.0/8", "unspecified", "unspecified ('this host')"),
    ("::/128", "unspecified", "unspecified"),
    ("169.254.0.0/16", "link-local", "link-local (incl. the cloud metadata address)"),
    ("fe80::/10", "link-local", "link-local"),
    ("224.0.0.0/4", "multicast", "multicast"),
    ("ff00::/8", "multicast", "multicast"),
    ("255.255.255.255/32", "broadcast", "the broadcast address"),
)
# IPv6 prefixes whose last 32 bits are an IPv4 address that the kernel (mapped, compatible) or a NAT64 gateway
# may reach: such an address is also checked as that IPv4 address.
# (n >> 32) of ::ffff:0:0/96 (mapped), ::/96 (compatible), 64:ff9b::/96 (NAT64), ::ffff:0:0:0/96 (SIIT, RFC 6052/7915)
_EMBEDS_V4 = (0xFFFF, 0, 0x0064FF9B << 64, 0xFFFF0000)
Net = Union[str, int, IPv4Address, IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network]
PortSpec = Union[int, str, tuple]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the proxy refuses a request. `reason` is one of REASONS (the metric label); `detail` one printable
    ASCII line naming the target (safe in a log line, still HTML-escape it on a page); `status` the HTTP answer."""

    reason: str
    detail: str
    status: int = 403
    category: ClassVar[str] = CATEGORY
    log_code: ClassVar[str] = "TCP_DENIED"  # Squid's result code for a refused request

    @property
    def log_status(self) -> str:
        """The access log's `code/status` field, as Squid writes it: TCP_DENIED/403."""
        return f"{self.log_code}/{self.status}"

    @property
    def text(self) -> str:
        """The reason as one sentence for the block page and the log."""
        return f"refused by the appliance ({self.reason}): {self.detail}"

    def as_decision(self) -> Decision:
        """An engine Decision for blockpage.render(): category `appliance`; its source (the page's Rule row) is `text`."""
        return Decision("block", CATEGORY, self.text, None, rule=self.detail)


def refusal(reason: str, detail: str) -> Refusal:
    """A Refusal with the reason's status (STATUS); detail is made one safe line whatever it holds."""
    if reason not in STATUS:
        raise ValueError(f"unknown refusal reason {reason!r}")
    safe = detail if detail.isascii() and detail.isprintable() else shown(detail, 200)[1:-1]
    return Refusal(reason, safe, STATUS[reason])


def bad_host(e: BadHost) -> Refusal:
    """The Refusal for a host canonical_host()/host_port() could not read (never allowed)."""
    return refusal("bad-host", f"{shown(e.raw)} is not a host the proxy can read: {e.why}")


class PortSet:
    """A set of TCP ports from ints, 'a-b' ranges or (a, b) tuples; O(1) membership (a 64 KiB bitmap)."""

    def __init__(self, specs: Iterable[PortSpec]):
        self.bits = bytearray(65536)
        self.specs = tuple(specs)
        for spec in self.specs:
            lo, hi = _port_range(spec)
            self.bits[lo:hi + 1] = b"\x01" * (hi - lo + 1)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and 0 < port < 65536 and self.bits[port] == 1

    def __str__(self) -> str:
        return " ".join(str(s) if not isinstance(s, tuple) else f"{s[0]}-{s[1]}" for s in self.specs) or "(none)"


def _port_range(spec: PortSpec) -> tuple[int, int]:
    try:
        if isinstance(spec, tuple):
            lo, hi = int(spec[0]), int(spec[1])
        elif isinstance(spec, str) and "-" in spec:
            a, _, b = spec.partition("-")
            lo, hi = int(a), int(b)
        elif isinstance(spec, (int, str)) and not isinstance(spec, bool):
            lo = hi = int(spec)
        else:
            raise TypeError
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{spec!r} is not a port or a port range 'a-b'") from None
    if not 0 < lo <= hi < 65536:
        raise ValueError(f"{spec!r} is not within 1-65535")
    return lo, hi


def _address(text: str) -> tuple[int, int] | None:
    """(version, integer) of an address in strict notation (inet_pton, C speed); a scope id ('%eth0') is dropped."""
    try:
        if ":" not in text:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text.partition("%")[0]), "big")
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None


def _network(x: Net) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network from a network, an address (a /32 or /128) or an interface (its address, not its subnet)."""
    if hasattr(x, "ip") and hasattr(x, "network"):  # IPv4Interface: 192.168.1.2/24 means the node, not its LAN
        x = x.ip
    try:
        net = ipaddress.ip_network(str(x), strict=False)
    except ValueError:
        raise ValueError(f"{x!r} is not an IP address or network") from None
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return net


class Guard:
    """The refusal rules. Build once per config (from_config or plain arguments), share between the mitmproxy path,
    the CONNECT fast path and `appliance explain`; every check returns None (go on) or a Refusal. Thread-safe, pure."""

    def __init__(self, cluster: Iterable[Net | tuple[Net, str]] = (), deny: Iterable[Net] = (),
                 connect_ports: Iterable[PortSpec] = DEFAULT_CONNECT_PORTS,
                 safe_ports: Iterable[PortSpec] = DEFAULT_SAFE_PORTS):
        """`cluster`: the appliance's own addresses and subnets (an item may be `(net, "what it is")`);
        `deny`: more networks never proxied (proxy.deny_destinations); ports: CONNECT and plain-HTTP allow lists."""
        self._rules: list[tuple[int, int, int, str, str, str]] = []  # (version, lo, hi, reason, net, what)
        for net, reason, what in BUILTIN:
            self._add(net, reason, what)
        for item in cluster:
            net, what = item if isinstance(item, tuple) else (item, "an address of the cluster")
            self._add(net, "cluster-address", what)
        for net in deny:
            self._add(net, "denied-destination", "listed in proxy.deny_destinations")
        self._v4 = tuple(r[1:] for r in self._rules if r[0] == 4)
        self._v6 = tuple(r[1:] for r in self._rules if r[0] == 6)
        self.connect_ports = PortSet(connect_ports)
        self.safe_ports = PortSet(safe_ports)

    def _add(self, x: Net, reason: str, what: str) -> None:
        net = _network(x)
        lo = int(net.network_address)
        self._rules.append((net.version, lo, lo + net.num_addresses - 1, reason, str(net), what))

    @classmethod
    def from_config(cls, cfg: Any, local: Iterable[tuple[str, str]] | None = None) -> "Guard":
        """The rules for an Appliance model: every VIP (extra_vhids too), each node's LAN and sync address, the
        sync subnet, an explicit proxy.listen address, and every address of this host's interfaces (`local`:
        (address, interface) pairs; None reads them now, ifaddrs.local_addresses: WAN, management, bridges, global
        IPv6 that no config names); proxy.deny_destinations / connect_ports / safe_ports when the model has them
        (absent or None: no extra networks, the defaults). Built again on every reload, so the interfaces are read
        again too."""
        c, proxy = cfg.cluster, cfg.proxy
        cluster: list[tuple[Net, str]] = [(c.vip.ip, "the cluster VIP")]
        cluster += [(x.vip.ip, f"the VIP of vhid {x.vhid}") for x in c.extra_vhids]
        for name, node in cfg.nodes.items():
            cluster += [(node.lan.ip, f"{name}'s LAN address"), (node.sync.ip, f"{name}'s sync address")]
        # after the addresses, so a refusal names the node; one rule per subnet
        cluster += [(net, "the cluster's sync subnet") for net in dict.fromkeys(n.sync.network for n in cfg.nodes.values())]
        if isinstance(proxy.listen, (IPv4Address, IPv6Address)):
            cluster.append((proxy.listen, "the proxy's listen address"))
        # the status page's own listen addresses (admin.listen; loopback, sync and lan are covered above): never
        # proxied, whatever port, so the admin port cannot be reached through the proxy on any of them
        admin = getattr(cfg, "admin", None)
        cluster += [(a, "the status page's listen address (admin.listen)") for a in getattr(admin, "listen", ())
                    if isinstance(a, (IPv4Address, IPv6Address))]
        if local is None:
            local = local_addresses()
        cluster += [(addr, f"an address of this node ({ifname})") for addr, ifname in local]
        connect = getattr(proxy, "connect_ports", None)
        safe = getattr(proxy, "safe_ports", None)
        return cls(cluster, getattr(proxy, "deny_destinations", None) or (),
                   DEFAULT_CONNECT_PORTS if connect is None else connect,
                   DEFAULT_SAFE_PORTS if safe is None else safe)

    @property
    def rules(self) -> list[tuple[str, str, str]]:
        """(network, reason, what it is) in the order tried: for docs, `explain` and tests."""
        return [(r[4], r[3], r[5]) for r in self._rules]

    # ---------------------------------------------------------------- checks

    def check_target(self, host: Host, port: int, method_connect: bool) -> Refusal | None:
        """Before DNS: an address literal against the networks, a loopback name (localhost, *.localhost), then the
        port (CONNECT: connect_ports; plain HTTP: safe_ports). The address connected to still needs check_address."""
        if host.ip is not None:
            r = self.check_address(host.ip)
            if r is not None:
                return r
        elif host.name in LOOPBACK_NAMES or host.name.endswith(".localhost"):
            return refusal("loopback", f"{host.name} names the appliance's loopback")
        return self.check_port(port, method_connect)

    def check_raw(self, raw: str, port: int, method_connect: bool) -> tuple[Host | None, Refusal | None]:
        """canonical_host(raw) then check_target: (Host, None) to go on, (Host or None, Refusal) to refuse."""
        try:
            host = canonical_host(raw)
        except BadHost as e:
            return None, bad_host(e)
        return host, self.check_target(host, port, method_connect)

    def check_port(self, port: int, method_connect: bool) -> Refusal | None:
        if method_connect:
            if port in self.connect_ports:
                return None
            return refusal("connect-port", f"CONNECT to port {port} (proxy.connect_ports: {self.connect_ports})")
        if port in self.safe_ports:
            return None
        return refusal("port", f"port {port} (proxy.safe_ports: {self.safe_ports})")

    def check_address(self, ip: str | IPv4Address | IPv6Address) -> Refusal | None:
        """On the address actually connected to (after resolution: DNS rebinding), or a literal. A string is
        read strictly as a resolver returns it (scope id dropped, IPv4-mapped unmapped); unreadable is bad-host."""
        if isinstance(ip, str):
            vn = _address(ip)
            if vn is None:
                return refusal("bad-host", f"{shown(ip)} is not an IP address")
            version, n = vn
        else:
            version, n = ip.version, int(ip)
        if version == 6 and n >> 32 == 0xFFFF:  # IPv4-mapped: the kernel connects to the IPv4 address
            version, n = 4, n & 0xFFFFFFFF
        if version == 4:
            return self._match(self._v4, n, 4, "")
        r = self._match(self._v6, n, 6, "")
        if r is None and n >> 32 in _EMBEDS_V4 and n > 1:
            r = self._match(self._v4, n & 0xFFFFFFFF, 4, f" (embedded in {IPv6Address(n)})")
        return r

    @staticmethod
    def _match(rules: tuple, n: int, version: int, via: str) -> Refusal | None:
        for lo, hi, reason, net, what in rules:
            if lo <= n <= hi:
                addr = IPv4Address(n) if version == 4 else IPv6Address(n)
                return refusal(reason, f"{addr}{via} is {what} ({net})")
        return None

    def host_header_mismatch(self, target: Host, host_header: str | None, target_port: int | None = None,
                             default_port: int = 80) -> Refusal | None:
        """Refuse a Host header naming another host than the request target (Squid's host_verify_strict), compared
        canonically ('Example.COM.' is example.com, '0x7f.1' is 127.0.0.1). With target_port, the header's port
        (default_port when it has none) must match too. None means no Host header: nothing to compare."""
        if host_header is None:
            return None
        try:
            h, port = host_port(host_header, default_port)
        except BadHost as e:
            return bad_host(e)
        if h != target or (target_port is not None and port != target_port):
            want = target.authority if target_port is None else target.with_port(target_port)
            return refusal("host-mismatch", f"Host header {shown(host_header)} does not name the request target {want}")
        return None
