"""The peer side: report status, and check + swap a staged tree in as releases/<generation> (then reload the proxy)."""
from __future__ import annotations

import logging
import os
import resource
import signal
import time
from pathlib import Path

from appliance.core import pids
from appliance.core.paths import Paths
from appliance.core.state import carp_stopped_on_purpose, read_role, role_of
from sync import confirm, indextrust, lock, policy, tree
from appliance.core.loader import load
from filters import ruleset
from sync.check import CONFIG_NAME, validate_tree, validate_tree_bounded
from sync.errors import BAD_INPUT, SPLIT_BRAIN, STALE, SyncError
from sync.journal import note
from sync.releases import MAX_STEP, Releases, carry_node_local, mirror
from sync.timing import Phases


def status(paths: Paths) -> dict:
    """What the master asks before pushing: our role, live generation and its hash."""
    rel = Releases(paths.state)
    live = rel.live()
    m = rel.meta(live) if live is not None else {}
    role = role_of(paths) or "UNKNOWN"
    return {"ok": True, "role": role, "generation": live, "hash": m.get("hash"), "meta": bool(m.get("meta")),
            "generations": rel.generations(), "carp_running": carp_running(paths),
            "pass_accepts": policy.pass_accepts(policy.live_config(rel.path(live) if live is not None else None))}


def carp_running(paths: Paths) -> bool:
    """CARP is on here: a supervisor runs (its pidfile names a live process), or it was not stopped on purpose in
    this boot (crash-restart window, boot before it starts, never started). Only a deliberate stop lets a sync change
    CARP settings: whatever is applied in a restart window, the supervisor would start with."""
    return pids.read_pid(paths.carp_pid) is not None or not carp_stopped_on_purpose(paths)


def reload_proxy(paths: Paths) -> str:
    """SIGHUP the proxy (it re-reads config and lists, keeping the old rules if they fail)."""
    try:
        pid = pids.signal_pidfile(paths.proxy_pid, signal.SIGHUP, "proxy")
        if pid is None:
            raise OSError(f"the proxy is not running (no live PID in {paths.proxy_pid})")
        return f"reloaded proxy pid {pid}"
    except (OSError, pids.StalePidfile) as e:
        note(paths.state, f"proxy not reloaded: {e}; it reads the new release when it (re)starts", logging.WARNING)
        return f"proxy not reloaded ({e})"


def reload_carp(paths: Paths) -> str:
    """SIGHUP the CARP supervisor if one runs: it re-reads the config and restarts its engines only when
    this node's CARP settings changed (advbase, advskew, pass, VIP...)."""
    try:
        pid = pids.signal_pidfile(paths.carp_pid, signal.SIGHUP, "carp")
        if pid is None:
            return "carp supervisor not running"
        return f"signalled carp supervisor pid {pid}"
    except (OSError, pids.StalePidfile) as e:
        note(paths.state, f"carp supervisor not signalled: {e}", logging.WARNING)
        return f"carp supervisor not signalled ({e})"


def max_file_bytes(paths: Paths) -> int:
    """The size cap for one synced file: sync.max_file_mb of this node's live config (never the pushed one), and
    never below the default. A lower live cap would come from an earlier push: rsync would then skip every larger
    list and no later sync could complete, so one stolen push could lock the master out (review, finding 3)."""
    try:
        live = load(Releases(paths.state).current / CONFIG_NAME).sync.max_file_mb << 20
    except Exception:  # no live config yet, or it does not load: the default cap
        return tree.MAX_FILE_BYTES
    return max(live, tree.MAX_FILE_BYTES)


def check_generation(state: Path, gen: int, live: int | None, force: bool, source: str) -> None:
    """Generations only move forward, by at most MAX_STEP; --force overrides that, loudly."""
    if live is None:
        return
    if gen == live:
        raise SyncError(f"generation {gen} is live here with other content; the master must send a newer generation", STALE)
    if force:
        note(state, f"receive --force from {source}: generation {gen} replaces the live generation {live} "
                    f"without the generation checks", logging.WARNING)
        return
    if gen < live:
        raise SyncError(f"generation {gen} is older than the live generation {live} here; refused "
                        f"(an old master must not overwrite newer changes; `appliance sync --force` overrides)", STALE)
    if gen > live + MAX_STEP:
        raise SyncError(f"generation {gen} is more than {MAX_STEP} above the live generation {live} here; refused "
                        f"(a forged or runaway number would leave no room for later ones; `appliance sync --force` "
                        f"overrides)", STALE)


def receive(paths: Paths, gen: int, digest: str, force: bool = False, source: str = "?", reload: bool = True) -> dict:
    """Check the staged tree and make it live as <gen>. On any failure the live release is untouched and the
    staging dir is emptied (nothing of a refused push stays)."""
    rel = Releases(paths.state)
    with lock.held(paths.run, wait=30):
        if not os.path.lexists(rel.staging):  # no push reached this node: refused before anything here is created
            raise SyncError(f"nothing staged in {rel.staging}; the transfer did not happen", BAD_INPUT)
        rel.prepare_dirs()
        try:
            return _receive(paths, rel, gen, digest, force, source, reload)
        except BaseException:
            rel.clear_staging()
            rel.cleanup()
            raise


