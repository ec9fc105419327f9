"""SquidGuard source addresses (host, CIDR, dotted mask, range) as IPv4 networks, and the set arithmetic on them."""
from __future__ import annotations

import ipaddress
import re
from typing import Iterable

Net = ipaddress.IPv4Network
_IP = r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"
_SPEC = re.compile(rf"^({_IP})(?:/(\d{{1,2}}|{_IP})|-({_IP}))?$")
EVERYTHING = ipaddress.IPv4Network("0.0.0.0/0")


def _addr(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def parse_spec(text: str) -> list[Net]:
    """One address spec: 10.0.0.1, 10.0.0.0/24, 10.0.0.0/255.255.255.0 or 10.0.0.10-10.0.0.20 (a range becomes
    the CIDRs that cover exactly it). Host bits under a prefix are dropped, as SquidGuard does."""
    m = _SPEC.match(text)
    if not m:
        raise ValueError(f"{text!r} is not an address, CIDR, address/mask or range")
    ip, mask, end = m.groups()
    if end is not None:
        a, b = _addr(ip), _addr(end)
        if a > b:
            raise ValueError(f"range {text} ends before it starts")
        return list(ipaddress.summarize_address_range(a, b))
    _addr(ip)
    try:
        return [ipaddress.IPv4Network(f"{ip}/{mask or 32}", strict=False)]
    except ValueError:
        raise ValueError(f"{text!r}: bad prefix or mask") from None


def parse_ip_words(words: Iterable[str]) -> list[Net]:
    """The words after `ip` (commas and a spaced-out `a - b` range allowed)."""
    parts = [p for w in words for p in w.split(",") if p]
    joined: list[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p.endswith("-") and i + 1 < len(parts):  # "a-" "b"
            joined.append(p + parts[i + 1])
            i += 2
        elif i + 2 < len(parts) and parts[i + 1] == "-":  # "a" "-" "b"
            joined.append(f"{p}-{parts[i + 2]}")
            i += 3
        elif p.startswith("-") and joined:  # "a" "-b"
            joined[-1] += p
            i += 1
        else:
            joined.append(p)
            i += 1
    return [n for p in joined for n in parse_spec(p)]


def parse_iplist(text: str, path: str) -> list[Net]:
    """An `iplist` file: one spec per line, `#` comments; ValueError naming path:line."""
    out: list[Net] = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                out += parse_ip_words(line.split())
            except ValueError as e:
                raise ValueError(f"{path}:{no}: {e}") from None
    return out


def collapse(nets: Iterable[Net]) -> list[Net]:
    return list(ipaddress.collapse_addresses(nets))


def subtract(nets: Iterable[Net], minus: Iterable[Net]) -> list[Net]:
    """nets without the addresses in minus, as few CIDRs as cover exactly the rest."""
    rest = collapse(nets)
    for m in collapse(minus):
        nxt: list[Net] = []
        for n in rest:
            if m.supernet_of(n):
                continue
            if n.supernet_of(m):
                nxt.extend(n.address_exclude(m))
            else:
                nxt.append(n)
        rest = nxt
    return collapse(rest)


def intersect(nets: Iterable[Net], within: Iterable[Net]) -> list[Net]:
    """The addresses in both: two CIDRs are nested or apart, so each overlap is the smaller of a pair."""
    within = collapse(within)
    return collapse(n if w.supernet_of(n) else w for n in collapse(nets) for w in within if n.overlaps(w))
