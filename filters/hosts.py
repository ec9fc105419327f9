"""One host model: every spelling of a host (IPv4 as inet_aton reads it, IPv6, IDN names) to one canonical Host, or BadHost."""
from __future__ import annotations

import functools
import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

MAX_RAW = 1024  # longer input is refused before any work (IDNA mapping can shrink text, so not 253)
MAX_NAME = 253  # RFC 1035 total length, without the trailing dot
CACHE = 32768  # canonical forms kept per process; bounded so hostile input cannot grow memory
# A label as lists.norm_host accepts it (the lists and the proxy must agree): letters, digits, '-', '_' (seen in
# real host names), no '-' at either end, at most 63 characters.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
# A last label that is a number makes the whole host an IPv4 address or nothing (WHATWG "ends in a number"):
# no TLD is numeric, and a resolver would read such a host as an address, not a name.
_NUMERIC = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")
_NAME = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_QUAD = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}\Z")  # dotted decimal, no leading zeros: one meaning in every libc
_HEX = frozenset("0123456789abcdef")
_OCT = frozenset("01234567")
_DEC = frozenset("0123456789")


class BadHost(ValueError):
    """A host the normaliser cannot read; `.raw` is the input, `.why` a short reason. Always refused, never allowed."""

    def __init__(self, raw: object, why: str):
        self.raw, self.why = raw, why
        super().__init__(f"bad host {shown(raw)}: {why}")


@dataclass(frozen=True, slots=True)
class Host:
    """A canonical host. `name` is what the lists, the refusal rules, the logs and the resolver see:
    dotted-quad IPv4, compressed IPv6 (no brackets, never IPv4-mapped) or a lower-case ASCII name (IDN as
    punycode, no trailing dot). `ip` is the address for IP literals, None for names."""

    name: str
    ip: IPv4Address | IPv6Address | None = None

    @property
    def is_ip(self) -> bool:
        return self.ip is not None

    @property
    def version(self) -> int | None:
        """4, 6, or None for a name."""
        return None if self.ip is None else self.ip.version

    @property
    def authority(self) -> str:
        """The host as written in a URL or a Host header: IPv6 in brackets."""
        return f"[{self.name}]" if self.version == 6 else self.name

    def with_port(self, port: int) -> str:
        """`host:port` for a CONNECT target or a log line (IPv6 bracketed)."""
        return f"{self.authority}:{port}"

    def __str__(self) -> str:
        return self.name


def shown(raw: object, limit: int = 80) -> str:
    """A quoted, printable-ASCII-only, bounded form of untrusted input, safe inside one log line."""
    s = ascii(raw) if isinstance(raw, str) else ascii(repr(raw))[1:-1]
    return s if len(s) <= limit else s[:limit - 4] + "...'"


def canonical_host(raw: str) -> Host:
    """The canonical Host of `raw` (a host without port: name, IPv4 in any inet_aton spelling, IPv6 bare or in
    brackets); raises BadHost naming why. IPv4-mapped IPv6 comes back as IPv4. Cached (bounded)."""
    if not isinstance(raw, str):
        raise BadHost(raw, "not a string")
    if len(raw) > MAX_RAW:
        raise BadHost(raw, f"longer than {MAX_RAW} characters")
    r = _canonical(raw)
    if isinstance(r, Host):
        return r
    raise BadHost(raw, r)


def host_port(raw: str, default_port: int | None = None) -> tuple[Host, int | None]:
    """`host[:port]` (a CONNECT target, a Host header, a URL authority without userinfo) -> (Host, port);
    the port is `default_port` when none is written (or empty, `host:`). IPv6 with a port must be bracketed;
    an unbracketed IPv6 address is refused here as ambiguous. Ports are 1-65535, ASCII digits only."""
    if not isinstance(raw, str):
        raise BadHost(raw, "not a string")
    if len(raw) > MAX_RAW:
        raise BadHost(raw, f"longer than {MAX_RAW} characters")
    r = _host_port(raw)
    if isinstance(r, str):
        raise BadHost(raw, r)
    host, port = r
    return host, default_port if port is None else port


