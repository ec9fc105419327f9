"""`appliance lists update`: source -> checked new lists tree -> swap -> proxy reload -> on the MASTER, the sync
that cuts a generation of it and pushes it (the same `appliance sync` the timer runs)."""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.core.state import role_of
from appliance.lists import archive, fetch, layout, swap, validate
from appliance.lists.errors import ListsError, refused
from sync import lock
from sync.errors import BUSY, SyncError
from sync.journal import note
from sync.push import sync as run_sync
from sync.receive import reload_proxy

SYNC_WAIT = 300.0  # seconds the update's sync waits for a timer sync that holds the lock
SHOWN = 20  # skipped member names listed in the report
UPDATE_LOCK = "lists-update.lock"


@dataclass
class Request:
    cfg: Appliance
    config_path: Path
    node: str
    paths: Paths
    source: str | None = None
    sha256: str | None = None
    dry_run: bool = False
    force: bool = False  # on a node that is not MASTER
    scheduled: bool = False  # the timer's run: a quiet no-op unless MASTER
    sync: bool = True  # on the MASTER: run the sync after the swap


def role_gate(req: Request) -> tuple[str | None, dict | None]:
    """(role, a skip report or None). A node that is not MASTER updates only with --force: the master's lists reach
    it by sync, and the master's next generation replaces whatever it took on its own."""
    role = role_of(req.paths)
    if role == "MASTER":
        return role, None
    msg = f"this node ({req.node}) is {role or 'without a recorded role'}, not MASTER"
    if req.scheduled:
        note(req.paths.state, f"lists update: {msg}: nothing to do (the master updates, sync brings it here)")
        return role, {"ok": True, "exit": 0, "skipped": f"{msg}: nothing to do", "node": req.node, "role": role}
    if req.force or req.dry_run:  # a dry run changes nothing anywhere
        return role, None
    raise refused(f"{msg}: lists are updated on the master and reach the backups by `appliance sync`; "
                  f"--force updates this node's lists anyway (until the master's next generation replaces them)")


def _fetch(req: Request, src: fetch.Source, work: Path, report: dict) -> None:
    if src.kind == "url":
        src.path = work / "download"
        report["bytes"] = fetch.download(src.text, src.path)
    if src.kind != "directory":
        src.file = open(src.path, "rb")  # noqa: SIM115 - closed by update(); hashed and read from this one file
        report["sha256"] = fetch.check_sha(src.file, src.sha256, src.text)


def _plan(req: Request, src: fetch.Source, report: dict):
    source = archive.open_source(src.kind, src.path if src.kind == "directory" else src.file, src.text)
    listing = source.listing()
    lay = layout.detect(list(listing.files), src.text)
    sel = layout.select(lay, req.cfg.lists.categories, src.text)
    cap = req.cfg.sync.max_file_mb << 20
    for cat, ups in sel.take.items():
        for up, kinds in ups:
            for rel in kinds.values():
                if listing.files[rel] > cap:
                    raise refused(f"{src.text}: {rel}: {listing.files[rel]} bytes, over sync.max_file_mb "
                                  f"({req.cfg.sync.max_file_mb} MiB): a sync could not carry it")
    report.update(layout=lay.name, left=sel.left, skipped=listing.skipped[:SHOWN],
                  skipped_count=len(listing.skipped))
    return source, sel


def _live_dir(req: Request) -> Path:
    live = req.cfg.lists_dir(req.config_path.resolve().parent)
    if live.is_symlink():
        raise refused(f"filter.lists: {live} is a symlink; point filter.lists at the directory itself (the update "
                      f"swaps the directory)")
    if live.exists() and not live.is_dir():
        raise refused(f"filter.lists: {live} is not a directory")
    return live


def _build_check(req: Request, source, sel, live: Path, at: Path, work: Path, report: dict) -> Path:
    """The new tree at `at`, counted and compiled; refused (and removed) if it does not pass."""
    base = req.config_path.resolve().parent
    try:
        swap.build(live, at, source, sel.take)
        report["categories"] = validate.check(req.cfg, at, live, {c: [u for u, _ in ups] for c, ups in sel.take.items()})
        report["compiled_entries"] = swap.compile_check(req.cfg, base, at, work / "check.idx")
        swap.sync_check(req.cfg, base, live, at)
    except BaseException:
        shutil.rmtree(at, ignore_errors=True)
        raise
    return at


