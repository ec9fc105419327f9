"""Turn a validated appliance.yaml into a RuleEngine: compile the lists into the index when stale, then map it."""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from appliance.core import paths
from appliance.core.errors import ApplianceError
from appliance.core.loader import load as load_config
from appliance.core.model import Appliance
from filters import lists as flists
from filters.engine import PolicyRule, RuleEngine, ipv4_network
from filters.index import REC, DomainIndex, IndexFormatError, Section, read_meta, write_index

log = logging.getLogger("filters")
INDEX_NAME = "compiled/filter.idx"  # inside the config tree, so sync ships it with its lists
MAX_BAD_SHOWN = 20


class ListError(ApplianceError):
    """Lists rejected (filter.bad_lines: reject) or unreadable; the message names file:line."""

    exit_code = 2


@dataclass
class CompileReport:
    path: Path
    entries: int = 0
    bad: list[str] = field(default_factory=list)
    bad_count: int = 0
    seconds: float = 0.0
    compiled: bool = False
    size: int = 0
    parsed: list[str] = field(default_factory=list)  # categories whose lists were parsed
    reused: list[str] = field(default_factory=list)  # categories taken unchanged from the previous index


def index_path(base: Path) -> Path:
    return Path(base) / INDEX_NAME


def _cat_order(cfg: Appliance) -> list[str]:
    return sorted(cfg.filter.categories())


def _shown(cfg: Appliance, base: Path, cat: str, kind: str) -> str:
    lists = Path(cfg.filter.lists)
    return str(lists / cat / kind) if not lists.is_absolute() else str(lists / cat / kind)


# Part of both fingerprints: bump it when what they cover changes. An index made another way (no "content", or a
# "fingerprint" of another recipe) then never matches, so it is recompiled, never misread.
FINGERPRINT_VERSION = 3
# Part of each category section's record: bump it when filters.lists reads a line differently, so that a later
# compile parses every category again instead of reusing sections of the old reading.
PARSER_VERSION = 1
# compile_index(previous=NO_PREVIOUS): parse every category (not a regular file, so no index is read from it)
NO_PREVIOUS = Path(os.devnull)


def _sources(cfg: Appliance, base: Path) -> tuple[list, list[tuple[str, Path]]]:
    """What an index depends on besides the list bytes, and every list file the config references (name, path)."""
    lists_dir = cfg.lists_dir(base)
    policy = [FINGERPRINT_VERSION, cfg.filter.lists, cfg.filter.bad_lines, _cat_order(cfg)]
    return policy, [(f"{cat}/{kind}", lists_dir / cat / kind) for cat in _cat_order(cfg) for kind in flists.KINDS]


def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def fingerprint(cfg: Appliance, base: Path) -> str:
    """The fast check: size and mtime of every referenced list file (one stat each), the category set, bad_lines."""
    parts, files = _sources(cfg, base)
    for name, f in files:
        try:
            st = f.stat()
            parts.append([name, st.st_size, st.st_mtime_ns])
        except FileNotFoundError:
            parts.append([name, None])
    return _digest(parts)


def content_fingerprint(cfg: Appliance, base: Path) -> str:
    """The exact check: the bytes of every referenced list file. Only asked when fingerprint() differs, because
    mtimes move without the bytes changing: an image build clamps them to SOURCE_DATE_EPOCH, cp, tar and git reset
    them. Hashing is sha256 at ~1 GB/s (25 ms for a 1M-line, 30 MB list here), compiling that list takes seconds and
    may be impossible (a read-only release), so a start with moved mtimes stays fast and a start with the mtimes the
    index recorded costs only the stats."""
    parts, files = _sources(cfg, base)
    parts.append("content")
    for name, f in files:
        try:
            with open(f, "rb") as fh:
                parts.append([name, hashlib.file_digest(fh, "sha256").hexdigest()])
        except FileNotFoundError:
            parts.append([name, None])
    return _digest(parts)


