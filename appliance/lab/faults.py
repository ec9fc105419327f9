"""Faults the lab injects into a node, and their recovery: engine-kill, link-down, proxy-kill, demote."""
from __future__ import annotations

import os
import signal

from appliance.core import loader
from appliance.ha import ip as netns
from appliance.lab import daemons
from appliance.lab.model import Lab, LabError

KINDS = ("engine-kill", "link-down", "proxy-kill", "demote")


def inject_fault(lab: Lab, kind: str, node: str) -> None:
    """Make `node` fail in the way `kind` names (see KINDS)."""
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
    elif kind == "demote":
        daemons.run_appliance(lab, node, "demote")
    else:
        raise LabError(f"unknown failure kind {kind!r} (one of {', '.join(KINDS)})")


def recover(lab: Lab, kind: str, node: str) -> None:
    """Undo inject_fault(kind) on node (an engine-kill needs nothing: the supervisor restarts the engine)."""
    n = lab.nodes[node]
    if kind == "link-down":
        netns.ip("link", "set", n.lan_if, "up", netns=n.netns)
    elif kind == "proxy-kill":
        if daemons.gone(n.proxy_pid):
            daemons.start_proxy(lab, node)
    elif kind == "demote":
        daemons.run_appliance(lab, node, "promote")


def preferred(lab: Lab) -> str:
    """The node the cluster file makes master (lowest advskew), from the lab's live cluster file."""
    return loader.load(next(iter(lab.nodes.values())).config).expected_master()
