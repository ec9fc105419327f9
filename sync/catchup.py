"""Which MASTER peer, if any, has a newer live generation than this node: asked at start by a node back from an
outage (appliance.ha.catchup), over the sync link's `status`, with this node's own sync key."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from appliance.core import state
from appliance.core.model import Appliance
from appliance.core.paths import Paths
from sync import keys as keymod
from sync.errors import SyncError
from sync.peer import make_peers, remote_status
from sync.releases import MAX_STEP


def ahead(cfg: Appliance, node: str, config_path: Path, paths: Paths,
          log: Callable[[str], None] = lambda _: None) -> tuple[str, int] | None:
    """(peer, generation) of a peer that says MASTER with a live generation above ours (by at most MAX_STEP, what a
    push can bring); None when none does, or no peer answers, or this node has no key or pinned host keys to ask
    with. Why a peer was not asked goes to `log`: a gate that opens silently hides a broken sync link."""
    work = config_path.resolve().parent
    key = keymod.push_key(paths.sync_key, work)
    missing = next((p for p in (key, keymod.known_hosts(work)) if not p.exists()), None)
    if missing is not None:
        log(f"sync catch-up: {missing} is missing; the peers are not asked")
        return None
    ours = state.sync_generation(paths) or 0
    for p in make_peers(cfg, node, work, key):
        try:
            s = remote_status(p)
        except SyncError as e:
            log(f"sync catch-up: {e}")  # unreachable or refusing: that peer cannot be waited for
            continue
        gen, role = s.get("generation"), s.get("role")
        # more than MAX_STEP above ours is a number no push could bring here (receive refuses it): not waited for
        if role == "MASTER" and isinstance(gen, int) and ours < gen <= ours + MAX_STEP:
            return p.name, gen
        log(f"sync catch-up: {p.name} ({role}) has generation {gen}, this node {ours}: not waited for")
    return None
