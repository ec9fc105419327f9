"""The master side of `appliance sync`: cut a generation when the tree changed, then rsync + receive on every peer."""
from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.core.state import role_of
from sync import keys as keymod
from sync import lock, policy, tree
from sync.check import validate_tree
from sync.errors import BAD_INPUT, OK, PEER_FAILED, SPLIT_BRAIN, STALE, SyncError
from sync.journal import note
from sync.peer import Peer, ask, make_peers, remote_status, rsync_to
from sync.receive import reload_carp, reload_proxy
from sync.releases import MAX_GEN, MAX_STEP, Releases, mirror

Progress = Callable[[str, str], None]  # (peer, stage)


@dataclass
class Plan:
    live: int | None
    digest: str
    cut: bool
    generation: int
    reasons: list[str] = field(default_factory=list)


def plan_cut(rel: Releases, work: Path, above: int | None = None) -> Plan:
    """Decide whether this sync cuts a new generation from the working tree, and its number.

    `above`: with --force over peers that are newer or diverged, the new generation goes above theirs."""
    live = rel.live()
    digest = tree.tree_hash(work)
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


def needs_check(rel: Releases, work: Path) -> bool:
    """False only when the working tree is exactly the live, already checked generation (the cron no-op case)."""
    live = rel.live()
    if live is None or live != max(rel.generations()):
        return True
    m = rel.meta(live, compute=False)
    return not m.get("meta") or tree.tree_hash(work) != m["hash"]


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

    def go(self, t0: float) -> dict:
        state, work = self.paths.state, self.config_path.resolve().parent
        if not self.dry_run:
            narrow_secret(self.config_path.resolve(), state)
        # what the peers would refuse is refused here first: the same check, every path of the tree
        tree.refuse(tree.check_staged(work, self.cfg.sync.max_file_mb << 20), f"the config tree {work}")
        if self.force:
            note(state, f"sync --force on {self.node}: peers' generation checks are overridden", logging.WARNING)
        rel = Releases(state)
        t_check = time.monotonic()
        if needs_check(rel, work):
            validate_tree(work)  # and compile the list index into the tree before it is hashed and cut
        t_check = time.monotonic() - t_check
        key = keymod.push_key(self.paths.sync_key, work)
        for p in (key, keymod.known_hosts(work)):
            if not p.exists():
                raise SyncError(f"{p}: missing (run `appliance keys init` on this node and pin the peers' host keys)",
                                BAD_INPUT)
        if key != self.paths.sync_key:
            note(state, f"pushing with the old shared key {key} (in the synced tree: any node's root can use it); "
                        f"run `appliance keys init` on every node (docs/security.md)", logging.WARNING)
        peers = make_peers(self.cfg, self.node, work, key)
        statuses = self.ask_peers(peers)
        above = self.guard(rel, peers, statuses)
        plan = plan_cut(rel, work, above)
        if plan.cut:
            self.check_policy(rel, work, statuses)
        report = {"ok": True, "node": self.node, "dry_run": self.dry_run, "generation": plan.generation,
                  "previous": plan.live, "cut": plan.cut, "reasons": plan.reasons, "hash": plan.digest, "peers": [],
                  "check_seconds": round(t_check, 3)}
        if plan.cut and not self.dry_run:
            self.cut(rel, work, plan, report)
        src = rel.path(plan.generation) if not (plan.cut and self.dry_run) else work
        target_hash = plan.digest if plan.cut else rel.meta(plan.generation)["hash"]
        for p in peers:
            if p.name not in self.results:
                self.results[p.name] = self.push(p, statuses[p.name], plan, target_hash, src)
        if plan.cut and not self.dry_run:  # the master applies its own CARP changes last, after its peers
            report["carp"] = reload_carp(self.paths)
        return self.summary(report, peers, t0)

    def check_policy(self, rel: Releases, work: Path, statuses: dict[str, dict]) -> None:
        """Before a cut: the tree carries no code, and no CARP change that would split the cluster (compared with
        the generation as it went live, the staging mirror; a vhid change only while the peers' CARP is stopped)."""
        policy.check_no_code(work)
        old = policy.live_config(rel.staging if rel.staging_meta() is not None else None)
        new = policy.live_config(work)
        if new is not None:
            running = any(s.get("carp_running", True) for s in statuses.values())
            policy.check_carp_step(old, new, running, own=[n for n in statuses if n != self.node])
            policy.check_trust_files(rel.staging if old is not None else None, work, running)

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

    def cut(self, rel: Releases, work: Path, plan: "Plan", report: dict) -> None:
        """Make the working tree live here as the new generation, and the staging mirror of it."""
        t_cut = time.monotonic()
        self.progress("local", "cut")
        rel.prepare_dirs()
        live_dir = rel.path(plan.live) if plan.live is not None else (rel.current.resolve() if rel.current.is_dir() else None)
        rel.install(work, plan.generation, plan.digest, f"cut on {self.node}", carry_from=live_dir)
        rel.activate(plan.generation)
        if plan.live is not None:
            report["restored_pristine"] = rel.restore_pristine(plan.live)
        mirror(rel.path(plan.generation), rel.staging, transfer=True)
        rel.write_staging_meta(plan.generation, plan.digest)
        report["pruned"] = rel.prune(self.cfg.sync.keep_releases)
        report["proxy"] = reload_proxy(self.paths)
        note(self.paths.state, f"cut generation {plan.generation} on {self.node} ({'; '.join(plan.reasons)})")
        self.progress("local", "done")
        report["cut_seconds"] = round(time.monotonic() - t_cut, 3)

    def push(self, p: Peer, s: dict, plan: "Plan", target_hash: str, src: Path) -> dict:
        """rsync into one peer's staging dir and ask it to receive; a failure stays with this peer."""
        res = {"peer": p.name, "address": p.address, "generation_before": s.get("generation")}
        if not plan.cut and s.get("generation") == plan.generation and s.get("hash") == target_hash:
            return {**res, "ok": True, "action": "up-to-date", "exit": OK}
        t1 = time.monotonic()
        try:
            self.progress(p.name, "transfer")
            res.update(rsync_to(p, src, dry_run=self.dry_run, bwlimit=self.bwlimit))
            if self.dry_run:
                res.update(ok=True, action="would-push", exit=OK)
            else:
                self.progress(p.name, "receive")
                cmd = f"receive {plan.generation} {target_hash}" + (" --force" if self.force else "")
                reply = ask(p, cmd, f"refused generation {plan.generation}")
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
        report["ok"] = not failed
        report["exit"] = OK if not failed else (codes.pop() if len(codes) == 1 else PEER_FAILED)
        report["seconds"] = round(time.monotonic() - t0, 3)
        for r in failed:
            note(self.paths.state, f"sync to {r['peer']} failed: {r['error']}", logging.ERROR)
        return report