def _apply(req: Request, source, sel, work: Path, report: dict) -> None:
    """Under the sync lock (no sync cuts or receives a half-built tree): build beside the live tree, swap, index."""
    with lock.held(req.paths.run, SYNC_WAIT):
        live = _live_dir(req)
        for stale in swap.leftovers(live):  # an interrupted update's trees: never half-applied, just removed
            shutil.rmtree(stale, ignore_errors=True)
        at = live.with_name(f".{live.name}{swap.NEW_TAG}{os.getpid()}")
        new = _build_check(req, source, sel, live, at, work, report)
        try:
            swap.install(req.cfg, req.config_path.resolve().parent, live, new)
        finally:
            shutil.rmtree(new, ignore_errors=True)  # gone after a swap; after a failed one, the unused new tree
    report["lists"] = str(live)
    note(req.paths.state, f"lists update from {report['source']}: {len(report['categories'])} categories "
                          f"({', '.join(sorted(report['categories']))}) live in {live}")


def _sync(req: Request, report: dict) -> int:
    """On the MASTER: `appliance sync` cuts the changed tree as a generation and pushes it; its exit is ours."""
    try:
        r = run_sync(req.cfg, req.node, req.config_path, req.paths, wait_lock=SYNC_WAIT)
    except SyncError as e:
        note(req.paths.state, f"lists update: the sync after it failed: {e} (the next `appliance sync` retries)",
             logging.WARNING)
        report["sync"] = {"ok": False, "error": str(e), "exit": e.exit_code}
        return e.exit_code
    report["sync"] = {k: r.get(k) for k in ("ok", "exit", "generation", "previous", "cut", "failed", "skipped")
                      if k in r}
    return r["exit"]


def update(req: Request) -> dict:
    """One update; returns the report (with "exit"). Raises ListsError (or SyncError BUSY) when refused or failed,
    with the live lists and the generation as they were."""
    t0 = time.monotonic()
    role, skip = role_gate(req)
    if skip is not None:
        return skip
    work = req.paths.state / "lists-update"
    src = None
    try:
        with _one_update(req.paths):  # one work dir per node: a second update waits for none, it is refused
            src = fetch.resolve(req.source, req.sha256, req.cfg, req.config_path.resolve().parent)
            try:
                report = _run(req, role, src, work)
            finally:
                if src.file is not None:
                    src.file.close()
                shutil.rmtree(work, ignore_errors=True)
    except ListsError as e:
        shown = req.source or req.cfg.lists.source
        note(req.paths.state, f"lists update from {shown} refused: {str(e).splitlines()[0]}", logging.WARNING)
        raise
    report["seconds"] = round(time.monotonic() - t0, 3)
    return report


@contextmanager
def _one_update(paths: Paths) -> Iterator[None]:
    """Hold `<run>/lists-update.lock` (its own lock, not the sync's: the update takes the sync lock for the swap
    and its sync): two updates would share and remove each other's work dir."""
    paths.run.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.run / UPDATE_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ListsError(f"another lists update is running (pid {holder}, lock {paths.run / UPDATE_LOCK})",
                             BUSY) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _run(req: Request, role: str | None, src: fetch.Source, work: Path) -> dict:
    report: dict = {"ok": True, "exit": 0, "node": req.node, "role": role, "dry_run": req.dry_run,
                    "source": src.text, "kind": src.kind}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700, parents=True)
    _fetch(req, src, work, report)
    source, sel = _plan(req, src, report)
    if req.dry_run:
        _build_check(req, source, sel, _live_dir(req), work / "lists", work, report)
        return report
    _apply(req, source, sel, work, report)
    report["proxy"] = reload_proxy(req.paths)
    if role == "MASTER" and req.sync:
        report["exit"] = _sync(req, report)
        report["ok"] = report["exit"] == 0
    return report