def _read_category(cfg: Appliance, base: Path, cat: str) -> tuple[dict, dict]:
    """({kind: bytes or None}, {kind: sha256 or None}) of a category's list files, each read once: what is hashed is
    what is parsed."""
    data, digests = {}, {}
    for kind in flists.KINDS:
        f = cfg.lists_dir(base) / cat / kind
        try:
            data[kind] = f.read_bytes() if f.exists() else None
        except OSError as e:
            raise ListError(f"{_shown(cfg, base, cat, kind)}: cannot read: {e}") from None
        digests[kind] = hashlib.sha256(data[kind]).hexdigest() if data[kind] is not None else None
    return data, digests


def _previous(path: Path | None) -> DomainIndex | None:
    """An earlier index of this node whose unchanged categories may be reused; None (a full compile) when there is
    none or it cannot be read, is of another format or parser version."""
    if path is None or not Path(path).is_file():
        return None
    try:
        prev = DomainIndex(path)
        if prev.meta.get("parser") == PARSER_VERSION and isinstance(prev.meta.get("categories"), list):
            return prev
        prev.close()
    except Exception as e:  # noqa: BLE001 - whatever is wrong with it, the compile parses every category instead
        log.info("previous list index %s not used: %s", path, e)
    return None


def _reuse(prev: DomainIndex | None, cid: int, cmeta: dict) -> Section | None:
    """The category's section of the previous index when its list files have the same bytes (sha256 of what was
    read now) and the same shown names; None when it must be parsed. A section whose checksum fails is parsed."""
    if prev is None:
        return None
    for old_id, old in enumerate(prev.meta["categories"]):
        if isinstance(old, dict) and old.get("name") == cmeta["name"]:
            break
    else:
        return None
    if any(old.get(k) != cmeta[k] for k in ("digests", *flists.KINDS)) or "urls_parsed" not in old:
        return None
    try:
        sec = prev.section(old_id)
    except (KeyError, TypeError, ValueError):
        sec = None
    if sec is None:
        return None
    sec.recs[3::REC] = array("I", [cid]) * (len(sec.recs) // REC)
    cmeta.update({k: old[k] for k in ("bad", "bad_count", "urls_parsed", "expressions_parsed")})
    return sec


def _parse_category(cid: int, cmeta: dict, data: dict) -> Section:
    """Parse a category's list files: its section; bad lines, URL prefixes and expressions into cmeta."""
    sec, bad, count = Section.empty(), [], 0
    urls, exprs = [], []
    for kind in flists.KINDS:
        if data[kind] is None:
            continue
        if kind == "domains":
            part = flists.parse_domains(data[kind], cmeta[kind])
            sec, found = Section.from_part(part, cid), part.bad
        else:
            parsed = flists.parse_bytes(data[kind], kind, cmeta[kind])
            found = parsed.bad
            (urls if kind == "urls" else exprs).extend(list(e) for e in parsed.entries)
        count += len(found)
        bad.extend(str(b) for b in found[:MAX_BAD_SHOWN])
    cmeta.update({"bad": bad, "bad_count": count, "urls_parsed": urls, "expressions_parsed": exprs})
    return sec


def compile_index(cfg: Appliance, base: Path, out: Path | None = None, previous: Path | None = None) -> CompileReport:
    """Read and hash every referenced list, parse the categories whose files changed since `previous` (an index
    this node compiled; default: the one at `out`), reuse the others' sections, write the index. Raises ListError
    under bad_lines: reject (reused categories' bad lines count too)."""
    out = out or index_path(base)
    prev = _previous(previous if previous is not None else out)
    if prev is None:
        return _compile(cfg, base, out, None)
    try:
        return _compile(cfg, base, out, prev)
    except ListError:
        raise
    except Exception as e:  # noqa: BLE001 - a previous index that breaks the merge only costs a full compile
        log.warning("reusing the previous list index failed (%s: %s): full compile", type(e).__name__, e)
        return _compile(cfg, base, out, None)


def _compile(cfg: Appliance, base: Path, out: Path, prev: DomainIndex | None) -> CompileReport:
    """compile_index with `prev` opened (closed here)."""
    t0 = time.monotonic()
    fp = fingerprint(cfg, base)  # before reading: a change meanwhile makes the index stale
    policy, _ = _sources(cfg, base)
    report = CompileReport(out, compiled=True)
    sections, categories, content = [], [], [*policy, "content"]
    try:
        for cid, cat in enumerate(_cat_order(cfg)):
            data, digests = _read_category(cfg, base, cat)
            content.extend([f"{cat}/{k}", digests[k]] for k in flists.KINDS)
            cmeta = {"name": cat, **{k: _shown(cfg, base, cat, k) for k in flists.KINDS}, "digests": digests}
            sec = _reuse(prev, cid, cmeta)
            (report.reused if sec is not None else report.parsed).append(cat)
            sections.append(sec if sec is not None else _parse_category(cid, cmeta, data))
            categories.append(cmeta)
            del data
    finally:
        if prev is not None:
            prev.close()
    report.bad = [b for c in categories for b in c["bad"]]
    report.bad_count = sum(c["bad_count"] for c in categories)
    if report.bad_count and cfg.filter.bad_lines == "reject":
        raise ListError("filter.bad_lines is reject and the lists have bad lines:\n" + "\n".join(report.bad)
                        + (f"\n... {report.bad_count - len(report.bad)} more" if report.bad_count > len(report.bad) else ""))
    depths = sorted(set().union(*(s.depths for s in sections)))  # the engine probes only suffixes with these label counts
    meta = {"fingerprint": fp, "content": _digest(content), "single_label": 1 in depths, "depths": depths,
            "bad": report.bad, "bad_count": report.bad_count, "parser": PARSER_VERSION, "categories": categories}
    try:
        report.size = write_index(out, sections, meta)
    except OSError as e:
        raise ListError(f"{out}: cannot write the list index: {e.strerror or e}") from None
    report.entries = meta["entries"] + sum(len(c["urls_parsed"]) + len(c["expressions_parsed"]) for c in categories)
    report.seconds = time.monotonic() - t0
    return report


def state_index_path() -> Path:
    """The index of a process that may not write the release: <state dir>/compiled/filter.idx."""
    return paths.state_dir() / INDEX_NAME


def _writable(d: Path) -> bool:
    """Whether this process may create files in d, or create d: the nearest existing directory decides (access(2)
    also says no on a read-only mount, such as the unit's ProtectSystem=strict view of /var/lib/appliance)."""
    for p in (d, *d.parents):
        if p.exists():
            return os.access(p, os.W_OK | os.X_OK)
    return False


def index_location(base: Path) -> tuple[list[Path], Path]:
    """(indexes that may be current, where to compile when none is). The release's own compiled/ when this process
    may write it: FreeBSD's rc.d hands compiled/ to the proxy user, and `appliance check --compile` or a sync's
    check runs as root. Else (the Debian unit's proxy: the release is root's 0700 and mounted read-only for it) the
    release's index is still used when current, and a stale one is compiled into the proxy's own state dir, which
    the unit lets it write: a stale baked index costs one compile at start, never a crash loop."""
    own = index_path(base)
    if _writable(own.parent):
        return [own], own
    return [own, state_index_path()], state_index_path()


def _current(cfg: Appliance, base: Path, path: Path, memo: dict) -> dict | None:
    """The metadata of the index at path when it is current for the config's lists, else None. memo keeps the
    content fingerprint between candidates (the lists are hashed at most once)."""
    try:
        meta = read_meta(path)
        if meta.get("fingerprint") == fingerprint(cfg, base):
            return meta
        if not meta.get("content"):
            return None  # an index from before content fingerprints: recompiled
        if "content" not in memo:
            memo["content"] = content_fingerprint(cfg, base)
        return meta if meta["content"] == memo["content"] else None
    except (OSError, IndexFormatError):
        return None


def is_fresh(cfg: Appliance, base: Path) -> bool:
    """Whether the release's own index (compiled/filter.idx) is current for the config's lists."""
    return _current(cfg, base, index_path(base), {}) is not None


def ensure_index(cfg: Appliance, base: Path, in_child: bool = True) -> CompileReport:
    """A current index, compiled when none is. in_child: compile in a forked process so its peak memory is returned
    to the OS."""
    candidates, out = index_location(base)
    memo: dict = {}
    for path in candidates:
        meta = _current(cfg, base, path, memo)
        if meta is not None:
            return CompileReport(path, entries=meta.get("entries", 0), bad=meta.get("bad", []), bad_count=meta.get("bad_count", 0))
    if out != index_path(base):
        log.warning("%s is stale and %s is read-only for this process: compiling the lists into %s",
                    index_path(base), index_path(base).parent, out)
    if not in_child or not hasattr(os, "fork"):
        return compile_index(cfg, base, out, _previous_path(candidates, out))
    return _compile_in_child(cfg, base, out, _previous_path(candidates, out))


def _previous_path(candidates: list[Path], out: Path) -> Path | None:
    """The stale index to reuse unchanged categories from: the one being replaced, else the release's own."""
    return next((p for p in (out, *candidates) if p.is_file()), None)


def _compile_in_child(cfg: Appliance, base: Path, out: Path, previous: Path | None = None) -> CompileReport:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compile, report as JSON, exit without running parent cleanups
        os.close(r)
        try:
            rep = compile_index(cfg, base, out, previous)
            msg = {"ok": True, "entries": rep.entries, "bad": rep.bad, "bad_count": rep.bad_count, "seconds": rep.seconds,
                   "size": rep.size, "parsed": rep.parsed, "reused": rep.reused}
        except ListError as e:
            msg = {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            msg = {"ok": False, "error": f"compiling the lists failed: {e!r}"}
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(msg))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    try:
        msg = json.loads(data)
    except ValueError:
        raise ListError("compiling the lists failed (the compiler process died)") from None
    if not msg["ok"]:
        raise ListError(msg["error"])
    return CompileReport(out, msg["entries"], msg["bad"], msg["bad_count"], msg["seconds"], True, msg["size"],
                         msg["parsed"], msg["reused"])


def url_rules(meta: dict) -> tuple[dict, dict]:
    """The engine's URL prefixes (host -> [(prefix, category, "file:line", entry)]) and expressions (category ->
    [(regex, "file:line")]) from the index's categories, in category and line order."""
    urls: dict[str, list] = {}
    exprs: dict[str, list] = {}
    for c in meta["categories"]:
        for host, prefix, line in c["urls_parsed"]:
            urls.setdefault(host, []).append((prefix, c["name"], f"{c['urls']}:{line}", f"{host}{prefix}"))
        if c["expressions_parsed"]:
            exprs[c["name"]] = [(rx, f"{c['expressions']}:{line}") for rx, line in c["expressions_parsed"]]
    return urls, exprs


def build_engine(cfg: Appliance, base: Path, compile_in_child: bool = True, clock=None) -> tuple[RuleEngine, CompileReport]:
    """The engine the proxy and `appliance explain` use. Raises ListError (bad lists) or IndexFormatError."""
    report = ensure_index(cfg, base, compile_in_child)
    for b in report.bad:
        log.warning("bad list line skipped: %s", b)
    if report.bad_count > len(report.bad):
        log.warning("... and %d more bad list lines", report.bad_count - len(report.bad))
    index = DomainIndex(report.path)
    urls, exprs = url_rules(index.meta)
    f = cfg.filter
    policies = [
        PolicyRule(p.name or f"policy[{i}]", tuple(ipv4_network(n) for n in p.clients), tuple(p.allow), tuple(p.block), p.schedule)
        for i, p in enumerate(f.policies)
    ]
    eng = RuleEngine(index=index, clients=cfg.proxy.clients, allow=f.allow, block=f.block, policies=policies,
                 exempt=f.intercept_exempt, url_prefixes=urls, expressions=exprs, clock=clock)
    gc.collect()
    gc.freeze()  # full collections must not walk what we just loaded
    return eng, report


def load(config_path: Path, compile_in_child: bool = True) -> tuple[Appliance, RuleEngine, CompileReport]:
    """Config + engine, or raise ConfigError / ListError with a message naming the file."""
    cfg = load_config(config_path)
    base = Path(config_path).resolve().parent
    eng, rep = build_engine(cfg, base, compile_in_child)
    return cfg, eng, rep
