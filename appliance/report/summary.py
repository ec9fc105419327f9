"""The report as one JSON-ready dict (schema 1, docs/report.md#json): what the text, JSON and HTML views all show."""
from __future__ import annotations

import time
from dataclasses import asdict

from appliance.report.figures import Figures
from appliance.report.reader import Window
from appliance.report.times import hour_label, iso

SCHEMA = 1
TOP = 10  # rows in each top table


def summary(fig: Figures, window: Window, top: int = TOP, now: float | None = None) -> dict:
    """Every figure of the report; the JSON output is exactly this dict."""
    return {
        "schema": SCHEMA,
        "generated": iso(time.time() if now is None else now),
        "period": {"since": iso(window.since), "until": iso(window.until), "first": iso(fig.first),
                   "last": iso(fig.last)},
        "client_filter": str(window.net) if window.net is not None else None,
        "requests": fig.requests,
        "blocked": fig.blocked,
        "blocked_share": round(fig.blocked_share, 6),
        "bytes": fig.bytes,
        "categories": [{"category": k, "blocks": n} for k, n in fig.categories.top(top)],
        "refused": sum(fig.refusals.counts.values()),
        "refusals": [{"reason": k, "count": n} for k, n in fig.refusals.top(top)],
        "untagged_blocks": fig.untagged_blocks,
        "top_blocked_domains": [{"domain": k, "blocks": n} for k, n in fig.blocked_domains.top(top)],
        "top_clients": [{"client": k, "requests": n} for k, n in fig.clients.top(top)],
        "top_blocked_clients": [{"client": k, "blocks": n} for k, n in fig.blocking_clients.top(top)],
        "hours": [{"hour": hour_label(h), "start": iso(h * 3600), "requests": r, "blocks": b}
                  for h, r, b in fig.series()],
        "exact": fig.exact,
        "max_error": fig.max_error,
        "skipped": fig.skipped,
        "bad_lines": fig.bad_lines,
        "bad_samples": list(fig.bad_samples),
        "sources": [asdict(s) for s in fig.sources],
    }


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (the text and HTML views)."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"
