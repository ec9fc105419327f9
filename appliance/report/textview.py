"""The terminal summary: rich tables of the summary dict (totals, top tables, per hour, refusals, bad lines)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from appliance.report.summary import human_bytes

MAX_HOUR_ROWS = 48  # more hours than this: the terminal shows the busiest ones only (the page and JSON have all)
# C0, DEL and C1 controls: a log line (or a peer's) may carry terminal escapes (clear screen, window title, OSC 52
# clipboard writes) and rich prints them as they are
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}


def printable(text: str) -> str:
    """Text from a log or a peer for the terminal: every control character shown as \\xNN, never sent raw."""
    return str(text).translate(_CONTROLS)


def _table(title: str, head: tuple[str, ...], rows: list[tuple], empty: str = "none") -> Table:
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, min_width=44)
    for i, h in enumerate(head):
        t.add_column(h, justify="right" if i else "left")
    for r in rows:
        t.add_row(*(Text(printable(str(x))) for x in r))  # log text is never markup nor an escape
    if not rows:
        t.add_row(empty, *([""] * (len(head) - 1)))
    return t


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def render(s: dict, console: Console) -> None:
    """Print the report for a person at a terminal."""
    p = s["period"]
    console.print(Text(f"Access report  {p['first'] or '-'} .. {p['last'] or '-'}"
                       + (f"  clients in {s['client_filter']}" if s["client_filter"] else ""), style="bold"), soft_wrap=True)
    totals = _table("Totals", ("", "value"), [
        ("requests", s["requests"]), ("blocked", f"{s['blocked']} ({_pct(s['blocked'], s['requests'])})"),
        ("bytes", human_bytes(s["bytes"])), ("blocked without a tag", s["untagged_blocks"]),
        ("lines outside the filters", s["skipped"]), ("bad lines", s["bad_lines"])])
    console.print(totals)
    req = s["requests"]
    console.print(_table("Top categories (blocks)", ("category", "blocks"),
                         [(r["category"], r["blocks"]) for r in s["categories"]]))
    console.print(_table("Top blocked domains", ("domain", "blocks"),
                         [(r["domain"], r["blocks"]) for r in s["top_blocked_domains"]]))
    console.print(_table("Top clients by requests", ("client", "requests", "share"),
                         [(r["client"], r["requests"], _pct(r["requests"], req)) for r in s["top_clients"]]))
    console.print(_table("Top clients by blocks", ("client", "blocks"),
                         [(r["client"], r["blocks"]) for r in s["top_blocked_clients"]]))
    console.print(_table("Refusals by reason", ("reason", "count"), [(r["reason"], r["count"]) for r in s["refusals"]]))
    hours = s["hours"]
    if len(hours) > MAX_HOUR_ROWS:
        hours = sorted(sorted(hours, key=lambda h: -h["requests"])[:MAX_HOUR_ROWS], key=lambda h: h["hour"])
    console.print(_table("Per hour" + (" (busiest)" if len(hours) < len(s["hours"]) else ""),
                         ("hour", "requests", "blocks"), [(h["hour"], h["requests"], h["blocks"]) for h in hours]))
    _footer(s, console)


def _footer(s: dict, console: Console) -> None:
    if not s["exact"]:
        console.print(f"[yellow]more distinct domains or clients than the report keeps exactly: top counts may be low "
                      f"by up to {s['max_error']}[/yellow]")
    for src in s["sources"]:
        if src["error"]:
            console.print(printable(f"{src['file']}: read stopped after line {src['lines']}: {src['error']}"), style="red",
                          markup=False, soft_wrap=True)
    for line in s["bad_samples"]:
        console.print(printable(f"bad line {line}"), style="yellow", markup=False, soft_wrap=True)
