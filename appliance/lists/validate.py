"""An update's size floor: entries and bad lines per file, counted by the proxy's own list parser; a taken category
below lists.min_entries, or below lists.min_ratio of what it has now, refuses the whole update."""
from __future__ import annotations

from pathlib import Path

from appliance.core.model import Appliance
from appliance.lists.errors import refused
from filters.lists import KINDS, parse_file


def count_category(d: Path, shown: str) -> dict:
    """{"entries": n, "bad_lines": n, "files": {kind: {"entries", "bad_lines"}}} of one category directory."""
    out: dict = {"entries": 0, "bad_lines": 0, "files": {}}
    for kind in KINDS:
        f = d / kind
        if not f.is_file():
            continue
        p = parse_file(f, kind, f"{shown}/{kind}")
        out["files"][kind] = {"entries": len(p.entries), "bad_lines": len(p.bad)}
        out["entries"] += len(p.entries)
        out["bad_lines"] += len(p.bad)
    return out


def check(cfg: Appliance, new: Path, live: Path, taken: dict[str, list[str]]) -> dict:
    """Per taken category: before/after counts; refused (all problems in one message) when one is too small."""
    report, problems = {}, []
    floor, ratio = cfg.lists.min_entries, cfg.lists.min_ratio
    for cat, ups in sorted(taken.items()):
        after = count_category(new / cat, f"{cat}")
        before = count_category(live / cat, f"{cat}")["entries"] if (live / cat).is_dir() else 0
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
