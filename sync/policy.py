"""What a sync may carry (never code) and which config changes it may apply alone (never a CARP split)."""
from __future__ import annotations

import os
import stat
import time
from collections.abc import Collection, Mapping
from pathlib import Path

from appliance.core.errors import ConfigError
from appliance.core.loader import load
from appliance.core.model import Appliance
from appliance.core.fsio import read_json
from appliance.core.paths import Paths, node_name
from appliance.core.rotation import accepts, carp_step_error, pass_fingerprint, pass_step_error
from sync import keys
from sync.errors import BAD_INPUT, SyncError

HOOKS_DIR = "hooks.d"
CONFIG_NAME = "appliance.yaml"
HEARD_SLACK = 15.0   # seconds: the speaker rewrites its state file every 10 s, plus margin


def rule_no_code(rel: str, st: os.stat_result) -> str | None:
    """A staged-tree rule (sync.tree.RULES): no `hooks.d` anywhere, no file with an execute bit (sync never carries
    code; hooks live in each node's own hooks dir, docs/ha.md#hooks)."""
    if rel.split("/")[-1] == HOOKS_DIR:
        return "a hooks dir (refused: sync never carries code; hooks are node-local, see docs/ha.md#hooks)"
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
        return f"executable (mode {stat.S_IMODE(st.st_mode):o}; refused: sync never carries code)"
    return None


def check_no_code(root: Path) -> None:
    """Refuse a tree that carries code: a `hooks.d` anywhere, or any file with an execute bit. Hooks are node-local
    (Paths.hooks, never synced); nothing in the config tree is ever run, so nothing in it needs to be executable."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            rel = rel_dir / name
            if name == HOOKS_DIR:
                raise SyncError(f"{rel}: a synced tree must not carry hooks (sync never carries code; hooks live in "
                                f"each node's own hooks dir, see docs/ha.md#hooks); refused, nothing applied", BAD_INPUT)
            st = os.lstat(Path(dirpath) / name)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                raise SyncError(f"{rel}: executable file (mode {stat.S_IMODE(st.st_mode):o}) in a synced tree; sync "
                                f"never carries code (chmod a-x it on the master); refused, nothing applied", BAD_INPUT)


def live_config(tree: Path | None) -> Appliance | None:
    """The cluster file of a live tree, or None when there is none or it does not load (nothing to compare with)."""
    if tree is None or not (Path(tree) / CONFIG_NAME).is_file():
        return None
    try:
        return load(Path(tree) / CONFIG_NAME)
    except (ConfigError, ValueError, OSError):
        return None


def this_node(live: Appliance | None, tree: Path | None) -> str | None:
    """This node's name (node.yaml beside the live cluster file), or None when it cannot be told."""
    if live is None or tree is None:
        return None
    try:
        return node_name(live, Path(tree) / CONFIG_NAME)
    except ConfigError:
        return None


def heard_passes(paths: Paths, live: Appliance | None, now: float | None = None) -> dict[str, str]:
    """{peer LAN address: pass fingerprint} of the adverts this node's CARP engines accepted in the last
    3 x advbase (+ HEARD_SLACK): which pass each peer signs with now. Empty without speaker state files (ucarp,
    kernel CARP, CARP stopped), where only the pairwise pass check applies."""
    if live is None:
        return {}
    now = time.time() if now is None else now
    fresh = 3 * live.cluster.advbase + HEARD_SLACK
    out: dict[str, str] = {}
    for vhid in [live.cluster.vhid] + [x.vhid for x in live.cluster.extra_vhids]:
        state = read_json(paths.engine_state(vhid)) or {}
        peers = state.get("peers") if isinstance(state, dict) else None
        for ip, d in (peers.items() if isinstance(peers, dict) else ()):
            if isinstance(d, dict) and isinstance(d.get("signed"), str) and d["signed"] \
                    and isinstance(d.get("at"), (int, float)) and now - d["at"] <= fresh:
                out[str(ip)] = d["signed"]
    return out


def check_carp_step(old: Appliance | None, new: Appliance, carp_running: bool,
                    heard: Mapping[str, str] | None = None, own: Collection[str] = ()) -> None:
    """Refuse a config that would split the cluster if applied here while the peers run `old`: a CARP pass change
    outside the rotation (checked pairwise, and against the pass each peer was just heard signing with), or any
    other CARP setting change (rotation.carp_settings) while this node's CARP engines run. `own`: the nodes that
    apply `new` (each may raise its own advskew)."""
    if old is None:
        return
    errors = [pass_step_error(old.cluster, new.cluster, heard), carp_step_error(old, new, own) if carp_running else None]
    for err in errors:
        if err:
            raise SyncError(f"{CONFIG_NAME}: {err}; refused, nothing applied", BAD_INPUT)


def pass_accepts(cfg: Appliance | None) -> list[str]:
    """What `status` tells a peer about this node's CARP pass: fingerprints of the passes its live config accepts."""
    return sorted(pass_fingerprint(p) for p in accepts(cfg.cluster)) if cfg is not None else []


def check_trust_files(old_tree: Path | None, new_tree: Path, carp_running: bool) -> None:
    """keys/known_hosts pins the host key of every node's sync address: this node asks its peers there before it
    takes a new CARP pass (sync.confirm), so, like the addresses themselves, it changes only while CARP is stopped."""
    if old_tree is None or not carp_running:
        return
    a, b = (keys.known_hosts(Path(t)) for t in (old_tree, new_tree))
    old = a.read_bytes() if a.is_file() else None
    if old is not None and (b.read_bytes() if b.is_file() else None) != old:
        raise SyncError(f"{a.relative_to(old_tree)}: the pinned host keys change, which a sync does not apply while this node's "
                        "CARP runs: stop `appliance carp` on each backup, sync, then start it again there "
                        "(docs/security.md, \"Changing CARP settings\"); refused, nothing applied", BAD_INPUT)
