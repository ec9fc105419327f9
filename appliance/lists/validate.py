"""An update's size floor: entries and bad lines per file, counted line by line with the proxy's own line checks in a
bounded child; a taken category below lists.min_entries, or below lists.min_ratio of what it has now, refuses it."""
from __future__ import annotations

import os
import re
from pathlib import Path

from appliance.core.limits import LimitExceeded, run_bounded
from appliance.core.model import Appliance
from appliance.lists.errors import refused
from filters.lists import KINDS, parse_domain, parse_expression, parse_url_line

MAX_LINE = 64 << 10  # bytes of one list line looked at; a longer line is a bad line, read past in bounded pieces
_FAST = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_CHECK = {"domains": parse_domain, "urls": parse_url_line, "expressions": parse_expression}


def _good(text: str, kind: str) -> bool:
    """What filters.lists.parse_file decides for one stripped, non-comment line (its fast path for plain names)."""
    if kind == "domains":
        low = text.lower()
        if len(low) <= 253 and not low[-1].isdigit() and _FAST.match(low):
            return True
    try:
        _CHECK[kind](text)
    except ValueError:
        return False
    return True


def count_file(path: Path, kind: str) -> dict:
    """{"entries", "bad_lines"} of one list file, streamed: counts only, no line kept, each line at most MAX_LINE."""
    good = bad = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        while line := f.readline(MAX_LINE + 1):  # bounded by the file's size
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                bad += 1
                while line and not line.endswith(b"\n"):  # the rest of the over-long line, never kept
                    line = f.readline(1 << 16)
                continue
            raw = line.strip()
            if not raw or raw.startswith(b"#"):
                continue
            if _good(raw.decode("utf-8", "surrogateescape"), kind):
                good += 1
            else:
                bad += 1
    return {"entries": good, "bad_lines": bad}


def count_category(d: Path, shown: str = "") -> dict:
    """{"entries": n, "bad_lines": n, "files": {kind: {"entries", "bad_lines"}}} of one category directory."""
    out: dict = {"entries": 0, "bad_lines": 0, "files": {}}
    for kind in KINDS:
        f = d / kind
        if not f.is_file() or f.is_symlink():
            continue
        out["files"][kind] = c = count_file(f, kind)
        out["entries"] += c["entries"]
        out["bad_lines"] += c["bad_lines"]
    return out


def _count_all(new: Path, live: Path, cats: list[str]) -> dict:
    """Per category: the new tree's counts and the live tree's entries (0 when it has none)."""
    return {cat: (count_category(new / cat), count_category(live / cat)["entries"] if (live / cat).is_dir() else 0)
            for cat in cats}


def check(cfg: Appliance, new: Path, live: Path, taken: dict[str, list[str]]) -> dict:
    """Per taken category: before/after counts (in a child bounded in memory, CPU and time: the source is not ours);
    refused (all problems in one message) when one is too small."""
    report, problems = {}, []
    floor, ratio = cfg.lists.min_entries, cfg.lists.min_ratio
    try:
        counts = run_bounded(_count_all, new, live, sorted(taken), what=f"the count of the new lists ({new})")
    except LimitExceeded as e:
        raise refused(f"{e}\nthe live lists are unchanged") from None
    for cat, ups in sorted(taken.items()):
        after, before = counts[cat]
        report[cat] = {"from": ups, "before": before, **after}
        if after["entries"] < floor:
            problems.append(f"{cat} (from {', '.join(ups)}): {after['entries']} entries, below lists.min_entries "
                            f"({floor})")
        elif before and after["entries"] < ratio * before:
            problems.append(f"{cat} (from {', '.join(ups)}): {after['entries']} entries, below lists.min_ratio "
                            f"({ratio:g}) of the {before} it has now")
    if problems:
        raise refused("the update is refused (an empty or truncated source never replaces good lists); the live "
                      "lists are unchanged:\n" + "\n".join(problems))
    return report
