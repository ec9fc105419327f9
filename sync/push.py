"""The master side of `appliance sync`: cut a generation when the tree changed, then rsync + receive on every peer."""
from __future__ import annotations

import logging
import os
import resource
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.core.state import role_of
from filters import ruleset
from sync import delta, indextrust, lock, policy, tree
from sync import keys as keymod
from sync.background import Compile
from sync.check import validate_tree
from sync.errors import BAD_INPUT, OK, PEER_FAILED, SPLIT_BRAIN, STALE, SyncError
from sync.journal import note
from sync.peer import (Peer, cancel_receive, finish_receive, make_peers, remote_status, rsync_to, shared_connections,
                       start_receive)
from sync.receive import reload_carp, reload_proxy
from sync.releases import MAX_GEN, MAX_STEP, Releases, mirror
from sync.timing import Phases
from sync.uncut import uncut

Progress = Callable[[str, str], None]  # (peer, stage)


class Beside(threading.Thread):
    """fn() in a thread beside the main one (work that waits on ssh, rsync or hashing, which free the GIL);
    wait() joins it and raises what fn raised."""

    def __init__(self, fn: Callable[[], None]):
        super().__init__(daemon=True)
        self.fn, self.error = fn, None
        self.start()

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as e:  # noqa: BLE001 - raised by wait() in the main thread
            self.error = e

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


@dataclass
class Plan:
    live: int | None
    digest: str
    cut: bool
    generation: int
    reasons: list[str] = field(default_factory=list)


def plan_cut(rel: Releases, work: Path, above: int | None = None, digest: str | None = None) -> Plan:
    """Decide whether this sync cuts a new generation from the working tree, and its number.

    `above`: with --force over peers that are newer or diverged, the new generation goes above theirs.
    `digest`: the working tree's hash when the caller has it already."""
    live = rel.live()
    digest = digest or tree.tree_hash(work)
    gens = rel.generations()
    reasons = []
    if live is None:
        reasons.append("no live release yet")
    else:
        m = rel.meta(live, compute=False)
        if not m.get("meta"):
            reasons.append(f"release {live} has no sync metadata (as installed)")
        elif m["hash"] != digest:
            reasons.append(f"the tree changed since generation {live}")
        if gens and live < max(gens):
            reasons.append(f"generation {live} was rolled back to; it goes out as a new generation")
    # a release numbered far above the live one (forged, or a runaway counter) does not set the next number
    top = max([g for g in gens if live is None or g <= live + MAX_STEP] + [0])
    if above is not None and (above >= MAX_GEN or above > top + MAX_STEP):
        reasons.append(f"--force: the peers' generation {above} is out of range (more than {MAX_STEP} above ours); "
                       f"generation {top + 1} replaces it")
    elif above is not None:
        reasons.append(f"--force: a generation above the peers' ({above}) is cut")
        top = max(top, above)
    if reasons and top >= MAX_GEN:
        raise SyncError(f"generation {top} is the last one; roll back to an older release (`appliance releases "
                        f"--rollback N`) and sync --force from there", BAD_INPUT)
    if reasons:
        return Plan(live, digest, True, top + 1, reasons)
    return Plan(live, digest, False, live, reasons)


def needs_check(rel: Releases, work: Path, digest: str | None = None) -> bool:
    """False only when the working tree is exactly the live, already checked generation (the cron no-op case)."""
    live = rel.live()
    if live is None or live != max(rel.generations()):
        return True
    m = rel.meta(live, compute=False)
    return not m.get("meta") or (digest or tree.tree_hash(work)) != m["hash"]


def stale_peers(live: int | None, ours_meta: dict, peers: dict[str, dict]) -> list[str]:
    """Peers whose live generation is newer than ours, or the same number with other content."""
    out = []
    ours = live or 0
    for name, s in peers.items():
        pg = s.get("generation") or 0
        if pg > ours:
            out.append(f"{name} has generation {pg}, newer than ours ({ours})")
        elif pg == ours and pg and s.get("meta") and ours_meta.get("meta") and s.get("hash") != ours_meta.get("hash"):
            out.append(f"{name}'s generation {pg} differs from ours (changed on {name}?)")
    return out


