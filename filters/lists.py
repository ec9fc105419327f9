"""SquidGuard/UT1 list files: parse and normalise hosts, URL prefixes and expressions; report bad lines as file:line."""
from __future__ import annotations

import io
import ipaddress
import re
import zlib
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate, compress, count, repeat
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


def _split_lines(data: bytes) -> Iterator[tuple[int, str]]:
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
    return parse_bytes(path.read_bytes(), kind, shown or str(path))


def parse_bytes(data: bytes, kind: str, shown: str) -> Parsed:
    """parse_file() of bytes already read (the compiler hashes and parses the same bytes)."""
    out = Parsed(kind)
    if kind == "domains":
        part = parse_domains(data, shown)
        out.entries, out.bad = part.entries(), part.bad
        return out
    add, bad = out.entries.append, out.bad.append
    if kind == "urls":
        for no, text in _split_lines(data):
            try:
                host, prefix = parse_url_line(text)
                add((host, prefix, no))
            except ValueError as e:
                bad(BadLine(shown, no, str(e), text))
    elif kind == "expressions":
        for no, text in _split_lines(data):
            try:
                add((parse_expression(text), no))
            except ValueError as e:
                bad(BadLine(shown, no, str(e), text))
    else:
        raise ValueError(f"unknown list kind {kind!r}")
    return out


def count_file(path: Path, kind: str) -> tuple[int, int]:
    """(good entries, bad lines) of one list file, as the proxy would read it."""
    if kind == "domains":  # counted without building the entries (a 1M-line list: no 1M tuples)
        part = parse_domains(Path(path).read_bytes(), str(path))
        return part.count, len(part.bad)
    p = parse_file(Path(path), kind)
    return len(p.entries), len(p.bad)


def domain_line(text: str) -> str:
    """One stripped, non-comment line of a domains file -> its key; ValueError (the reason) when bad."""
    low = text.lower()
    # the common plain name: every label valid, ASCII, no trailing dot, not ending in a digit (an IP goes the long way)
    if low.isascii() and low[-1] != "." and not low[-1].isdigit() and len(low) <= 253 \
            and all(_LABEL.match(x) for x in low.split(".")):
        return low
    return parse_domain(text)


def _class_tables() -> tuple[bytes, bytes]:
    cls, end = bytearray(b"!" * 256), bytearray(b"a" * 256)
    for c in b"abcdefghijklmnopqrstuvwxyz_":
        cls[c] = ord("a")
    for c in b"0123456789":
        cls[c] = end[c] = ord("0")
    cls[ord("-")], cls[ord(".")], cls[ord("\n")], end[ord("\n")] = ord("-"), ord("."), ord("."), ord("\n")
    return bytes(cls), bytes(end)


# _CLASS: a name's characters to a, 0, '-', '.' (a newline counts as a '.'), anything else to '!'; _END: digits and
# newlines kept apart. A line with none of the patterns below in them is a plain name that domain_line() would take
# as it is, so only the lines these scans point at are parsed one by one (a 1M-line list: a few C-speed scans).
_CLASS, _END = _class_tables()
_SUSPECT = ((_CLASS, b"!", 0), (_CLASS, b"..", 1), (_CLASS, b".-", 1), (_CLASS, b"-.", 1), (_END, b"0\n", 0))


@dataclass
class DomainPart:
    """A domains file parsed in bulk. blob: the file, lower-cased, every key followed by a newline (keys that
    normalisation changed are appended); per record crc32(key + newline), the key's offset in blob and its line.
    Duplicates are kept (the index keeps the first line per category). depths: the label counts of the keys."""
    blob: bytes
    hashes: array
    offsets: array
    lines: array
    depths: set
    bad: list

    @property
    def count(self) -> int:
        return len(self.hashes)

    def entries(self) -> list[tuple[str, int]]:
        """(key, line) in file order, as parse_file returns them (tests, counts, small files)."""
        b = self.blob
        out = [(b[o:b.index(b"\n", o)].decode(), ln) for o, ln in zip(self.offsets, self.lines)]
        return sorted(out, key=lambda e: e[1])


def parse_domains(data: bytes, shown: str) -> DomainPart:
    """A domains file's bytes -> DomainPart; bad lines recorded as file:line (BadLine), never raised."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")  # CRLF: a CR would make every line suspect (strip() drops it anyway)
    if data and not data.endswith(b"\n"):
        data += b"\n"
    low = data if data.islower() else data.lower()  # no copy for the usual all-lower-case list
    lens = array("I", map(len, io.BytesIO(low)))  # every line with its newline
    if len(low) >= 1 << 32:
        raise ValueError(f"{shown}: larger than 4 GB")
    starts = array("I", accumulate(lens, initial=0))
    suspect: set[int] = set()
    classes: dict[bytes, bytes] = {}
    for table, pat, both in _SUSPECT:
        t = classes.get(table) or classes.setdefault(table, low.translate(table))
        i = t.find(pat)
        while i >= 0:
            suspect.add(bisect_right(starts, i) - 1)
            if both:
                suspect.add(bisect_right(starts, i + 1) - 1)
            i = t.find(pat, i + 1)
    del classes, t
    if low[:1] in (b".", b"-", b"\n"):
        suspect.add(0)
    if lens and max(lens) > 64:  # a label may be over 63 characters, or the name over 253
        suspect.update(compress(count(), map((64).__lt__, lens)))
    keep = bytearray(b"\x01") * len(lens)
    for i in suspect:
        keep[i] = 0
    crc = zlib.crc32
    hashes = array("I", compress(map(crc, io.BytesIO(low)), keep))
    offsets = array("I", compress(starts, keep))
    lines = array("I", compress(range(1, len(lens) + 1), keep))
    depths = set(compress(map(bytes.count, io.BytesIO(low), repeat(b".")), keep))
    bad: list[BadLine] = []
    extra = []
    for i in sorted(suspect):
        for no, text in _split_lines(data[starts[i]:starts[i + 1]]):
            try:
                extra.append((domain_line(text).encode() + b"\n", i + 1))
            except ValueError as e:
                bad.append(BadLine(shown, i + 1, str(e), text))
    if extra:
        pos = len(low)
        for key, no in extra:
            hashes.append(crc(key))
            offsets.append(pos)
            lines.append(no)
            depths.add(key.count(b"."))
            pos += len(key)
        low += b"".join(k for k, _ in extra)
    return DomainPart(low, hashes, offsets, lines, {d + 1 for d in depths}, bad)
