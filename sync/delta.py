"""The master's check of its changed lists against the generation it last made live: only the lines that differ."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.core.loader import load
from appliance.core.model import Appliance
from filters import lists as flists
from filters import ruleset
from sync import tree
from sync.errors import BAD_INPUT, SyncError
from sync.releases import Releases

CONFIG_NAME = "appliance.yaml"


def base_tree(rel: Releases) -> Path | None:
    """The staging mirror, when it still holds exactly the live generation as it went live (its hash recomputed
    here, from its bytes), else None. That generation passed the full check when it went live on this node (cut
    here, or received and checked as a backup), so its lines need not be parsed again."""
    live, sm = rel.live(), rel.staging_meta()
    # a base mirrored under another list parser: its lines were read another way, so every line is checked again
    if live is None or not sm or sm.get("generation") != live or sm.get("parser") != ruleset.PARSER_VERSION:
        return None
    m = rel.meta(live, compute=False)
    if not m.get("meta") or sm.get("hash") != m["hash"] or tree.tree_hash(rel.staging) != m["hash"]:
        return None
    return rel.staging


def _common_prefix(a: bytes, b: bytes) -> int:
    """Bytes a and b share at the start: memcmp of 1 MiB, then 16 KiB, 256 and 1-byte steps."""
    n, i = min(len(a), len(b)), 0
    ma, mb = memoryview(a), memoryview(b)
    for step in (1 << 20, 1 << 14, 1 << 8, 1):
        while i + step <= n and ma[i:i + step] == mb[i:i + step]:
            i += step
    return i


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """Bytes a and b share at the end, at most `limit` (so that it does not overlap their common prefix)."""
    j = 0
    ma, mb = memoryview(a), memoryview(b)
    la, lb = len(a), len(b)
    for step in (1 << 20, 1 << 14, 1 << 8, 1):
        while j + step <= limit and ma[la - j - step:la - j] == mb[lb - j - step:lb - j]:
            j += step
    return j


def changed_lines(old: bytes, new: bytes) -> tuple[int, list[bytes]]:
    """(number of the first line given, the lines of `new` to check): the lines between the longest common line
    prefix and suffix of old and new, less those that occur anywhere in old. Each list line is valid or not on its
    own (filters.lists parses line by line), so a line old already had was checked when old went live."""
    p = _common_prefix(old, new)
    p = new.rfind(b"\n", 0, p) + 1  # back to the start of the line the difference is in
    e = len(new) - _common_suffix(old, new, min(len(old), len(new)) - p)
    end = new.find(b"\n", e)  # a newline inside the common suffix: old has the same one, the lines after it are old's
    end = len(new) if end < 0 else end
    middle = new[p:end].split(b"\n")
    first = new.count(b"\n", 0, p) + 1
    if len(middle) > 64:  # a larger edit: drop the lines old has anywhere (a moved block is not parsed again)
        seen = set(old.split(b"\n"))
        return first, [l if l not in seen else b"" for l in middle]
    return first, middle


@dataclass
class _Lines:
    """What filters.lists.parse_file reads (its read_bytes): only the changed lines, blanks in place of the others."""

    data: bytes

    def read_bytes(self) -> bytes:
        return self.data


def _bad_lines(new_file: Path, old_file: Path | None, kind: str, shown: str) -> list[str]:
    """The bad lines of new_file among those old_file (checked when it went live) lacks; None: every line."""
    new = new_file.read_bytes()
    old = old_file.read_bytes() if old_file is not None and old_file.is_file() else b""
    first, lines = changed_lines(old, new)
    parsed = flists.parse_file(_Lines(b"\n".join(lines)), kind, shown)  # type: ignore[arg-type]
    for b in parsed.bad:
        b.line += first - 1
    return [str(b) for b in parsed.bad]


def check_changed(work: Path, base: Path, cfg: Appliance | None = None) -> Appliance | None:
    """The config loaded in full (or `cfg`, work's config as the caller loaded it) and every list line that differs
    from base checked, raising SyncError(BAD_INPUT) with the compiler's message (file:line) when filter.bad_lines is
    reject. None when this check does not apply (base's config does not load, or filter.lists / bad_lines changed):
    the caller runs the full check. A category base's config did not reference is parsed in full: its files may
    have sat in base's tree unchecked (the compiler reads only referenced categories), so base proves nothing."""
    try:
        cfg, old = cfg or load(work / CONFIG_NAME), load(base / CONFIG_NAME)
    except Exception:  # noqa: BLE001 - the full check reports the new config's errors; an old one that fails: full
        return None
    lists = Path(cfg.filter.lists)
    if lists.is_absolute() or ".." in lists.parts or cfg.filter.lists != old.filter.lists \
            or cfg.filter.bad_lines != old.filter.bad_lines:
        return None
    bad: list[str] = []
    checked_before = old.filter.categories()
    for cat in sorted(cfg.filter.categories()):
        for kind in flists.KINDS:
            f = cfg.lists_dir(work) / cat / kind
            if f.is_file():
                prior = old.lists_dir(base) / cat / kind if cat in checked_before else None
                try:
                    bad += _bad_lines(f, prior, kind, str(lists / cat / kind))
                except OSError as e:
                    raise SyncError(f"{lists / cat / kind}: cannot read: {e}", BAD_INPUT) from None
    if bad and cfg.filter.bad_lines == "reject":
        shown = bad[:ruleset.MAX_BAD_SHOWN]
        more = f"\n... {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
        raise SyncError("filter.bad_lines is reject and the lists have bad lines:\n" + "\n".join(shown) + more,
                        BAD_INPUT)
    return cfg
