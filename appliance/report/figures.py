"""The report's figures from a stream of Records in constant memory: counters, bounded top-N tables, hourly series."""
from __future__ import annotations

from dataclasses import dataclass, field

from appliance.report.parse import Record, host_of

DEFAULT_CAP = 100_000  # distinct keys one top-N table holds exactly (domains, clients): docs/report.md#limits
MAX_SAMPLES = 10  # bad lines quoted in the summary


class TopCounter:
    """Counts per key, at most `cap` keys: past the cap the least counted half is dropped (lossy counting), so a
    million distinct domains cost `cap` entries. `max_error` bounds how much any count may be low (0: exact)."""

    def __init__(self, cap: int = DEFAULT_CAP):
        self.cap = max(cap, 2)
        self.counts: dict[str, int] = {}
        self.max_error = 0
        self.dropped = 0

    def add(self, key: str, n: int = 1) -> None:
        c = self.counts
        c[key] = c.get(key, 0) + n
        if len(c) > self.cap:
            self._prune()

    def _prune(self) -> None:
        ranked = sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)
        keep = self.cap // 2
        self.max_error = max(self.max_error, ranked[keep][1])
        self.dropped += len(ranked) - keep
        self.counts = dict(ranked[:keep])

    @property
    def exact(self) -> bool:
        return self.dropped == 0

    def top(self, n: int) -> list[tuple[str, int]]:
        """The n largest counts, ties by key (a stable order for tests and diffs)."""
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


@dataclass
class Source:
    """One file read: where it came from, how many lines, how many were not records, and a read error if any."""

    file: str
    node: str | None = None
    lines: int = 0
    bad: int = 0
    error: str | None = None


@dataclass
class Figures:
    """Everything the report shows, added one Record at a time (add()); memory bounded by `cap` and the hours."""

    cap: int = DEFAULT_CAP
    requests: int = 0
    blocked: int = 0
    bytes: int = 0
    untagged_blocks: int = 0  # TCP_DENIED without the appliance's tag (a plain Squid log, or an older one)
    first: float | None = None
    last: float | None = None
    bad_lines: int = 0
    skipped: int = 0  # records outside --since/--until/--client
    bad_samples: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    hours: dict[int, list[int]] = field(default_factory=dict)  # epoch hour -> [requests, blocks]

    def __post_init__(self) -> None:
        self.categories = TopCounter(self.cap)
        self.refusals = TopCounter(self.cap)
        self.blocked_domains = TopCounter(self.cap)
        self.clients = TopCounter(self.cap)
        self.blocking_clients = TopCounter(self.cap)

    def add(self, r: Record) -> None:
        """Count one record (already filtered)."""
        self.requests += 1
        self.bytes += r.size
        ts = r.ts
        if self.first is None or ts < self.first:
            self.first = ts
        if self.last is None or ts > self.last:
            self.last = ts
        hour = int(ts) // 3600
        slot = self.hours.get(hour)
        if slot is None:
            slot = self.hours[hour] = [0, 0]
        slot[0] += 1
        self.clients.add(r.client)
        if r.code == "TCP_DENIED" or r.tag_kind is not None:
            self._blocked(r, slot)

    def _blocked(self, r: Record, slot: list[int]) -> None:
        self.blocked += 1
        slot[1] += 1
        self.blocking_clients.add(r.client)
        self.blocked_domains.add(host_of(r.url, r.method))
        kind = r.tag_kind
        if kind == "block":
            self.categories.add(r.tag_name or "none")
        elif kind == "refused":
            self.refusals.add(r.tag_name or "unknown")
        elif kind == "denied":
            self.refusals.add("client-not-allowed")
        else:
            self.untagged_blocks += 1

    def bad(self, where: str, why: str) -> None:
        self.bad_lines += 1
        if len(self.bad_samples) < MAX_SAMPLES:
            self.bad_samples.append(f"{where}: {why}")

    @property
    def blocked_share(self) -> float:
        return self.blocked / self.requests if self.requests else 0.0

    @property
    def exact(self) -> bool:
        return all(t.exact for t in (self.blocked_domains, self.clients, self.blocking_clients, self.categories,
                                     self.refusals))

    @property
    def max_error(self) -> int:
        return max(t.max_error for t in (self.blocked_domains, self.clients, self.blocking_clients, self.categories,
                                         self.refusals))

    def series(self, max_hours: int = 24 * 400) -> list[tuple[int, int, int]]:
        """(epoch hour, requests, blocks) from the first hour to the last, empty hours as zeros (only the hours seen
        when the span is over max_hours)."""
        if not self.hours:
            return []
        lo, hi = min(self.hours), max(self.hours)
        span = range(lo, hi + 1) if hi - lo < max_hours else sorted(self.hours)
        return [(h, *self.hours.get(h, (0, 0))) for h in span]
