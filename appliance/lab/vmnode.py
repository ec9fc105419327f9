"""Talking to a VM lab node as an admin would: SSH from inside the lab's namespace (the image build's admin key,
host keys pinned in the lab's known_hosts), whether it reached multi-user with the appliance units active, and
who holds the VIP (ip addr on each node, or ARP replies on the LAN bridge)."""
from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field

from appliance.ha import ip as netns
from appliance.lab.model import LabError
from appliance.lab.vmmodel import VmLab

UNITS = ("appliance-proxy.service", "appliance-carp.service")
SSH_CONNECT_TIMEOUT = 30  # a TCG guest on a busy host can take many seconds to answer a new connection


def ssh_argv(lab: VmLab, node: str) -> list[str]:
    """`exec` of `vmlab up --json`: argv + a command runs it on the node as root over SSH from the lab namespace."""
    vm = lab.vm(node)
    return ["ip", "netns", "exec", lab.netns, "ssh", "-F", "/dev/null", "-i", lab.ssh_key,
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}", "-o", "ServerAliveInterval=5", "-o", "LogLevel=ERROR",
            # one connection per node, kept 10 minutes and shared by every command (a TCG guest is slow to accept)
            "-o", "ControlMaster=auto", "-o", f"ControlPath={lab.dir}/ssh-%h", "-o", "ControlPersist=600",
            f"root@{vm.lan_ip}"]


def run(lab: VmLab, node: str, command: str | list[str], timeout: float = 60,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run a command on the node over SSH (a list is quoted word by word, a string goes to the remote shell as is);
    a timeout comes back as exit status 124, like timeout(1)."""
    remote = command if isinstance(command, str) else " ".join(shlex.quote(a) for a in command)
    argv = [netns.tool("ip")] + ssh_argv(lab, node)[1:] + [remote]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        r = subprocess.CompletedProcess(argv, 124, _text(e.stdout), _text(e.stderr) + f"\ntimed out after {timeout} s")
    if check and r.returncode != 0:
        raise LabError(f"{node}: {remote}: exit {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
    return r


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


@dataclass
class NodeState:
    """What one SSH round trip says about a node's boot."""

    ssh: bool = False
    system: str = ""                                   # systemctl is-system-running
    units: dict[str, str] = field(default_factory=dict)  # appliance unit -> is-active
    failed: list[str] = field(default_factory=list)    # systemctl --failed
    restarts: dict[str, int] = field(default_factory=dict)  # appliance unit -> NRestarts (a crash loop stays "active")
    error: str = ""

    @property
    def ready(self) -> bool:
        return (self.ssh and self.system in ("running", "degraded")
                and all(self.units.get(u) == "active" for u in UNITS))

    def __str__(self) -> str:
        if not self.ssh:
            return f"ssh: {self.error or 'no answer'}"
        units = ", ".join(f"{u.split('.')[0]} {s}" + (f" (restarted {self.restarts[u]}x)" if self.restarts.get(u) else "")
                          for u, s in self.units.items())
        return f"system {self.system or '?'}; {units}; failed units: {', '.join(self.failed) or 'none'}"


STATE_SCRIPT = ("echo system=$(systemctl is-system-running 2>/dev/null); "
                + " ".join(f"echo unit:{u}=$(systemctl is-active {u} 2>/dev/null);" for u in UNITS)
                + " ".join(f"echo restarts:{u}=$(systemctl show -p NRestarts --value {u} 2>/dev/null);" for u in UNITS)
                + " systemctl list-units --failed --no-legend --plain 2>/dev/null | sed 's/^/failed:/'")


def node_state(lab: VmLab, node: str, timeout: float = 90) -> NodeState:
    """One SSH call: the system state, the appliance units and the failed units."""
    r = run(lab, node, STATE_SCRIPT, timeout=timeout)
    st = NodeState()
    if r.returncode == 255 or r.returncode == 124 or "system=" not in r.stdout:
        st.error = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:160]
        return st
    st.ssh = True
    for line in r.stdout.splitlines():
        key, _, val = line.partition("=")
        if key == "system":
            st.system = val.strip()
        elif key.startswith("unit:"):
            st.units[key[5:]] = val.strip()
        elif key.startswith("restarts:") and val.strip().isdigit():
            st.restarts[key[9:]] = int(val)
        elif line.startswith("failed:") and line[7:].split():
            st.failed.append(line[7:].split()[0])
    return st


def holders_ssh(lab: VmLab, nodes: list[str] | None = None) -> list[str]:
    """Nodes whose LAN interface carries the VIP (`ip -4 addr` over SSH; a node that does not answer is not one)."""
    out = []
    for node in nodes or list(lab.vms):
        r = run(lab, node, ["ip", "-4", "-o", "addr", "show", "dev", lab.lan_if], timeout=20)
        if r.returncode == 0 and re.search(rf"inet {re.escape(lab.vip)}/", r.stdout):
            out.append(node)
    return out


def holders_arp(lab: VmLab, wait: int = 1) -> list[str]:
    """Nodes that answer ARP for the VIP on the LAN bridge within `wait` seconds (every holder answers the same
    broadcast request, so two holders show as two MACs); unknown MACs are listed as they are."""
    argv = netns.in_ns(lab.netns, [netns.tool("arping"), "-I", lab.lan.bridge, "-c", "2", "-w", str(wait), lab.vip])
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=wait + 10, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return []
    by_mac = lab.node_by_mac()
    seen: list[str] = []
    for m in re.findall(r"reply from \S+ \[([0-9A-Fa-f:]{17})\]", r.stdout):
        who = by_mac.get(m.lower(), m.lower())
        if who not in seen:
            seen.append(who)
    return seen
