"""Which CARP setting changes one node may apply while its peers still run the old config (the pass rotation rule)."""
from __future__ import annotations

from appliance.core.model import Appliance, Cluster

ROTATE_COMMAND = "appliance carp-rotate"


def sends(c: Cluster) -> str:
    """The pass this node signs its adverts with."""
    return c.password.get_secret_value()


def accepts(c: Cluster) -> set[str]:
    """The passes this node accepts adverts with: the pass, and during a rotation the next one."""
    return {sends(c)} | ({c.password_next.get_secret_value()} if c.password_next is not None else set())


def pass_step_error(old: Cluster, new: Cluster) -> str | None:
    """None when a node on `old` and a node on `new` still accept each other's adverts (so applying `new` on one
    node first can never make two masters); else why not, naming the two-phase rotation."""
    if sends(new) in accepts(old) and sends(old) in accepts(new):
        return None
    return ("cluster.password changes without the rotation: nodes still on the old pass would not hear this one "
            "(two masters). Rotate in steps, each synced: set cluster.password_next to the new pass and sync; then "
            f"`{ROTATE_COMMAND}` (moves it to cluster.password, keeping the old one as password_next) and sync; then "
            f"`{ROTATE_COMMAND} --finish` and sync (docs/security.md)")


def vhids(cfg: Appliance) -> list[int]:
    return [cfg.cluster.vhid] + [x.vhid for x in cfg.cluster.extra_vhids]


def vhid_step_error(old: Appliance, new: Appliance) -> str | None:
    """None unless a VIP moves to another vhid (or a vhid to another VIP): nodes on different vhids for one VIP
    do not hear each other, so both would hold it."""
    a = {str(g.vip): v for g, v in _groups(old)}
    b = {str(g.vip): v for g, v in _groups(new)}
    moved = sorted(f"{vip} vhid {a[vip]} -> {b[vip]}" for vip in set(a) & set(b) if a[vip] != b[vip])
    if not moved:
        return None
    return (f"{'; '.join(moved)}: a vhid change splits the cluster while the nodes disagree; not applied by a sync. "
            "Stop `appliance carp` on the backups, sync, restart it there (docs/security.md, \"Changing a vhid\")")


def _groups(cfg: Appliance):
    c = cfg.cluster
    yield c, c.vhid
    for x in c.extra_vhids:
        yield x, x.vhid


def step_errors(old: Appliance, new: Appliance) -> list[str]:
    """Everything that makes `new` unsafe to apply on one node while the others run `old`."""
    out = [pass_step_error(old.cluster, new.cluster), vhid_step_error(old, new)]
    return [e for e in out if e]
