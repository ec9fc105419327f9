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


def fingerprint(cfg: Appliance, base: Path) -> str:
    """Changes whenever a referenced list file, the category set or the bad-line policy changes."""
    lists_dir = cfg.lists_dir(base)
    parts: list = [cfg.filter.bad_lines, _cat_order(cfg), "depths"]  # "depths": indexes without them are recompiled
    for cat in _cat_order(cfg):
        for kind in flists.KINDS:
            f = lists_dir / cat / kind
            try:
                st = f.stat()
                parts.append([f"{cat}/{kind}", st.st_size, st.st_mtime_ns])
            except FileNotFoundError:
                parts.append([f"{cat}/{kind}", None])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def compile_index(cfg: Appliance, base: Path, out: Path | None = None) -> CompileReport:
    """Parse every referenced list and write the index; raises ListError under bad_lines: reject."""
    t0 = time.monotonic()
    out = out or index_path(base)
    fp = fingerprint(cfg, base)
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
    meta = {"fingerprint": fp, "single_label": single, "depths": depths, "urls": urls, "expressions": exprs, "bad": report.bad, "bad_count": report.bad_count}
    report.size = write_index(out, categories, domains, meta)
    report.seconds = time.monotonic() - t0
    return report


def is_fresh(cfg: Appliance, base: Path) -> bool:
    try:
        return read_meta(index_path(base)).get("fingerprint") == fingerprint(cfg, base)
    except (OSError, IndexFormatError):
        return False


def ensure_index(cfg: Appliance, base: Path, in_child: bool = True) -> CompileReport:
    """Compile when stale. in_child: do it in a forked process so its peak memory is returned to the OS."""
    path = index_path(base)
    if is_fresh(cfg, base):
        meta = read_meta(path)
        return CompileReport(path, entries=meta.get("entries", 0), bad=meta.get("bad", []), bad_count=meta.get("bad_count", 0))
    if not in_child or not hasattr(os, "fork"):
        return compile_index(cfg, base)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compile, report as JSON, exit without running parent cleanups
        os.close(r)
        try:
            rep = compile_index(cfg, base)
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
    return CompileReport(path, msg["entries"], msg["bad"], msg["bad_count"], msg["seconds"], True, msg["size"])


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
