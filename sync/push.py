"""The master side of `appliance sync`: cut a generation when the tree changed, then rsync + receive on every peer."""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sync import keys as keymod
from appliance.core.config import Appliance
from appliance.core.state import read_role
from sync import lock, tree
from sync.check import validate_tree
from sync.errors import BAD_INPUT, OK, PEER_FAILED, SPLIT_BRAIN, STALE, SyncError
from sync.journal import note
from sync.receive import reload_carp, reload_proxy
from sync.releases import Releases, mirror
from sync.serve import STAGING_TOKEN

Progress = Callable[[str, str], None]  # (peer, stage)


@dataclass
class Peer:
    """How to reach one peer on the sync link, with the pinned host key and the sync key."""

    name: str
    address: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    bind: str | None
    timeout: int

    def ssh_argv(self) -> list[str]:
        argv = ["ssh", "-F", "/dev/null", "-i", str(self.key), "-p", str(self.port),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", f"ConnectTimeout={self.timeout}", "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]
        if self.bind:
            argv += ["-b", self.bind]
        return argv

    def connection(self):
        """A fabric Connection that only accepts the pinned host key (RejectPolicy, our known_hosts only)."""
        import paramiko
        from fabric import Config, Connection

        sock = socket.create_connection((self.address, self.port), timeout=self.timeout,
                                        source_address=(self.bind, 0) if self.bind else None)
        conn = Connection(self.address, user=self.user, port=self.port, connect_timeout=self.timeout,
                          config=Config(overrides={"load_ssh_configs": False}),
                          connect_kwargs={"key_filename": str(self.key), "look_for_keys": False, "allow_agent": False,
                                          "sock": sock, "banner_timeout": self.timeout, "auth_timeout": self.timeout})
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        conn.client = client
        return conn

    def run(self, command: str) -> tuple[int, str, str]:
        """Run one sync command on the peer (its forced command dispatches it)."""
        conn = self.connection()
        try:
            r = conn.run(command, hide=True, warn=True, in_stream=False, timeout=self.timeout * 10)
            return r.exited, r.stdout, r.stderr
        finally:
            conn.close()


def peer_error(stderr: str, fallback: str) -> str:
    """The peer's `appliance: error:` lines (its log lines on stderr are left out), else all it said."""
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    errors = [l.removeprefix("appliance: error: ") for l in lines if l.startswith("appliance: error: ")]
    return "\n".join(errors or lines) or fallback


def make_peers(cfg: Appliance, node: str, config_dir: Path) -> list[Peer]:
    me = cfg.nodes[node]
    return [Peer(name, str(n.sync.ip), cfg.sync.ssh_port, cfg.sync.user, keymod.sync_key(config_dir),
                 keymod.known_hosts(config_dir), str(me.sync.ip), cfg.sync.timeout)
            for name, n in cfg.peers(node).items()]


def remote_status(peer: Peer) -> dict:
    try:
        code, out, err = peer.run("status")
    except Exception as e:  # network, auth or host key failure: this peer only
        raise SyncError(f"{peer.name} ({peer.address}:{peer.port}): cannot ask its status: {type(e).__name__}: {e}", PEER_FAILED) from None
    if code != 0:
        raise SyncError(f"{peer.name}: status failed: {peer_error(err, f'exit {code}')}", code if code in (2, 3, 4, 5) else PEER_FAILED)
    try:
        data = json.loads(out)
        assert isinstance(data, dict)
        return data
    except (ValueError, AssertionError):
        raise SyncError(f"{peer.name}: status answer is not JSON: {out[:200]!r}", PEER_FAILED) from None


_ITEM = re.compile(r"^([<>ch.*][fdLDS]\S{9}|\*deleting)\s+(.*)$")
_SENT = re.compile(r"Total bytes sent:\s*([\d,.]+)")
_RECV = re.compile(r"Total bytes received:\s*([\d,.]+)")