def _checked_copy(paths: Paths, rel: Releases, gen: int, digest: str, live: int | None, ph: Phases) -> Path:
    """The staged tree copied into a fresh releases/.incoming-<gen>, checked entry by entry, hashed, with this
    node's node-local files carried over from the live release. compiled/ is never copied: the check rebuilds it."""
    cap = max_file_bytes(paths)
    with ph("copy"):
        tree.refuse(tree.check_staged(rel.staging, cap))
        tmp = rel.incoming(rel.staging, gen, transfer=True)
        tree.refuse(tree.check_staged(tmp, cap), "the copy of the staged tree")  # what goes live, not what may change
    with ph("hash"):
        got = tree.tree_hash(tmp)
    if got != digest:
        raise SyncError(f"staged tree hash {got[:16]} does not match the master's {digest[:16]}: the transfer is incomplete "
                        f"or the tree changed; the next sync completes it", 1)
    if live is not None:
        carry_node_local(rel.path(live), tmp)
    return tmp


def _receive(paths: Paths, rel: Releases, gen: int, digest: str, force: bool, source: str, reload: bool) -> dict:
    t0 = time.monotonic()
    state = paths.state
    role = read_role(paths) or {}
    if role.get("role") == "MASTER":
        msg = f"split brain: this node is MASTER too (since {role.get('since')}); refusing generation {gen} from {source}"
        note(state, msg, logging.ERROR)
        raise SyncError(msg, SPLIT_BRAIN)
    live = rel.live()
    live_meta = rel.meta(live) if live is not None else {}
    if live is not None and gen == live and live_meta.get("hash") == digest:
        return {"ok": True, "action": "up-to-date", "generation": gen, "previous": live, "seconds": 0.0}
    check_generation(state, gen, live, force, source)
    ph = Phases()
    tmp = _checked_copy(paths, rel, gen, digest, live, ph)
    try:
        with ph("check (bounded child)"):
            # the live release's index, when its bytes are those root compiled here (recorded in <state>/sync/;
            # compiled/ is never taken from a push, and may belong to the proxy user): its unchanged categories are
            # reused, every changed list file is parsed in full
            with indextrust.trusted_previous(rel, live) as previous:
                cfg = validate_tree_bounded(tmp, confine=True, previous=previous)
            indextrust.record(rel, gen, ruleset.index_path(tmp))  # tmp is root's 0700 copy until the swap
        with ph("carp policy"):
            _check_no_split(paths, rel.path(live) if live is not None else None, tmp, cfg)
    except SyncError as e:
        note(state, f"generation {gen} from {source} refused, generation {live} stays live: {e}", logging.WARNING)
        raise
    with ph("swap"):
        rel.commit(tmp, gen, digest, f"sync from {source}" + (" (--force)" if force else ""))
        rel.activate(gen)
        rel.write_staging_meta(gen, digest)
        pruned = rel.prune(cfg.sync.keep_releases)
    with ph("reload"):
        reloaded = reload_proxy(paths) if reload else "not asked"
        carp = reload_carp(paths) if reload else "not asked"
    note(state, f"generation {gen} from {source} is live (was {live}); {reloaded}; {carp}")
    return {"ok": True, "action": "swapped", "generation": gen, "previous": live, "pruned": pruned,
            "proxy": reloaded, "carp": carp, "seconds": round(time.monotonic() - t0, 3),
            "phases": ph.report(), "cpu": _cpu_seconds()}


def _cpu_seconds() -> dict:
    """CPU seconds of this receive: its own process (Python start-up included) and its children (the bounded
    check, the local rsync copy)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"self": round(me.ru_utime + me.ru_stime, 3), "children": round(kids.ru_utime + kids.ru_stime, 3)}


def _check_no_split(paths: Paths, live_tree: Path | None, tmp: Path, cfg) -> None:
    """A CARP change that would split the cluster is not applied by a sync alone (issue 12, #2): compared with the
    live release, the passes peers are heard with, and what the other nodes confirm over the sync link."""
    old = policy.live_config(live_tree)
    me = policy.this_node(old, live_tree)
    running = carp_running(paths)
    policy.check_carp_step(old, cfg, running, policy.heard_passes(paths, old), own=[me] if me else [])
    policy.check_trust_files(live_tree, tmp, running)
    confirm.check_peers_accept(paths, old, cfg, live_tree)


def rollback(paths: Paths, gen: int, reload: bool = True) -> dict:
    """Make an older release live again (on the master the next sync pushes it as a new generation)."""
    rel = Releases(paths.state)
    with lock.held(paths.run, wait=30):
        if gen not in rel.generations():
            raise SyncError(f"--rollback {gen}: no such release (have: {', '.join(map(str, rel.generations())) or 'none'})", BAD_INPUT)
        validate_tree(rel.path(gen), compile_lists=False)
        old = rel.activate(gen)
        m = rel.meta(gen)
        mirror(rel.path(gen), rel.staging, transfer=True)
        rel.write_staging_meta(gen, m["hash"])
        reloaded = reload_proxy(paths) if reload else "not asked"
        carp = reload_carp(paths) if reload else "not asked"
        note(paths.state, f"rollback: generation {gen} is live (was {old}); {reloaded}; {carp}", logging.WARNING)
        return {"ok": True, "action": "rollback", "generation": gen, "previous": old, "proxy": reloaded, "carp": carp}


def source_of_connection() -> str:
    client = os.environ.get("SSH_CLIENT", "")
    return client.split()[0] if client else "local"
