"""Which layout a source has (UT1 `blacklists/<cat>/`, Shallalist `BL/<cat>/`, or plain `<cat>/`), and which of
its categories this cluster takes under which name (lists.categories)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from appliance.core.rules import CATEGORY_RE
from appliance.lists.errors import refused
from filters.lists import KINDS

MARKERS = {"blacklists": "UT1", "BL": "Shallalist"}
_PART = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SHOWN = 12  # names listed in a message
# categories one update takes at most (UT1 has about 100): each is a directory of up to three files in the synced
# tree, which holds at most sync.tree.MAX_FILES entries; an update the sync would then refuse must never go live
MAX_CATEGORIES = 1000


@dataclass
class Layout:
    name: str  # "UT1" | "Shallalist" | "plain"
    root: str  # the directory holding the categories inside the source ("" for the source's top)
    categories: dict[str, dict[str, str]]  # upstream name (nested: "recreation/sports") -> kind -> file in the source


@dataclass
class Selection:
    """What an update takes: our category -> [(upstream category, kind -> source file)], and what it leaves."""

    take: dict[str, list[tuple[str, dict[str, str]]]] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)


def _split(rel: str) -> tuple[str, str, str] | None:
    """(layout, root, category) of a list file path, or None when it is no list file of a known layout."""
    parts = rel.split("/")
    if len(parts) < 2 or parts[-1] not in KINDS:
        return None
    for depth in (0, 1):  # `blacklists/...`, or one wrapping directory around it
        if len(parts) > depth + 2 and parts[depth] in MARKERS:
            return MARKERS[parts[depth]], "/".join(parts[: depth + 1]), "/".join(parts[depth + 1: -1])
    if len(parts) == 2:
        return "plain", "", parts[0]
    return None


def detect(files: list[str], shown: str) -> Layout:
    """The source's layout from its file names; refused when none is recognised."""
    found: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    for rel in files:
        hit = _split(rel)
        if hit is None:
            continue
        layout, root, cat = hit
        if all(_PART.match(p) and p not in (".", "..") for p in cat.split("/")):
            found.setdefault((layout, root), {}).setdefault(cat, {})[rel.rsplit("/", 1)[1]] = rel
    for want in ("UT1", "Shallalist", "plain"):
        roots = sorted(k for k in found if k[0] == want)
        if len(roots) > 1:
            raise refused(f"{shown}: {want} lists in more than one place ({', '.join(r for _, r in roots)}); "
                          f"give one of them as SOURCE")
        if roots:
            return Layout(want, roots[0][1], found[roots[0]])
    tops = sorted({f.split("/", 1)[0] for f in files})
    raise refused(f"{shown}: unknown layout: no blacklists/<category>/domains (UT1), BL/<category>/domains "
                  f"(Shallalist) or <category>/domains; top level: {', '.join(tops[:SHOWN]) or 'nothing'}")


def _names(cats) -> str:
    names = sorted(cats)
    return ", ".join(names[:SHOWN]) + (f" ... ({len(names)} in all)" if len(names) > SHOWN else "")


def select(layout: Layout, mapping: dict[str, str], shown: str) -> Selection:
    """lists.categories (upstream -> ours) picks and renames; empty takes every category under its own name
    (a nested Shallalist name such as recreation/sports becomes recreation-sports). Refused over MAX_CATEGORIES."""
    sel = _select(layout, mapping, shown)
    if len(sel.take) > MAX_CATEGORIES:
        raise refused(f"{shown}: {len(sel.take)} categories to take, over the {MAX_CATEGORIES} an update takes "
                      f"(docs/lists.md); name the ones this cluster uses in lists.categories")
    return sel


def _select(layout: Layout, mapping: dict[str, str], shown: str) -> Selection:
    sel = Selection()
    if mapping:
        missing = [up for up in mapping if up not in layout.categories]
        if missing:
            raise refused(f"lists.categories: {', '.join(repr(m) for m in missing)} not in {shown} "
                          f"({layout.name} layout; it has {_names(layout.categories)})")
        for up, ours in sorted(mapping.items()):
            sel.take.setdefault(ours, []).append((up, layout.categories[up]))
        sel.left = sorted(set(layout.categories) - set(mapping))
        return sel
    for up, files in sorted(layout.categories.items()):
        ours = up.replace("/", "-")
        if CATEGORY_RE.match(ours):
            sel.take.setdefault(ours, []).append((up, files))
        else:
            sel.left.append(up)
    return sel
