"""The rule engine: one decide() call for the proxy and `appliance explain` (client ACL, allow, policies, block)."""
from __future__ import annotations

import datetime as dt
import os
import re
import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from zlib import crc32

from filters.index import M32, MULTI
from filters.lists import fast_host, split_url, strip_www

HOST_CACHE = 65536  # per-engine cache of host -> domain-list hits (cleared on reload with the engine)
NOT_NAME_END = ".]0123456789"  # a host ending so (or empty) is not a plain name: an IP literal or needs fast_host
CLOCK_ENV = "APPLIANCE_FILTER_CLOCK"  # tests only: a fixed "YYYY-MM-DD HH:MM" local time for schedules


class Decision:
    """verdict allow|block|deny, category, source (list "file:line", "policy <name>" or "proxy.clients"), policy, rule
    (the list entry that matched), schedule. A list hit keeps its file and line apart: `source` formats them when read."""
    __slots__ = ("verdict", "category", "_source_file", "policy", "rule", "schedule", "_line")

    def __init__(self, verdict: str, category: Optional[str], source: Optional[str], policy: Optional[str],
                 rule: Optional[str] = None, schedule: Optional[str] = None, line: Optional[int] = None):
        self.verdict = verdict
        self.category = category
        self._source_file = source
        self.policy = policy
        self.rule = rule
        self.schedule = schedule
        self._line = line

    @property
    def source(self) -> Optional[str]:
        return self._source_file if self._line is None else f"{self._source_file}:{self._line}"

    @property
    def blocked(self) -> bool:
        return self.verdict != "allow"

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "category": self.category, "source": self.source, "policy": self.policy,
                "rule": self.rule, "schedule": self.schedule}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Decision(" + ", ".join(f"{k}={v!r}" for k, v in self.to_json().items()) + ")"


@dataclass(frozen=True)
class PolicyRule:
    name: str
    nets: tuple[tuple[int, int], ...]
    allow: tuple[str, ...]
    block: tuple[str, ...]
    schedule: Any = None  # object with .matches(datetime) and str()


def ipv4_network(n: Any) -> tuple[int, int]:
    """(network, mask) as integers of an IPv4 network or "a.b.c.d[/len]" (host bits dropped)."""
    net = ipaddress.IPv4Network(str(getattr(n, "with_prefixlen", n)), strict=False)
    return int(net.network_address), int(net.netmask)


def _ipv4_int(ip: str) -> int | None:
    """A client address as an integer (IPv4, or IPv4-mapped IPv6); None for anything else."""
    if ip.startswith("::ffff:"):
        ip = ip[7:]
    try:
        return int(ipaddress.IPv4Address(ip))
    except ValueError:
        return None


def clock_from_env() -> Callable[[], dt.datetime] | None:
    fixed = os.environ.get(CLOCK_ENV)
    if not fixed:
        return None
    when = dt.datetime.strptime(fixed.strip(), "%Y-%m-%d %H:%M")
    return lambda: when