def parse_port(text: str) -> int | None:
    """'443' -> 443; None unless 1-5 ASCII digits with a value of 1-65535 (str.isdigit() would take '²' or '٤')."""
    if not 0 < len(text) <= 5 or not _DEC.issuperset(text):
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


@functools.lru_cache(maxsize=CACHE)
def _host_port(raw: str) -> tuple[Host, int | None] | str:
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            return "'[' without ']'"
        hostpart, rest = raw[:end + 1], raw[end + 1:]
    elif raw.count(":") > 1:
        return "an IPv6 address must be in brackets here"
    else:
        hostpart, colon, port_s = raw.partition(":")
        rest = colon + port_s
    port = None
    if rest:
        if rest[0] != ":":
            return "junk after ']'"
        if len(rest) > 1:
            port = parse_port(rest[1:])
            if port is None:
                return f"bad port {shown(rest[1:])}"
    host = _canonical(hostpart)
    return (host, port) if isinstance(host, Host) else host


@functools.lru_cache(maxsize=CACHE)
def _canonical(raw: str) -> Host | str:
    """Host, or the reason it is bad (a str: the cache keeps reasons, never exception objects and their frames)."""
    if not raw:
        return "empty"
    if raw[0] == "[":
        if raw[-1] != "]":
            return "'[' without ']'"
        return _ipv6(raw[1:-1])
    if ":" in raw:
        return _ipv6(raw)
    h = raw
    if not h.isascii():
        # IDNA 2003 (Python's codec) as lists.norm_host uses, so list entries and requests meet; it also maps
        # full-width digits and dots, so '１２７。０。０。１' is seen as the address it spells
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError as e:
            return f"not a valid international name ({e.__class__.__name__})"
    h = h.lower()
    if h.endswith("."):
        h = h[:-1]  # one root dot: 'localhost.' is localhost; 'a..' stays bad below
    if not h:
        return "empty"
    if _QUAD.match(h):  # the common address spelling, already canonical: skip the general parser
        return Host(h, IPv4Address(int.from_bytes(socket.inet_aton(h), "big")))
    if _NUMERIC.match(h, h.rfind(".") + 1):
        ip = _inet_aton(h.split("."))
        if ip is None:
            return "ends in a number but is not an IPv4 address"
        return Host(str(ip), ip)
    if len(h) > MAX_NAME:
        return f"longer than {MAX_NAME} characters"
    if _NAME.match(h):
        return Host(h)
    for label in h.split("."):  # only to name the bad label
        if not label:
            return "empty label"
        if not _LABEL.match(label):
            return f"bad label {shown(label, 40)} (letters, digits, '-', '_'; at most 63)"
    return "not a host name"  # unreachable while _NAME and _LABEL agree; refuse, never allow


def _ipv6(text: str) -> Host | str:
    if "%" in text:
        return "IPv6 zone ids are not accepted"
    try:
        ip = IPv6Address(text)
    except ValueError:
        return "not an IPv6 address"
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return Host(str(mapped), mapped)  # ::ffff:a.b.c.d is a.b.c.d to the kernel: one spelling, one rule
    return Host(ip.compressed, ip)


def _inet_aton(parts: list[str]) -> IPv4Address | None:
    """inet_aton(3): 1-4 parts, each decimal, octal (leading 0) or hex (0x); the last fills the remaining bytes."""
    if not 0 < len(parts) <= 4:
        return None
    values = []
    for p in parts:
        if p.startswith("0x"):
            digits, base, ok = p[2:], 16, _HEX
        elif len(p) > 1 and p[0] == "0":
            digits, base, ok = p[1:], 8, _OCT
        else:
            digits, base, ok = p, 10, _DEC
        if not digits or not ok.issuperset(digits):
            return None
        values.append(int(digits, base))
    last = values.pop()
    if last >= 1 << (8 * (4 - len(values))) or any(v > 255 for v in values):
        return None
    n = 0
    for v in values:
        n = (n << 8) | v
    return IPv4Address((n << (8 * (4 - len(values)))) | last)