def narrow_secret(path: Path, state: Path) -> None:
    """The cluster file holds the CARP pass and a release keeps its modes on every node: cut it only as 0600."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        note(state, f"{path} holds the CARP pass: mode {mode:o} narrowed to 600 before the cut", logging.WARNING)


def sync(cfg: Appliance, node: str, config_path: Path, paths: Paths, force: bool = False, dry_run: bool = False,
         bwlimit: int | None = None, progress: Progress | None = None, wait_lock: float = 0.0) -> dict:
    """One `appliance sync` run; returns the report (with "exit"). Raises SyncError for whole-run refusals.
    `wait_lock`: seconds to wait for a sync already running before BUSY (exit 5)."""
    t0 = time.monotonic()
    progress = progress or (lambda peer, stage: None)
    role = role_of(paths)
    if role != "MASTER":
        msg = f"this node ({node}) is {role or 'without a recorded role'}, not MASTER: nothing to sync"
        note(paths.state, msg)
        return {"ok": True, "exit": OK, "skipped": msg, "node": node, "role": role, "peers": []}
    with lock.held(paths.run, wait_lock):
        run = Run(cfg, node, Path(config_path), paths, force, dry_run, bwlimit, progress)
        return run.go(t0)


@dataclass
class Run:
    """One sync run on the master, under the sync lock: check, ask the peers, cut, push, report."""

    cfg: Appliance
    node: str
    config_path: Path
    paths: Paths
    force: bool
    dry_run: bool
    bwlimit: int | None
    progress: Progress
    results: dict[str, dict] = field(default_factory=dict)

    phases: Phases = field(default_factory=Phases)
    checked: str = "unchanged"
    compiling: Compile | None = None
    base: Path | None = None  # the staging mirror when it holds the live generation as it went live (delta.base_tree)
    compile_failed: bool = False

    def go(self, t0: float) -> dict:
        state, work, ph = self.paths.state, self.config_path.resolve().parent, self.phases
        if not self.dry_run:
            narrow_secret(self.config_path.resolve(), state)
        with ph("tree check"):  # what the peers would refuse is refused here first: the same check, every path
            tree.refuse(tree.check_staged(work, self.cfg.sync.max_file_mb << 20), f"the config tree {work}")
        if self.force:
            note(state, f"sync --force on {self.node}: peers' generation checks are overridden", logging.WARNING)
        rel = Releases(state)
        with ph("hash"):
            digest = tree.tree_hash(work)
        key, missing = self.push_key(work)
        peers = make_peers(self.cfg, self.node, work, key) if missing is None else []
        with shared_connections(peers, str(self.paths.state)):  # closed before the summary
            statuses = self.check_and_ask(rel, work, digest, peers)
            if missing is not None:
                raise missing
            above = self.guard(rel, peers, statuses)
            plan = plan_cut(rel, work, above, digest)
            if plan.cut:
                self.check_policy(rel, work, statuses)
            report = {"ok": True, "node": self.node, "dry_run": self.dry_run, "generation": plan.generation,
                      "previous": plan.live, "cut": plan.cut, "reasons": plan.reasons, "hash": plan.digest, "peers": [],
                      "check": self.checked, "check_seconds": ph.wall.get("check", 0.0)}
            tidy = None
            try:
                if plan.cut and not self.dry_run:
                    tidy = self.cut(rel, work, plan, report)
                src = rel.path(plan.generation) if not (plan.cut and self.dry_run) else work
                target_hash = plan.digest if plan.cut else rel.meta(plan.generation)["hash"]
                for p in peers:
                    if p.name not in self.results:
                        with ph(f"push {p.name}"):
                            self.results[p.name] = self.push(p, statuses[p.name], plan, target_hash, src)
            finally:
                self.finish_compile(rel, plan, report)
                if tidy is not None:
                    tidy.wait()
                if self.compile_failed:  # never leave live here a release this node cannot compile
                    report["uncut"] = uncut(rel, work, plan.live, plan.generation, bool(report.get("restored_pristine")))
            if plan.cut and not self.dry_run and not self.compile_failed:
                # the proxy once its index is current; its own CARP changes after the peers
                report["proxy"] = reload_proxy(self.paths)
                report["carp"] = reload_carp(self.paths)
        return self.summary(report, peers, t0)

    def check_and_ask(self, rel: Releases, work: Path, digest: str, peers: list[Peer]) -> dict[str, dict]:
        """The tree's check here and the peers' status, at once (one waits on the CPU, the other on ssh)."""
        statuses: dict[str, dict] = {}

        def ask() -> None:
            with self.phases("status"):
                statuses.update(self.ask_peers(peers))

        asking = Beside(ask)
        try:
            with self.phases("check"):
                self.checked = self.check(rel, work, digest)
        finally:
            asking.wait()
        return statuses

    def push_key(self, work: Path) -> tuple[Path, SyncError | None]:
        """This node's sync key, or the error for a missing key / known_hosts (raised after the tree's check)."""
        key = keymod.push_key(self.paths.sync_key, work)
        for p in (key, keymod.known_hosts(work)):
            if not p.exists():
                return key, SyncError(f"{p}: missing (run `appliance keys init` on this node and pin the peers' host "
                                      f"keys)", BAD_INPUT)
        if key != self.paths.sync_key:
            note(self.paths.state, f"pushing with the old shared key {key} (in the synced tree: any node's root can use "
                                   f"it); run `appliance keys init` on every node (docs/security.md)", logging.WARNING)
        return key, None

    def check(self, rel: Releases, work: Path, digest: str) -> str:
        """The tree's check before a cut: "unchanged" (the live generation, checked when it went live), "changed
        lines" (the config, and the list lines that differ from the generation that went live here: sync/delta.py;
        the index is compiled in the background after the cut), or "full" (`check --compile` into the tree)."""
        if not needs_check(rel, work, digest):
            return "unchanged"
        self.base = base = delta.base_tree(rel)
        if base is not None and delta.check_changed(work, base) is not None:  # loads work's config again: the
            # one the command loaded may predate the tree's hash
            return "changed lines"
        with indextrust.trusted_previous(rel, rel.live()) as previous:
            validate_tree(work, previous=previous)  # and compile the list index into the tree before the cut
        return "full"

    def start_compile(self, rel: Releases, gen: int, previous: int | None) -> None:
        """Compile the new release's index in a child while the peers are pushed (not needed when the full check
        compiled it into the tree: the copy carries it), reusing the unchanged categories of release `previous`."""
        release = rel.path(gen)
        if os.environ.get("APPLIANCE_SYNC_NO_COMPILE") == "1":
            return
        if ruleset.is_fresh(self.cfg, release):
            indextrust.record(rel, gen, ruleset.index_path(release))  # the new release's compiled/ is root's yet
            return
        self.compiling = Compile(self.cfg, release, rel, previous)

    def finish_compile(self, rel: Releases, plan: Plan, report: dict) -> None:
        if self.compiling is None:
            return
        with self.phases("master compile (wait)"):
            try:
                report["compile"] = self.compiling.wait()
                indextrust.record(rel, plan.generation, ruleset.index_path(rel.path(plan.generation)))
            except ruleset.ListError as e:  # the checks passed: an I/O error, a full disk, a hung compiler
                self.compile_failed = True
                report.update(ok=False, error=f"compiling this node's index failed: {e}")
                note(self.paths.state, report["error"], logging.ERROR)
            finally:
                self.compiling = None

    def check_policy(self, rel: Releases, work: Path, statuses: dict[str, dict]) -> None:
        """Before a cut: the tree carries no code, and no CARP change that would split the cluster (compared with
        the generation as it went live: the staging mirror while its hash is that generation's, else the live
        release; a vhid change only while the peers' CARP is stopped). Staging alone is not trusted: a peer's sync key
        can rsync into it (sync-serve), and a tree put there must not decide what this node may push."""
        policy.check_no_code(work)
        base = self.base if self.base is not None else delta.base_tree(rel)
        live = rel.live()
        if base is None and live is not None:
            base = rel.path(live)
        old = policy.live_config(base)
        new = policy.live_config(work)
        if new is not None:
            running = any(s.get("carp_running", True) for s in statuses.values())
            policy.check_carp_step(old, new, running, own=[n for n in statuses if n != self.node])
            policy.check_trust_files(base if old is not None else None, work, running)

    def ask_peers(self, peers: list[Peer]) -> dict[str, dict]:
        statuses: dict[str, dict] = {}
        for p in peers:
            self.progress(p.name, "status")
            try:
                statuses[p.name] = remote_status(p)
            except SyncError as e:
                self.results[p.name] = {"peer": p.name, "address": p.address, "ok": False, "action": "failed",
                                        "error": str(e), "exit": e.exit_code}
        return statuses

    def guard(self, rel: Releases, peers: list[Peer], statuses: dict[str, dict]) -> int | None:
        """Refuse split brain and stale pushes; drop peers that are not BACKUP. Returns the generation to cut above."""
        state = self.paths.state
        split = [n for n, s in statuses.items() if s.get("role") == "MASTER"]
        if split:
            msg = f"split brain: {', '.join(split)} also say{'s' if len(split) == 1 else ''} MASTER; refusing to push (check CARP and the sync link)"
            note(state, msg, logging.ERROR)
            raise SyncError(msg, SPLIT_BRAIN)
        for name, st in list(statuses.items()):
            if st.get("role") != "BACKUP" and not self.force:
                self.results[name] = {"peer": name, "address": next(p.address for p in peers if p.name == name), "ok": False,
                                      "action": "failed", "exit": PEER_FAILED,
                                      "error": f"{name} says {st.get('role')}, not BACKUP: not pushing (--force pushes anyway)"}
                del statuses[name]
        live = rel.live()
        stale = stale_peers(live, rel.meta(live) if live is not None else {}, statuses)
        if stale and not self.force:
            msg = "refusing to push: " + "; ".join(stale) + " (an old master must not overwrite newer changes; --force overrides)"
            note(state, msg, logging.WARNING)
            raise SyncError(msg, STALE)
        return max((s.get("generation") or 0) for s in statuses.values()) if stale else None

    def cut(self, rel: Releases, work: Path, plan: "Plan", report: dict) -> Beside:
        """Make the working tree live here as the new generation; its index is compiled in the background when the
        check did not compile it (the proxy is reloaded after that). Returns the thread that puts the old release
        back as it went live, mirrors the new one into staging and prunes: nothing the push needs, so it runs beside
        it (join it before the report)."""
        with self.phases("cut"):
            self.progress("local", "cut")
            rel.prepare_dirs()
            live_dir = rel.path(plan.live) if plan.live is not None else (rel.current.resolve() if rel.current.is_dir() else None)
            # a "changed lines" check left the tree's compiled/ stale: not copied, compiled into the release instead
            rel.install(work, plan.generation, plan.digest, f"cut on {self.node}", carry_from=live_dir,
                        derived=self.checked != "changed lines")
            rel.activate(plan.generation)
            self.start_compile(rel, plan.generation, plan.live)
            note(self.paths.state, f"cut generation {plan.generation} on {self.node} ({'; '.join(plan.reasons)})")
            self.progress("local", "done")
        report["cut_seconds"] = self.phases.wall["cut"]

        def tidy() -> None:
            with self.phases("tidy (beside the push)"):
                if plan.live is not None:
                    report["restored_pristine"] = rel.restore_pristine(plan.live)
                mirror(rel.path(plan.generation), rel.staging, transfer=True)
                rel.write_staging_meta(plan.generation, plan.digest)
                report["pruned"] = rel.prune(self.cfg.sync.keep_releases)

        return Beside(tidy)

    def push(self, p: Peer, s: dict, plan: "Plan", target_hash: str, src: Path) -> dict:
        """rsync into one peer's staging dir and ask it to receive; a failure stays with this peer."""
        res = {"peer": p.name, "address": p.address, "generation_before": s.get("generation")}
        if not plan.cut and s.get("generation") == plan.generation and s.get("hash") == target_hash:
            return {**res, "ok": True, "action": "up-to-date", "exit": OK}
        t1 = time.monotonic()
        cmd = f"receive {plan.generation} {target_hash}" + (" --force" if self.force else "")
        waiting = None if self.dry_run else start_receive(p, cmd)  # starts on the peer while the transfer runs
        try:
            self.progress(p.name, "transfer")
            try:
                res.update(rsync_to(p, src, dry_run=self.dry_run, bwlimit=self.bwlimit))
            except BaseException:
                cancel_receive(waiting)
                raise
            if self.dry_run:
                res.update(ok=True, action="would-push", exit=OK)
            else:
                self.progress(p.name, "receive")
                reply = finish_receive(p, cmd, waiting, f"refused generation {plan.generation}")
                res.update(ok=True, action="pushed", exit=OK, receive=reply)
        except SyncError as e:
            res.update(ok=False, action="failed", error=str(e), exit=e.exit_code)
        except Exception as e:  # a broken link to one peer does not stop the others
            res.update(ok=False, action="failed", error=f"{p.name}: {type(e).__name__}: {e}", exit=PEER_FAILED)
        res["seconds"] = round(time.monotonic() - t1, 3)
        self.progress(p.name, "done" if res["ok"] else "failed")
        return res

    def summary(self, report: dict, peers: list[Peer], t0: float) -> dict:
        report["peers"] = [self.results[p.name] for p in peers]
        failed = [r for r in report["peers"] if not r["ok"]]
        codes = {r["exit"] for r in failed}
        report["failed"] = [r["peer"] for r in failed]
        report["ok"] = report["ok"] and not failed
        report["exit"] = OK if not failed else (codes.pop() if len(codes) == 1 else PEER_FAILED)
        if not report["ok"] and not failed:  # this node's own compile failed (finish_compile)
            report["exit"] = BAD_INPUT
        report["seconds"] = round(time.monotonic() - t0, 3)
        report["phases"] = self.phases.report()
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        report["cpu"] = {"self": round(me.ru_utime + me.ru_stime, 3), "children": round(kids.ru_utime + kids.ru_stime, 3)}
        for r in failed:
            note(self.paths.state, f"sync to {r['peer']} failed: {r['error']}", logging.ERROR)
        return report
