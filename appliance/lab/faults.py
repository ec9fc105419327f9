"""Faults the lab injects into a node, and their recovery: engine-kill, link-down, proxy-kill, demote, and the fast
liveness cases: power-loss, proxy-hang, sync-cut, lan-cut (carrier stays up), isolate (both links cut)."""
from __future__ import annotations

import os
import signal

from appliance.core import loader
from appliance.ha import ip as netns
from appliance.lab import daemons
from appliance.lab.model import Lab, LabError

KINDS = ("engine-kill", "link-down", "proxy-kill", "demote")
FAST_KINDS = ("power-loss", "proxy-hang", "sync-cut", "lan-cut", "isolate")


def port(lab: Lab, node: str) -> str:
    """The node's port on the LAN bridge (in the LAN namespace), named by the node's place in the lab."""
    return f"p{list(lab.nodes).index(node)}"


def _killpg(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if daemons.pid_alive(pid):
        try:
            os.killpg(pid, sig)
        except OSError:
            pass


def power_off(lab: Lab, node: str) -> None:
    """All of the node's processes killed at once (supervisor, engine, proxy, sshd) and both links down."""
    n = lab.nodes[node]
    for pid in (n.carp_pid, n.proxy_pid, n.sshd_pid):
        _killpg(pid)
    for iface in (n.lan_if, n.sync_if):
        netns.ip("link", "set", iface, "down", netns=n.netns)


def power_on(lab: Lab, node: str) -> None:
    """The node boots again: no VIP on its interfaces (a reboot clears them), links up, its daemons started."""
    n = lab.nodes[node]
    for a in netns.addresses(n.lan_if, n.netns):
        if str(a) != n.lan:
            netns.del_address(n.lan_if, a, n.netns)
    for iface in (n.lan_if, n.sync_if):
        netns.ip("link", "set", iface, "up", netns=n.netns)
    daemons.start_sshd(lab, node)
    daemons.start_proxy(lab, node)
    daemons.start_carp(lab, node)


def cut(lab: Lab, node: str, what: str, on: bool) -> None:
    """Cut (on) or mend one of the node's paths: 'lan' takes its bridge port off the LAN (its carrier stays up, it
    just hears nobody), 'sync' takes its sync interface down."""
    n = lab.nodes[node]
    if what == "lan":
        if on:
            netns.ip("link", "set", port(lab, node), "nomaster", netns=lab.lan.netns)
        else:
            netns.ip("link", "set", port(lab, node), "master", lab.lan.bridge, "up", netns=lab.lan.netns)
    else:
        netns.ip("link", "set", n.sync_if, "down" if on else "up", netns=n.netns)


def inject_fault(lab: Lab, kind: str, node: str) -> None:
    """Make `node` fail in the way `kind` names (see KINDS and FAST_KINDS)."""
    n = lab.nodes[node]
    if kind == "engine-kill":
        pid = daemons.engine_pid(lab, node)
        if pid is None:
            raise LabError(f"{node}: no engine running")
        os.kill(pid, signal.SIGKILL)
    elif kind == "link-down":
        netns.ip("link", "set", n.lan_if, "down", netns=n.netns)
    elif kind == "proxy-kill":
        daemons.kill_proxy(lab, node)
    elif kind == "proxy-hang":
        _killpg(n.proxy_pid, signal.SIGSTOP)
    elif kind == "demote":
        daemons.run_appliance(lab, node, "demote")
    elif kind == "power-loss":
        power_off(lab, node)
    elif kind in ("sync-cut", "lan-cut", "isolate"):
        for what in {"sync-cut": ("sync",), "lan-cut": ("lan",), "isolate": ("lan", "sync")}[kind]:
            cut(lab, node, what, True)
    else:
        raise LabError(f"unknown failure kind {kind!r} (one of {', '.join(KINDS + FAST_KINDS)})")


def recover(lab: Lab, kind: str, node: str) -> None:
    """Undo inject_fault(kind) on node (an engine-kill needs nothing: the supervisor restarts the engine)."""
    n = lab.nodes[node]
    if kind == "link-down":
        netns.ip("link", "set", n.lan_if, "up", netns=n.netns)
    elif kind == "proxy-kill":
        if daemons.gone(n.proxy_pid):
            daemons.start_proxy(lab, node)
    elif kind == "proxy-hang":
        _killpg(n.proxy_pid, signal.SIGCONT)
    elif kind == "demote":
        daemons.run_appliance(lab, node, "promote")
    elif kind == "power-loss":
        power_on(lab, node)
    elif kind in ("sync-cut", "lan-cut", "isolate"):
        for what in {"sync-cut": ("sync",), "lan-cut": ("lan",), "isolate": ("lan", "sync")}[kind]:
            cut(lab, node, what, False)


def preferred(lab: Lab) -> str:
    """The node the cluster file makes master (lowest advskew), from the lab's live cluster file."""
    return loader.load(next(iter(lab.nodes.values())).config).expected_master()