def parse_rsync_output(text: str) -> dict:
    """Files added / changed / removed from --itemize-changes lines, bytes from --stats."""
    added, changed, removed = [], [], []
    for line in text.splitlines():
        m = _ITEM.match(line.rstrip())
        if not m:
            continue
        flags, name = m.group(1), m.group(2)
        if flags == "*deleting":
            if not name.endswith("/"):
                removed.append(name)
        elif flags[1] == "f" and flags[0] in "<>c":
            (added if "+++++++" in flags else changed).append(name)
    num = lambda rx: int(rx.search(text).group(1).replace(",", "").replace(".", "")) if rx.search(text) else None
    return {"added": added, "changed": changed, "removed": removed, "bytes_sent": num(_SENT), "bytes_received": num(_RECV)}


def rsync_to(peer: Peer, src: Path, dry_run: bool = False, bwlimit: int | None = None) -> dict:
    """rsync (built through sysrsync) the release into the peer's staging dir; --partial keeps cut-off files."""
    from sysrsync.command_maker import get_rsync_command

    options = ["-a", "--itemize-changes", "--stats", "--delete", "--partial", f"--timeout={peer.timeout}",
               "-e", shlex.join(peer.ssh_argv())]
    if dry_run:
        options.append("--dry-run")
    if bwlimit:
        options.append(f"--bwlimit={int(bwlimit)}")
    cmd = get_rsync_command(source=str(src), destination=STAGING_TOKEN, destination_ssh=f"{peer.user}@{peer.address}",
                            options=options, exclusions=tree.rsync_excludes(), sync_source_contents=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise SyncError(f"{peer.name}: rsync exited {r.returncode}: {peer_error(r.stderr, 'no message')}", PEER_FAILED)
    out = parse_rsync_output(r.stdout)
    out["transfer_seconds"] = round(time.monotonic() - t0, 3)
    return out


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
    top = max(gens + [0])
    if above is not None:
        reasons.append(f"--force: a generation above the peers' ({above}) is cut")
        top = max(top, above)
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


def sync(cfg: Appliance, node: str, config_path: Path, state: Path, force: bool = False, dry_run: bool = False,
         bwlimit: int | None = None, progress: Progress | None = None) -> dict:
    """One `appliance sync` run; returns the report (with "exit"). Raises SyncError for whole-run refusals."""
    t0 = time.monotonic()
    progress = progress or (lambda peer, stage: None)
    role = (read_role(base=state) or {}).get("role")
    if role != "MASTER":
        msg = f"this node ({node}) is {role or 'without a recorded role'}, not MASTER: nothing to sync"
        note(state, msg)
        return {"ok": True, "exit": OK, "skipped": msg, "node": node, "role": role, "peers": []}
    with lock.held(Path(state) / "run"):
        work = Path(config_path).resolve().parent
        if not dry_run:
            narrow_secret(Path(config_path).resolve(), state)
        rel = Releases(state)
        t_check = time.monotonic()
        if needs_check(rel, work):
            validate_tree(work)  # and compile the list index into the tree before it is hashed and cut
        t_check = time.monotonic() - t_check
        for p in (keymod.sync_key(work), keymod.known_hosts(work)):
            if not p.exists():
                raise SyncError(f"{p}: missing (run `appliance keys init` and pin the peers' host keys)", BAD_INPUT)
        peers = make_peers(cfg, node, work)
        statuses: dict[str, dict] = {}
        results: dict[str, dict] = {}
        for p in peers:
            progress(p.name, "status")
            try:
                statuses[p.name] = remote_status(p)
            except SyncError as e:
                results[p.name] = {"peer": p.name, "address": p.address, "ok": False, "action": "failed", "error": str(e), "exit": e.code}
        split = [n for n, s in statuses.items() if s.get("role") == "MASTER"]
        if split:
            msg = f"split brain: {', '.join(split)} also say{'s' if len(split) == 1 else ''} MASTER; refusing to push (check CARP and the sync link)"
            note(state, msg, logging.ERROR)
            raise SyncError(msg, SPLIT_BRAIN)
        for name, st in list(statuses.items()):
            if st.get("role") != "BACKUP" and not force:
                results[name] = {"peer": name, "address": next(p.address for p in peers if p.name == name), "ok": False,
                                 "action": "failed", "exit": PEER_FAILED,
                                 "error": f"{name} says {st.get('role')}, not BACKUP: not pushing (--force pushes anyway)"}
                del statuses[name]
        live = rel.live()
        ours_meta = rel.meta(live) if live is not None else {}
        stale = stale_peers(live, ours_meta, statuses)
        if stale and not force:
            msg = "refusing to push: " + "; ".join(stale) + " (an old master must not overwrite newer changes; --force overrides)"
            note(state, msg, logging.WARNING)
            raise SyncError(msg, STALE)
        above = max((s.get("generation") or 0) for s in statuses.values()) if stale else None
        plan = plan_cut(rel, work, above)
        report = {"ok": True, "node": node, "dry_run": dry_run, "generation": plan.generation, "previous": plan.live,
                  "cut": plan.cut, "reasons": plan.reasons, "hash": plan.digest, "peers": []}
        report["check_seconds"] = round(t_check, 3)
        if plan.cut and not dry_run:
            t_cut = time.monotonic()
            progress("local", "cut")
            live_dir = rel.path(plan.live) if plan.live is not None else None
            rel.install(work, plan.generation, plan.digest, f"cut on {node}", carry_from=live_dir)
            rel.activate(plan.generation)
            if plan.live is not None:
                report["restored_pristine"] = rel.restore_pristine(plan.live)
            mirror(rel.path(plan.generation), rel.staging)
            rel.write_staging_meta(plan.generation, plan.digest)
            report["pruned"] = rel.prune(cfg.sync.keep_releases)
            report["proxy"] = reload_proxy(state)
            report["carp"] = reload_carp(state)
            note(state, f"cut generation {plan.generation} on {node} ({'; '.join(plan.reasons)})")
            progress("local", "done")
            report["cut_seconds"] = round(time.monotonic() - t_cut, 3)
        src = rel.path(plan.generation) if not (plan.cut and dry_run) else work
        target_hash = plan.digest if plan.cut else rel.meta(plan.generation)["hash"]
        for p in peers:
            if p.name in results:
                continue
            s = statuses[p.name]
            res = {"peer": p.name, "address": p.address, "generation_before": s.get("generation")}
            if not plan.cut and s.get("generation") == plan.generation and s.get("hash") == target_hash:
                res.update(ok=True, action="up-to-date", exit=OK)
                results[p.name] = res
                continue
            t1 = time.monotonic()
            try:
                progress(p.name, "transfer")
                res.update(rsync_to(p, src, dry_run=dry_run, bwlimit=bwlimit))
                if dry_run:
                    res.update(ok=True, action="would-push", exit=OK)
                else:
                    progress(p.name, "receive")
                    cmd = f"receive {plan.generation} {target_hash}" + (" --force" if force else "")
                    code, out, err = p.run(cmd)
                    if code != 0:
                        raise SyncError(f"{p.name} refused generation {plan.generation}: {peer_error(err, f'exit {code}')}",
                                        code if code in (2, 3, 4, 5) else PEER_FAILED)
                    res.update(ok=True, action="pushed", exit=OK, receive=json.loads(out))
            except SyncError as e:
                res.update(ok=False, action="failed", error=str(e), exit=e.code)
            except Exception as e:  # a broken link to one peer does not stop the others
                res.update(ok=False, action="failed", error=f"{p.name}: {type(e).__name__}: {e}", exit=PEER_FAILED)
            res["seconds"] = round(time.monotonic() - t1, 3)
            progress(p.name, "done" if res["ok"] else "failed")
            results[p.name] = res
        report["peers"] = [results[p.name] for p in peers]
        failed = [r for r in report["peers"] if not r["ok"]]
        codes = {r["exit"] for r in failed}
        report["failed"] = [r["peer"] for r in failed]
        report["ok"] = not failed
        report["exit"] = OK if not failed else (codes.pop() if len(codes) == 1 else PEER_FAILED)
        report["seconds"] = round(time.monotonic() - t0, 3)
        for r in failed:
            note(state, f"sync to {r['peer']} failed: {r['error']}", logging.ERROR)
        return report
