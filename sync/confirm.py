"""Before this node signs its adverts with a new CARP pass: every other node confirms over the sync link that it
accepts that pass (rotation phase 2 is applied only on top of phase 1 everywhere)."""
from __future__ import annotations

from pathlib import Path

from appliance.core.model import Appliance
from appliance.core.paths import Paths, node_name
from appliance.core.rotation import accepts, pass_fingerprint, sends
from sync import keys as keymod
from sync.errors import BAD_INPUT, SyncError
from sync.peer import make_peers, remote_status
from sync.policy import CONFIG_NAME


def check_peers_accept(paths: Paths, old: Appliance | None, new: Appliance, live_tree: Path | None) -> None:
    """Before this node takes a new pass, the others say over the sync link, asked with this node's own key, which
    passes they accept (`status`: pass_accepts). The pusher's word is not enough: with a stolen key, a pass of the
    attacker's would be accepted here (adverts forged with it from the LAN would steer this node) or sent here.
    - a pass this config newly accepts (rotation phase 1): the node saying MASTER must accept it already (the
      master's release goes live before it pushes); backups may still be on the old phase (each waits for the
      master only, so three or more nodes do not wait for each other);
    - a new pass to sign with (phase 2): every other node must accept it, or it would not hear this node.
    The peers are reached as the live config says; those settings change only while CARP is stopped
    (rotation.carp_settings), and their host keys are pinned by the live keys/known_hosts (check_trust_files)."""
    if old is None or live_tree is None:
        return
    fresh = {pass_fingerprint(p) for p in set(accepts(new.cluster)) - set(accepts(old.cluster))}
    signs = pass_fingerprint(sends(new.cluster)) if sends(new.cluster) != sends(old.cluster) else None
    if not fresh and signs is None:
        return
    said, unreachable = _ask(paths, old, Path(live_tree))
    if signs is not None:
        if unreachable:
            raise _refused(f"cannot confirm that {unreachable[0]} accepts the pass this config would sign with; a "
                           "rotation's phase 2 needs every node up")
        for name, (_, accepted) in said.items():
            if signs not in accepted:
                raise _refused(f"{name} does not accept the pass this config would sign with (it is not on phase 1: "
                               "cluster.password_next synced to every node first); the two would not hear each other")
    if fresh:
        masters = [name for name, (role, _) in said.items() if role == "MASTER"]
        if not masters:
            raise _refused("no other node says MASTER, so nothing confirms the pass this config would accept (a "
                           "rotation step goes live on the master first)")
        for name in masters:
            if not fresh <= said[name][1]:
                raise _refused(f"{name} (MASTER) does not accept the pass this config would accept (a rotation step "
                               "goes live on the master first, then is synced)")


def _ask(paths: Paths, old: Appliance, live_tree: Path) -> tuple[dict[str, tuple[str, set[str]]], list[str]]:
    """{node: (its role, the pass fingerprints it accepts)} for each other node reached, and the names not reached."""
    me = node_name(old, live_tree / CONFIG_NAME)
    key = keymod.push_key(paths.sync_key, live_tree)
    said: dict[str, tuple[str, set[str]]] = {}
    unreachable: list[str] = []
    for peer in make_peers(old, me, live_tree, key):
        try:
            st = remote_status(peer)
        except SyncError:
            unreachable.append(peer.name)
            continue
        accepted = st.get("pass_accepts")
        said[peer.name] = (str(st.get("role") or ""),
                           {a for a in accepted if isinstance(a, str)} if isinstance(accepted, list) else set())
    return said, unreachable


def _refused(why: str) -> SyncError:
    return SyncError(f"{CONFIG_NAME}: cluster.password/password_next: {why}; refused, nothing applied", BAD_INPUT)
