"""This node's CARP settings as the supervisor derives and compares them, and the pass and peers files it writes."""
from __future__ import annotations

import hashlib
from pathlib import Path

from appliance.core.fsio import write_secret, write_text_atomic
from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.core.rotation import pass_step_error
from appliance.ha import role


def write_pass(cfg: Appliance, paths: Paths) -> Path:
    """The CARP pass in a 0600 file (never in argv, never logged); during a rotation the next pass beside it
    (the speaker's --passfile-next; removed when there is none)."""
    nxt = cfg.cluster.password_next
    if nxt is not None:
        write_secret(paths.carp_pass_next, nxt.get_secret_value())
    else:
        paths.carp_pass_next.unlink(missing_ok=True)
    return write_secret(paths.carp_pass, cfg.cluster.password.get_secret_value())


def peer_specs(cfg: Appliance, node: str, vhid: int) -> list[str]:
    """The speaker's --peer values for a vhid: every other node's LAN address and its configured advskew there."""
    return [f"{cfg.nodes[n].lan.ip},advskew={g.advskew}" for n in sorted(cfg.nodes) if n != node
            for g in role.groups(cfg, n) if g.vhid == vhid]


LIVE = ("peers", "password_next")  # applied without a restart: the peers files and the next-pass file


def peers_only_change(old: Appliance, new: Appliance, node: str) -> bool:
    """Only the other nodes or the next pass changed: applied live through the peers files and the next-pass file
    (the speaker re-reads both). (A peer list never goes empty: a cluster has two nodes or more, each in every vhid.)"""
    a, b = carp_params(old, node), carp_params(new, node)
    return a != b and {**a, **dict.fromkeys(LIVE)} == {**b, **dict.fromkeys(LIVE)}


def refused_change(old: Appliance, new: Appliance) -> str | None:
    """Why a reload must not apply `new` (a pass change outside the rotation would split the cluster), else None."""
    return pass_step_error(old.cluster, new.cluster)


def carp_params(cfg: Appliance, node: str) -> dict:
    """What this node's engines are started with, from the config (the pass only as a digest)."""
    c = cfg.cluster
    return {
        "interface": c.interface, "srcip": str(cfg.nodes[node].lan.ip), "advbase": c.advbase, "preempt": c.preempt,
        "password": hashlib.sha256(c.password.get_secret_value().encode()).hexdigest(),
        "password_next": c.password_next and hashlib.sha256(c.password_next.get_secret_value().encode()).hexdigest(),
        "vhids": {g.vhid: {"vip": str(g.vip), "advskew": g.advskew} for g in role.groups(cfg, node)},
        "peers": [f"vhid {g.vhid} {p}" for g in role.groups(cfg, node) for p in peer_specs(cfg, node, g.vhid)],
    }


def carp_changes(old: dict, new: dict) -> list[str]:
    """What differs between two carp_params(), readable for the log (the pass only as "password changed")."""
    out = []
    for k in ("interface", "srcip", "advbase", "preempt", "peers"):
        if old[k] != new[k]:
            out.append(f"{k} {old[k]} -> {new[k]}")
    if old["password"] != new["password"]:
        out.append("password changed")
    if old.get("password_next") != new.get("password_next"):
        out.append("next password " + ("set" if new.get("password_next") else "cleared") if old.get("password_next") is None
                   or new.get("password_next") is None else "next password changed")
    for v in sorted(set(old["vhids"]) | set(new["vhids"])):
        a, b = old["vhids"].get(v), new["vhids"].get(v)
        if a is None:
            out.append(f"vhid {v} added (vip {b['vip']} advskew {b['advskew']})")
        elif b is None:
            out.append(f"vhid {v} removed")
        else:
            out += [f"vhid {v} {k} {a[k]} -> {b[k]}" for k in ("vip", "advskew") if a[k] != b[k]]
    return out


def effective_advskew(cfg: Appliance, g: role.Group, demoted: bool) -> int:
    return max(g.advskew, cfg.ha.demote_advskew) if demoted else g.advskew


def write_peers(cfg: Appliance, node: str, vhid: int, paths: Paths) -> Path:
    """The speaker's --peers-file for a vhid, one peer_specs() line each, replaced atomically: the speaker
    re-reads it when it changes, so another node's advskew or address changes without a restart."""
    path = paths.engine_peers(vhid)
    write_text_atomic(path, "".join(f"{x}\n" for x in peer_specs(cfg, node, vhid)))
    return path


def startup_delay(cfg: Appliance, node: str) -> float:
    """Nodes start in advskew order: the n-th preferred node waits n x 0.5 x advbase, so a backup
    that boots together with the master never grabs the VIP first."""
    return cfg.by_preference().index(node) * 0.5 * cfg.cluster.advbase
