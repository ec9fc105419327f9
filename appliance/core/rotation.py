"""Which CARP setting changes one node may apply while its peers still run the old config (the pass rotation rule)."""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # annotations only: the speaker imports this module, and pydantic's models cost it seconds on a slow box
    from appliance.core.model import Appliance, Cluster

ROTATE_COMMAND = "appliance carp-rotate"


def sends(c: Cluster) -> str:
    """The pass this node signs its adverts with."""
    return c.password.get_secret_value()


def accepts(c: Cluster) -> set[str]:
    """The passes this node accepts adverts with: the pass, and during a rotation the next one."""
    return {sends(c)} | ({c.password_next.get_secret_value()} if c.password_next is not None else set())


def pass_fingerprint(pw: bytes | str) -> str:
    """Which pass signed a peer's adverts, as the speaker's state file records it. An HMAC of a fixed text under
    the pass: it tells no more about the pass than any advert on the LAN does (each is an HMAC under it)."""
    key = pw.encode() if isinstance(pw, str) else pw
    return hmac.new(key, b"carpguard pass fingerprint", hashlib.sha256).hexdigest()[:16]


def heard_pass_error(new: Cluster, heard: Mapping[str, str]) -> str | None:
    """None when `new` accepts the pass each peer was last heard signing with ({LAN address: pass_fingerprint},
    from this node's CARP engines). A rotation drops a pass only once no node sends it: walked on one node
    alone (push after push), this node would stop hearing a master still on the old pass and take the VIP too."""
    ok = {pass_fingerprint(p) for p in accepts(new)}
    deaf = sorted(ip for ip, fp in heard.items() if fp not in ok)
    if not deaf:
        return None
    return (f"cluster.password: {', '.join(deaf)} still sign their adverts with a pass this config no longer "
            "accepts; applied here, this node would stop hearing them (two masters). A pass is dropped only after "
            f"every node sends the new one: `{ROTATE_COMMAND}` on the master, sync, and wait for its adverts "
            "(docs/security.md, \"The CARP pass (two-phase rotation)\")")


def pass_step_error(old: Cluster, new: Cluster, heard: Mapping[str, str] | None = None) -> str | None:
    """None when a node on `old` and a node on `new` still accept each other's adverts (so applying `new` on one
    node first can never make two masters); else why not, naming the two-phase rotation. With `heard` (the pass
    each peer was just heard signing with, heard_pass_error) that replaces the guess that the peers send like `old`:
    what they really send must stay accepted, which also lets a sync repair a node whose own pass went astray."""
    if sends(new) in accepts(old) and (heard or sends(old) in accepts(new)):
        return heard_pass_error(new, heard) if heard else None
    return ("cluster.password changes without the rotation: nodes still on the old pass would not hear this one "
            "(two masters). Rotate in steps, each synced: set cluster.password_next to the new pass and sync; then "
            f"`{ROTATE_COMMAND}` (moves it to cluster.password, keeping the old one as password_next) and sync; then "
            f"`{ROTATE_COMMAND} --finish` and sync (docs/security.md)")


def carp_settings(cfg: Appliance) -> dict[str, object]:
    """Everything a node's CARP engine and its advert guard are started with, besides the pass, by config field,
    and the sync link's addresses. Two nodes that differ in any of these may stop hearing (or start refusing) each
    other: a VIP on another vhid or address, another interface or advbase, a node's LAN address or advskew the
    guard checks adverts against."""
    c = cfg.cluster
    out: dict[str, object] = {"cluster.vip": str(c.vip), "cluster.vhid": c.vhid, "cluster.advbase": c.advbase,
                              "cluster.interface": c.interface, "nodes": sorted(cfg.nodes),
                              # where the nodes reach each other: a node asks its peers there before it takes a
                              # new pass (sync.confirm), so a push must not be able to point it elsewhere
                              "cluster.sync_interface": c.sync_interface, "sync.user": cfg.sync.user,
                              "sync.ssh_port": cfg.sync.ssh_port}
    for name, n in cfg.nodes.items():
        out[f"nodes.{name}.lan"] = str(n.lan)
        out[f"nodes.{name}.advskew"] = n.advskew
        out[f"nodes.{name}.sync"] = str(n.sync)
    for i, x in enumerate(c.extra_vhids):
        out[f"cluster.extra_vhids[{i}]"] = (x.vhid, str(x.vip), sorted(x.advskew.items()))
    return out


def carp_step_error(old: Appliance, new: Appliance, own: Collection[str] = ()) -> str | None:
    """None unless `new` changes a CARP setting (carp_settings): applied on one node while the others still run
    `old`, the nodes would not hear each other, or refuse each other's adverts, and both would hold the VIP.
    `own`: the nodes that apply `new` here. A node raising its own advskew is let through: the others' guards
    still accept its adverts (only a lower advskew than configured is refused) and it only becomes less preferred."""
    a, b = carp_settings(old), carp_settings(new)
    raised = {f"nodes.{n}.advskew" for n in own
              if n in old.nodes and n in new.nodes and new.nodes[n].advskew > old.nodes[n].advskew}
    changed = [f"{k} {_show(a.get(k))} -> {_show(b.get(k))}" for k in sorted(set(a) | set(b))
               if a.get(k) != b.get(k) and k not in raised]
    if not changed:
        return None
    return (f"{'; '.join(changed)}: a CARP setting change splits the cluster while the nodes disagree (each would "
            "hold the VIP); not applied by a sync while this node's CARP runs. Stop `appliance carp` on each backup, "
            "sync, then start it again there (docs/security.md, \"Changing CARP settings\")")


def _show(v: object) -> str:
    return "(none)" if v is None else str(v)


def step_errors(old: Appliance, new: Appliance) -> list[str]:
    """Everything that makes `new` unsafe to apply on one node while the others run `old`."""
    out = [pass_step_error(old.cluster, new.cluster), carp_step_error(old, new)]
    return [e for e in out if e]
