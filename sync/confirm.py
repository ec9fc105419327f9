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
    """A config that makes this node accept a pass it did not accept (rotation phase 1) or sign with another one
    (phase 2) is applied only once every other node says over the sync link, with this node's own key, that it
    accepts that pass too (in phase 1 the master's live release already holds password_next when it pushes).
    The pusher's word is not enough: with a stolen key, a pass of the attacker's would be accepted here (adverts
    forged with it from the LAN would steer this node), or sent here, and the master would not hear this node.
    The peers are reached as the live config says; those settings change only while CARP is stopped
    (rotation.carp_settings), and the host keys are pinned by the live keys/known_hosts (check_trust_files)."""
    if old is None or live_tree is None:
        return
    fresh = set(accepts(new.cluster)) - set(accepts(old.cluster))
    if sends(new.cluster) != sends(old.cluster):
        fresh.add(sends(new.cluster))
    if not fresh:
        return
    want = {pass_fingerprint(p) for p in fresh}
    me = node_name(old, Path(live_tree) / CONFIG_NAME)
    key = keymod.push_key(paths.sync_key, Path(live_tree))
    for peer in make_peers(old, me, Path(live_tree), key):
        try:
            said = remote_status(peer).get("pass_accepts")
        except SyncError as e:
            raise SyncError(f"{CONFIG_NAME}: cluster.password/password_next: this node would take a new pass, but "
                            f"cannot confirm that {peer.name} accepts it ({e}); a rotation step needs every node up, "
                            "the master first; refused, nothing applied", BAD_INPUT) from None
        if not isinstance(said, list) or not want <= set(said):
            raise SyncError(f"{CONFIG_NAME}: cluster.password/password_next: {peer.name} does not accept the pass "
                            "this config would add (a rotation step goes live on the master first, then is synced to "
                            "every node); refused, nothing applied", BAD_INPUT)
