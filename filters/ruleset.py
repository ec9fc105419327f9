"""Turn a validated appliance.yaml into a RuleEngine: compile the lists into the index when stale, then map it."""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.core import paths
from appliance.core.errors import ApplianceError
from appliance.core.loader import load as load_config
from appliance.core.model import Appliance
from filters import lists as flists
from filters.engine import PolicyRule, RuleEngine, ipv4_network
from filters.index import DomainIndex, IndexFormatError, read_meta, write_index

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


def compile_index(cfg: Appliance, base: Path, out: Path | None = None) -> CompileReport:
    """Parse every referenced list and write the index; raises ListError under bad_lines: reject."""
    t0 = time.monotonic()
    out = out or index_path(base)
    fp, content = fingerprint(cfg, base), content_fingerprint(cfg, base)  # before parsing: a change meanwhile is stale
    lists_dir = cfg.lists_dir(base)
    cats = _cat_order(cfg)
    report = CompileReport(out, compiled=True)
    domains: dict[bytes, object] = {}
    urls: dict[str, list] = {}
    exprs: dict[str, list] = {}
    categories = []
    for cid, cat in enumerate(cats):
        files = {k: _shown(cfg, base, cat, k) for k in flists.KINDS}
        categories.append({"name": cat, **files})
        for kind in flists.KINDS:
            f = lists_dir / cat / kind
            if not f.exists():
                continue
            try:
                parsed = flists.parse_file(f, kind, files[kind])
            except OSError as e:
                raise ListError(f"{files[kind]}: cannot read: {e}") from None
            report.bad_count += len(parsed.bad)
            report.bad.extend(str(b) for b in parsed.bad[: MAX_BAD_SHOWN])
            if kind == "domains":
                hi = cid << 32
                for host, line in parsed.entries:
                    key = host.encode()
                    v = hi | line
                    old = domains.get(key)
                    if old is None:
                        domains[key] = v
                    elif isinstance(old, list):
                        if not any(o >> 32 == cid for o in old):
                            old.append(v)
                    elif old >> 32 != cid:
                        domains[key] = [old, v]
            elif kind == "urls":
                for host, prefix, line in parsed.entries:
                    urls.setdefault(host, []).append([prefix, cat, f"{files[kind]}:{line}", f"{host}{prefix}"])
            else:
                exprs[cat] = [[rx, f"{files[kind]}:{line}"] for rx, line in parsed.entries]
    if report.bad_count and cfg.filter.bad_lines == "reject":
        raise ListError("filter.bad_lines is reject and the lists have bad lines:\n" + "\n".join(report.bad)
                        + (f"\n... {report.bad_count - len(report.bad)} more" if report.bad_count > len(report.bad) else ""))
    report.entries = len(domains) + sum(len(v) for v in urls.values()) + sum(len(v) for v in exprs.values())
    single = any(b"." not in k for k in domains)
    depths = sorted({k.count(b".") + 1 for k in domains})  # the engine probes only suffixes with these label counts
    meta = {"fingerprint": fp, "content": content, "single_label": single, "depths": depths, "urls": urls, "expressions": exprs, "bad": report.bad, "bad_count": report.bad_count}
    try:
        report.size = write_index(out, categories, domains, meta)
    except OSError as e:
        raise ListError(f"{out}: cannot write the list index: {e.strerror or e}") from None
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
        return compile_index(cfg, base, out)
    return _compile_in_child(cfg, base, out)


def _compile_in_child(cfg: Appliance, base: Path, out: Path) -> CompileReport:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compile, report as JSON, exit without running parent cleanups
        os.close(r)
        try:
            rep = compile_index(cfg, base, out)
            msg = {"ok": True, "entries": rep.entries, "bad": rep.bad, "bad_count": rep.bad_count, "seconds": rep.seconds, "size": rep.size}
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
    return CompileReport(out, msg["entries"], msg["bad"], msg["bad_count"], msg["seconds"], True, msg["size"])


def build_engine(cfg: Appliance, base: Path, compile_in_child: bool = True, clock=None) -> tuple[RuleEngine, CompileReport]:
    """The engine the proxy and `appliance explain` use. Raises ListError (bad lists) or IndexFormatError."""
    report = ensure_index(cfg, base, compile_in_child)
    for b in report.bad:
        log.warning("bad list line skipped: %s", b)
    if report.bad_count > len(report.bad):
        log.warning("... and %d more bad list lines", report.bad_count - len(report.bad))
    index = DomainIndex(report.path)
    meta = index.meta
    urls = {h: [tuple(x) for x in v] for h, v in meta.get("urls", {}).items()}
    exprs = {c: [tuple(x) for x in v] for c, v in meta.get("expressions", {}).items()}
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
