"""A dest's list files found against dbhome, read once, checked for what matches differently here, written out."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from appliance.migrate.lexer import SquidGuardError
from appliance.migrate.sgmodel import Dest, SgConfig

MAX_LIST_BYTES = 512 * 1024 * 1024  # the largest blacklists are tens of MB
# generated categories for pass-list words that name no dest: `in-addr` (a URL whose host is an IPv4 address) and
# `none` (every URL). Both are expressions, so they see whole URLs only (see docs/migration.md).
IN_ADDR_CAT = "sg-in-addr"
NONE_CAT = "sg-none"
GENERATED = {
    IN_ADDR_CAT: r"^[a-z][a-z0-9+.-]*://(?:[^/@]*@)?[0-9.]+(?::[0-9]+)?(?:/|$)" + "\n",
    NONE_CAT: "^.\n",
}


@dataclass
class Category:
    """One dest as our category: the bytes of each kind (several files of a kind are joined) and its host set."""
    name: str
    files: dict[str, list[bytes]] = field(default_factory=dict)
    hosts: set[str] = field(default_factory=set)  # domains and URL hosts, lower case, no leading dot
    expressions: int = 0

    def empty(self) -> bool:
        return not any(self.files.values())


def _entries(data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace")
    return [ln.split("#", 1)[0].strip().lower() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


def _host(entry: str) -> str:
    e = entry[2:] if entry.startswith("*.") else entry
    return e.lstrip(".").split("/", 1)[0].split(":", 1)[0].rstrip(".")


def resolve(cfg: SgConfig, dbhome: Optional[str], path: str) -> Path:
    p = Path(path)
    if p.is_absolute():
        return p
    base = Path(dbhome) if dbhome else Path(cfg.path).resolve().parent
    return base / p


def load(cfg: SgConfig, dbhome: Optional[str], dest: Dest) -> Category:
    """Read every list file of a dest; SquidGuardError (config file:line) for a file that is missing or unreadable."""
    cat = Category(dest.name)
    for ref in dest.lists:
        f = resolve(cfg, dbhome, ref.path)
        where = f"{cfg.path}:{ref.line}: dest {dest.name}: {ref.path}"
        if not f.is_file():
            also = " (only the compiled .db exists: export the text list)" if Path(f"{f}.db").exists() else ""
            raise SquidGuardError(f"{where}: no such list file {f}{also}")
        try:
            if f.stat().st_size > MAX_LIST_BYTES:
                raise SquidGuardError(f"{where}: larger than {MAX_LIST_BYTES} bytes")
            data = f.read_bytes()
        except OSError as e:
            raise SquidGuardError(f"{where}: cannot read {f}: {e.strerror or e}") from None
        cat.files.setdefault(ref.kind, []).append(data)
        entries = _entries(data)
        if ref.kind == "expressions":
            cat.expressions += len(entries)
            _expression_notes(cfg, dest, ref.line, ref.path, entries)
        else:
            cat.hosts.update(h for h in map(_host, entries) if h)
    return cat


def _expression_notes(cfg: SgConfig, dest: Dest, line: int, path: str, entries: list[str]) -> None:
    odd = [e for e in entries if e.startswith("^") or "://" in e or re.search(r"\bwww\\?\.", e)]
    if odd:
        cfg.note(line, f"dest {dest.name} expressionlist {path}", f"{len(odd)} expression(s) such as {odd[0]!r} "
                 "depend on the URL's start: SquidGuard matches host/path with no scheme and no leading www., here "
                 "the whole URL (http://www.host/path) is matched; rewrite them without ^ and www.")
    posix = [e for e in entries if "[[:" in e]
    if posix:
        cfg.note(line, f"dest {dest.name} expressionlist {path}", f"{len(posix)} expression(s) such as {posix[0]!r} "
                 "use POSIX classes ([[:digit:]]), which Python's regular expressions read differently: rewrite them "
                 "(\\d, [a-z])")


def _parents(host: str) -> list[str]:
    labels = host.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


def overlap(a: Category, b: Category) -> Optional[str]:
    """An entry by which one URL may be in both categories, or None when none can be."""
    if a.empty() or b.empty():
        return None
    if a.expressions or b.expressions:
        return "an expression list (any URL may match it)"
    small, big = (a, b) if len(a.hosts) <= len(b.hosts) else (b, a)
    for h in small.hosts:
        if any(p in big.hosts for p in _parents(h)):
            return h
    for h in big.hosts:  # a host of the larger set under a domain of the smaller one
        if any(p in small.hosts for p in _parents(h)[1:]):
            return h
    return None


def in_addr_overlap(c: Category) -> Optional[str]:
    """in-addr against a category: only IP-literal entries or expressions can be in both."""
    if c.expressions:
        return "an expression list (any URL may match it)"
    for h in c.hosts:
        try:
            ipaddress.IPv4Address(h)
            return h
        except ValueError:
            continue
    return None


def write(out: Path, cats: dict[str, Category], generated: set[str]) -> None:
    """out/<category>/{domains,urls,expressions}; several SquidGuard files of a kind become one, in order."""
    for name, cat in cats.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for kind, parts in cat.files.items():
            (d / kind).write_bytes(b"".join(p if p.endswith(b"\n") or not p else p + b"\n" for p in parts))
        if cat.empty():
            (d / "domains").write_bytes(b"")  # a dest with no list (SquidGuard: inactive) still needs its directory
    for name in generated:
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "expressions").write_text(GENERATED[name])
