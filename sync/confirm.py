"""Before this node signs its adverts with a new CARP pass: every other node confirms over the sync link that it
accepts that pass (rotation phase 2 is applied only on top of phase 1 everywhere)."""
from __future__ import annotations

from pathlib import Path

from appliance.core.model import Appliance
from appliance.core.paths import Paths, node_name
from appliance.core.rotation import pass_fingerprint, sends
from sync import keys as keymod
from sync.errors import BAD_INPUT, SyncError
from sync.peer import make_peers, remote_status
from sync.policy import CONFIG_NAME


def check_peers_accept(paths: Paths, old: Appliance | None, new: Appliance, live_tree: Path | None) -> None:
    """A config that changes the pass this node signs with (rotation phase 2) is applied only once every other node
    says over the sync link, with this node's own key, that it accepts the new pass. The pusher's word is not
    enough: a stolen key could otherwise make a backup send a pass the master never accepted, and after the
    master's next restart the two would not hear each other (two masters, and sync refused as split brain)."""
    if old is None or live_tree is None or sends(new.cluster) == sends(old.cluster):
        return
    want = pass_fingerprint(sends(new.cluster))
    me = node_name(old, Path(live_tree) / CONFIG_NAME)
    key = keymod.push_key(paths.sync_key, Path(live_tree))
    for peer in make_peers(old, me, Path(live_tree), key):
        try:
            said = remote_status(peer).get("pass_accepts")
        except SyncError as e:
            raise SyncError(f"{CONFIG_NAME}: cluster.password: this node would sign with a new pass, but cannot "
                            f"confirm that {peer.name} accepts it ({e}); a rotation's phase 2 needs every node up and "
                            "on phase 1 first; refused, nothing applied", BAD_INPUT) from None
        if not isinstance(said, list) or want not in said:
            raise SyncError(f"{CONFIG_NAME}: cluster.password: {peer.name} does not accept the pass this config "
                            "would sign with (it is not on rotation phase 1: cluster.password_next synced to every "
                            "node first); applied here, the two would not hear each other; refused, nothing applied",
                            BAD_INPUT)