class RuleEngine:
    """Immutable rules. `hits` come from an index object with lookup(host) -> [(category, source, rule)] or None."""

    def __init__(self, *, index: Any, clients: Iterable[Any], allow: Iterable[str], block: Iterable[str],
                 policies: Iterable[PolicyRule] = (), exempt: Iterable[str] = (),
                 url_prefixes: dict[str, list[tuple[str, str, str, str]]] | None = None,
                 expressions: dict[str, list[tuple[str, str]]] | None = None,
                 clock: Callable[[], dt.datetime] | None = None):
        self.index = index
        self.clients = tuple(ipv4_network(n) for n in clients)
        self.allow = tuple(allow)
        self.block = tuple(block)
        self.exempt = tuple(exempt)
        self.policies = tuple(policies)
        self.url_prefixes = url_prefixes or {}  # host -> [(prefix, category, source, entry)]
        self.clock = clock or clock_from_env() or dt.datetime.now
        self._client_cache: dict[str, Any] = {}
        self._host_cache: dict[str, tuple] = {}
        meta = getattr(index, "meta", {})
        self._single_label = bool(meta.get("single_label", True))
        depths = meta.get("depths")  # label counts present in the domain lists (None: an older index, probe all)
        self._depths = tuple(sorted({int(d) for d in depths}, reverse=True)) if depths is not None else None
        self._lookup_host = getattr(index, "lookup_host", None) if self._depths is not None else None
        self._probe = getattr(index, "probe", None) if self._lookup_host is not None else None
        # expressions: one combined regex over every category, named groups tell which line matched
        self._expression, self._expression_groups = self._combine_expressions(expressions or {})
        self.categories = set(self.allow) | set(self.block) | set(self.exempt)
        # a host with one list hit, for a client without policies: its category alone gives the verdict
        self._category_verdict = {**{c: "block" for c in self.block}, **{c: "allow" for c in self.allow}}
        for p in self.policies:
            self.categories |= set(p.allow) | set(p.block)

    @staticmethod
    def _combine_expressions(expressions: dict[str, list[tuple[str, str]]]):
        parts, names = [], {}
        for cat, items in expressions.items():
            for i, (rx, source) in enumerate(items):
                g = f"e{len(names)}"
                names[g] = (cat, source, rx)
                parts.append(f"(?P<{g}>{rx})")
        if not parts:
            return None, names
        try:
            return re.compile("|".join(parts), re.IGNORECASE), names
        except re.error:  # an expression using backreferences by number: fall back to one by one
            return [(re.compile(rx, re.IGNORECASE), g) for g, (_, _, rx) in names.items()], names

    # ------------------------------------------------------------ matching

    def _client_rules(self, client: str) -> tuple[bool, tuple[PolicyRule, ...]] | None:
        c = self._client_cache.get(client)
        if c is None:
            ip = _ipv4_int(client)
            if ip is None:
                c = (False, ())
            else:
                ok = any(ip & m == n for n, m in self.clients)
                pols = tuple(p for p in self.policies if any(ip & m == n for n, m in p.nets))
                c = (ok, pols)
            if len(self._client_cache) < 65536:
                self._client_cache[client] = c
        return c

    def _host_hits(self, host: str) -> tuple:
        """Hits as one flat tuple: category, file, line, entry, category, ... (line None: file is the whole source) of the host's domain-list lookups, cached by the host as the client sent it."""
        dom = self._host_cache.get(host)
        return dom if dom is not None else self._cache_host_hits(host)

    def _cache_host_hits(self, host: str) -> tuple:
        h = host.lower()
        if self._lookup_host is not None and h.isascii() and h[-1:] not in NOT_NAME_END and ":" not in h \
                and " " not in h:  # a plain name (fast_host's fast case): one call into the index (as in decide)
            dom = self._lookup_host(h, self._depths)
        else:
            h = fast_host(host) if host else None
            dom = self._probe_suffixes(h) if h is not None else ()
        cache = self._host_cache
        if len(cache) >= HOST_CACHE:
            cache.clear()  # bounded; a working set of hosts refills it quickly
        cache[host] = dom
        return dom

    def hits(self, host: str, url: str | None = None) -> dict[str, tuple[str, str]]:
        """category -> (source file:line, entry) for every category that lists this host/URL (most specific first)."""
        return {cat: (src if line is None else f"{src}:{line}", entry)
                for cat, (src, entry, line) in self._category_hits(host, url).items()}

    def _category_hits(self, host: str, url: str | None = None) -> dict[str, tuple[str, str, int | None]]:
        """hits() with the source kept as (file, entry, line): line None when the file is the whole source."""
        out: dict[str, tuple[str, str, int | None]] = {}
        dom = self._host_hits(host)
        if len(dom) == 4:
            out[dom[0]] = (dom[1], dom[3], dom[2])
        elif dom:
            for k in range(0, len(dom), 4):
                cat = dom[k]
                if cat not in out:
                    out[cat] = (dom[k + 1], dom[k + 3], dom[k + 2])
        if url is not None:
            if self.url_prefixes:
                try:
                    uhost, path = split_url(url)
                except ValueError:
                    h = fast_host(host) if host else None
                    uhost, path = (strip_www(h) if h else ""), "/"
                for prefix, cat, src, entry in self.url_prefixes.get(uhost, ()):
                    if path.startswith(prefix):
                        out.setdefault(cat, (src, entry, None))
            ex = self._expression
            if ex is not None:
                if isinstance(ex, list):
                    for rx, g in ex:
                        if rx.search(url):
                            cat, src, rxs = self._expression_groups[g]
                            out.setdefault(cat, (src, rxs, None))
                else:
                    pos = 0
                    while pos <= len(url):  # every category whose expression matches somewhere
                        m = ex.search(url, pos)
                        if not m:
                            break
                        cat, src, rxs = self._expression_groups[m.lastgroup]
                        out.setdefault(cat, (src, rxs, None))
                        pos = m.start() + 1
        return out

    def _probe_suffixes(self, h: str) -> tuple:
        """Look the host and each parent domain up (label boundaries only), most specific first.

        With the index's `depths` (the label counts that occur in the lists), only suffixes with such a label count
        are probed: for lists of 2-label domains, `a.b.example.com` costs one probe (`example.com`), not three."""
        lookup = self._lookup_flat
        if ":" in h or (h[-1].isdigit() and h.replace(".", "").isdigit()):  # an IP literal has no parent domains
            found = lookup(h)
            return tuple(found) if found else ()
        depths = self._depths
        res: list = []
        if depths is None:  # an index without depths: probe every suffix
            found = lookup(h)
            if found:
                res.extend(found)
            stop = -1 if self._single_label else h.rfind(".")  # skip bare TLD lookups when no list has one
            i = h.find(".")
            while 0 <= i and i != stop:
                found = lookup(h[i + 1:])
                if found:
                    res.extend(found)
                i = h.find(".", i + 1)
            return tuple(res)
        k = h.count(".") + 1  # labels in h[i + 1:]
        i = -1
        for d in depths:  # descending: most specific first
            if d > k:
                continue
            while k > d:
                i = h.find(".", i + 1)
                k -= 1
            found = lookup(h[i + 1:] if i >= 0 else h)
            if found:
                res.extend(found)
        return tuple(res)

    def _lookup_flat(self, name: str):
        """index.lookup() hits flattened: category, source, None, entry, ..."""
        found = self.index.lookup(name)
        return [x for cat, src, entry in found for x in (cat, src, None, entry)] if found else None

    def decide(self, client: str, host: str, url: str | None = None, when: dt.datetime | None = None) -> Decision:
        """The one decision: client ACL -> allow categories -> matching policies -> default block -> allow.

        The hot path, and longer than the other functions on purpose: every proxied request and CONNECT calls it, and
        the host-only case (cache lookup, the one-hit verdict) is inlined here instead of calling _host_hits() and
        _category_hits(), because each Python call and dict built would cost a measurable share of a decision
        (`make bench`, engine figures)."""
        c = self._client_cache.get(client)
        ok, pols = c if c is not None else self._client_rules(client)
        if not ok:
            return Decision("deny", None, "proxy.clients", None)
        if url is None:  # a host only (CONNECT, SNI): the domain lists alone
            cache = self._host_cache
            dom = cache.get(host)
            if dom is None:  # _cache_host_hits(), with its common case and the index's lookup_host() inline
                h = host.lower()
                probe = self._probe
                if probe is not None and h.isascii() and h[-1:] not in NOT_NAME_END and ":" not in h and " " not in h:
                    slots, mask, mm, names, files, index = probe
                    hb = h.encode() + b"\n"  # index keys end with a newline: one slice compares key and length
                    dom = ()
                    k = hb.count(b".") + 1  # labels in hb[i + 1:]
                    i = -1
                    for d in self._depths:  # descending: most specific first
                        if d > k:
                            continue
                        while k > d:
                            i = hb.find(b".", i + 1)
                            k -= 1
                        key = hb[i + 1:]
                        hv = crc32(key)
                        j = (hv << 1) & mask
                        while v := slots[j]:  # a slot: crc32 << 32 | key offset, category << 32 | line
                            if v >> 32 == hv:
                                o = v & M32
                                if mm[o:o + len(key)] == key:
                                    w = slots[j + 1]
                                    c = w >> 32
                                    dom += (names[c], files[c], w & M32, h[i + 1:]) if c != MULTI \
                                        else index.multi(w, h[i + 1:])
                                    break
                            j = (j + 2) & mask
                    if len(cache) >= HOST_CACHE:
                        cache.clear()
                    cache[host] = dom
                else:
                    dom = self._cache_host_hits(host)
            if not dom:
                return ALLOWED
            if not pols and len(dom) == 4:  # the common hit: one category decides, no dict, no loops
                cat, src, line, entry = dom
                verdict = self._category_verdict.get(cat)
                return ALLOWED if verdict is None else Decision(verdict, cat, src, None, entry, None, line)
            hits = {}
            for k in range(0, len(dom), 4):
                cat = dom[k]
                if cat not in hits:
                    hits[cat] = (dom[k + 1], dom[k + 3], dom[k + 2])
        else:
            hits = self._category_hits(host, url)
            if not hits:
                return ALLOWED
        for cat in self.allow:
            if cat in hits:
                src, entry, line = hits[cat]
                return Decision("allow", cat, src, None, entry, None, line)
        if pols:
            now = when or self.clock()
            for p in pols:
                if p.schedule is not None and not p.schedule.matches(now):
                    continue
                sched = str(p.schedule) if p.schedule is not None else None
                for cat in p.allow:
                    if cat in hits:
                        src, entry, line = hits[cat]
                        return Decision("allow", cat, src, p.name, entry, sched, line)
                for cat in p.block:
                    if cat in hits:
                        src, entry, line = hits[cat]
                        return Decision("block", cat, src, p.name, entry, sched, line)
        for cat in self.block:
            if cat in hits:
                src, entry, line = hits[cat]
                return Decision("block", cat, src, None, entry, None, line)
        return ALLOWED

    def exempt_host(self, host: str) -> bool:
        """tls: intercept: is this host in an intercept_exempt category (tunnelled untouched)?"""
        if not self.exempt:
            return False
        hits = self._category_hits(host)
        return any(c in hits for c in self.exempt)


ALLOWED = Decision("allow", None, None, None)
