"""Requests and blocks from the access log: per minute over the last hour (the chart) and today's report summary,
in one pass through appliance.report's streaming reader, cached for a short while."""
from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

from appliance.core.logfiles import with_rotations
from appliance.report.figures import Figures
from appliance.report.parse import Record
from appliance.report.reader import Window, read_all

CACHE_SECONDS = 30.0  # a page reload does not read the day's log again
MINUTES = 60
TOP = 5


class _Today(Figures):
    """The report's figures for today, plus per-minute [requests, blocks] from `first_minute` on."""

    def __init__(self, first_minute: int) -> None:
        super().__init__()
        self.first_minute = first_minute
        self.minutes: dict[int, list[int]] = {}

    def add(self, r: Record) -> None:
        super().add(r)
        m = int(r.ts) // 60
        if m >= self.first_minute:
            slot = self.minutes.setdefault(m, [0, 0])
            slot[0] += 1
            if r.denied:
                slot[1] += 1


def read_traffic(access_log: Path, now: float | None = None) -> dict:
    """{"chart": [[epoch minute start, requests, blocks] x 60, oldest first], "today": the summary}."""
    now = time.time() if now is None else now
    last = int(now) // 60
    first = last - MINUTES + 1
    midnight = datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    fig = _Today(first)
    # the last hour may reach into yesterday (just after midnight): read from whichever is earlier
    since = min(midnight, first * 60)
    read_all(with_rotations(access_log), fig, Window(since=since))
    chart = [[m * 60, *fig.minutes.get(m, (0, 0))] for m in range(first, last + 1)]
    return {"chart": chart, "today": _summary(fig, midnight) if since >= midnight else _summary_since(
        access_log, midnight)}


def _summary(fig: Figures, since: float) -> dict:
    errors = [s.error for s in fig.sources if s.error]
    return {"since": since, "requests": fig.requests, "blocked": fig.blocked,
            "blocked_share": round(fig.blocked_share, 4), "clients": len(fig.clients.counts),
            "categories": fig.categories.top(TOP), "blocked_domains": fig.blocked_domains.top(TOP),
            "refusals": fig.refusals.top(TOP), "bad_lines": fig.bad_lines, "errors": errors}


def _summary_since(access_log: Path, since: float) -> dict:
    fig = Figures()
    read_all(with_rotations(access_log), fig, Window(since=since))
    return _summary(fig, since)


class Traffic:
    """read_traffic() for one access log, at most once per CACHE_SECONDS (thread-safe)."""

    def __init__(self, access_log: Path) -> None:
        self.access_log = Path(access_log)
        self.lock = threading.Lock()
        self.cached: tuple[float, dict] | None = None

    def get(self) -> dict:
        with self.lock:
            now = time.monotonic()
            if self.cached is None or now - self.cached[0] > CACHE_SECONDS:
                self.cached = (now, read_traffic(self.access_log))
            return self.cached[1]
