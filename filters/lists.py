"""SquidGuard/UT1 list files: parse and normalise hosts, URL prefixes and expressions; report bad lines as file:line."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

KINDS = ("domains", "urls", "expressions")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_WWW = re.compile(r"^www\d*\.")


def norm_host(raw: str) -> str | None:
    """Lower case, no port, no trailing dots, IDN as punycode, IP literals canonical; None when not a host name."""
    h = raw.strip().lower()
    if not h:
        return None
    if h[0] == "[":  # [v6] or [v6]:port
        end = h.find("]")
        if end < 0:
            return None
        try:
            return ipaddress.IPv6Address(h[1:end]).compressed
        except ValueError:
            return None
    colons = h.count(":")
    if colons == 1:
        h, _, port = h.partition(":")
        if not port.isdigit():
            return None
    elif colons > 1:
        try:
            return ipaddress.IPv6Address(h).compressed
        except ValueError:
            return None
    h = h.rstrip(".")
    if not h:
        return None
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if h[-1].isdigit():
        try:
            return str(ipaddress.IPv4Address(h))
        except ValueError:
            if h.replace(".", "").isdigit():
                return None  # all digits but no valid IPv4 (e.g. leading zeros): ambiguous, never a name
    if len(h) > 253:
        return None
    for label in h.split("."):
        if not _LABEL.match(label):
            return None
    return h


def fast_host(raw: str) -> str | None:
    """The hot-path variant: plain lower-case ASCII names go straight through, the rest via norm_host()."""
    h = raw.lower()
    if h and h.isascii() and h[-1] not in ".]" and ":" not in h and not h[-1].isdigit() and " " not in h:
        return h
    return norm_host(raw)


def strip_www(host: str) -> str:
    return _WWW.sub("", host, count=1)


def split_url(url: str) -> tuple[str, str]:
    """'http://Host:80/Path?q' -> ('host', '/path?q') with the host normalised and www. stripped (SquidGuard urls)."""
    u = url.strip()
    i = u.find("://")
    if i >= 0:
        u = u[i + 3:]
    slash = u.find("/")
    hostpart, path = (u, "/") if slash < 0 else (u[:slash], u[slash:])
    if "@" in hostpart:
        hostpart = hostpart.rsplit("@", 1)[1]
    host = norm_host(hostpart)
    if host is None:
        raise ValueError(f"bad host {hostpart!r}")
    return strip_www(host), path.lower()


@dataclass
class BadLine:
    path: str
    line: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}: {self.text[:80]!r}"


@dataclass
class Parsed:
    kind: str
    entries: list = field(default_factory=list)  # domains: (host, line); urls: (host, prefix, line); expressions: (regex, line)
    bad: list[BadLine] = field(default_factory=list)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    data = path.read_bytes()
    for no, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.strip()
        if not raw or raw.startswith(b"#"):
            continue
        yield no, raw.decode("utf-8", "surrogateescape")


def parse_domain(text: str) -> str:
    t = text
    if t.startswith("*."):
        t = t[2:]
    elif t.startswith("."):
        t = t[1:]
    if any(c.isspace() for c in t) or "/" in t:
        raise ValueError("not a domain (spaces or '/'; URL prefixes belong in urls)")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not UTF-8") from None
    h = norm_host(t)
    if h is None:
        raise ValueError("not a valid domain name")
    return h


def parse_url_line(text: str) -> tuple[str, str]:
    if any(c.isspace() for c in text):
        raise ValueError("spaces in a URL prefix")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not UTF-8") from None
    return split_url(text)


def parse_expression(text: str) -> str:
    try:
        text.encode("utf-8")
        re.compile(text, re.IGNORECASE)
    except UnicodeEncodeError:
        raise ValueError("not UTF-8") from None
    except re.error as e:
        raise ValueError(f"bad regular expression: {e}") from None
    return text


def parse_file(path: Path, kind: str, shown: str | None = None) -> Parsed:
    """Parse one list file; every bad line is recorded (file:line, reason), never raised."""
    if kind not in KINDS:
        raise ValueError(f"unknown list kind {kind!r}")
    shown = shown or str(path)
    out = Parsed(kind)
    add, bad = out.entries.append, out.bad.append
    if kind == "domains":
        fast = _LABEL
        for no, text in _lines(path):
            low = text.lower()
            # fast path for the common plain name: every label valid, ASCII, no trailing dot
            if low.isascii() and low[-1] != "." and not low[-1].isdigit() and all(fast.match(x) for x in low.split(".")) and len(low) <= 253:
                add((low, no))
                continue
            try:
                add((parse_domain(text), no))
            except ValueError as e:
                bad(BadLine(shown, no, str(e), text))
    elif kind == "urls":
        for no, text in _lines(path):
            try:
                host, prefix = parse_url_line(text)
                add((host, prefix, no))
            except ValueError as e:
                bad(BadLine(shown, no, str(e), text))
    else:
        for no, text in _lines(path):
            try:
                add((parse_expression(text), no))
            except ValueError as e:
                bad(BadLine(shown, no, str(e), text))
    return out


def count_file(path: Path, kind: str) -> tuple[int, int]:
    """(good entries, bad lines) of one list file, as the proxy would read it."""
    p = parse_file(Path(path), kind)
    return len(p.entries), len(p.bad)
