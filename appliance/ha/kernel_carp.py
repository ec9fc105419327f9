"""The fast liveness layer on FreeBSD: kernel CARP as its engine, read and told through ifconfig(8) (carp(4)).

Roles come from `ifconfig IF` ("carp: MASTER vhid 1 advbase 1 advskew 0"), a takeover is `ifconfig IF vhid N state
master`, a hand-over `... state backup` plus the demotion advskew (as `appliance demote`), the link from the same
output's "status: active". Kernel CARP has no way to hold its dead timer: on FreeBSD a backup cut off from the LAN
alone still becomes master after CARP's own timeout (docs/ha.md). Written from carp(4) and ifconfig(8); not run
on FreeBSD here (docs/limits.md).
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from appliance.core import state
from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.ha import role
from appliance.ha.carpset import effective_advskew

CARP_LINE = re.compile(r"^\s*carp:\s+(MASTER|BACKUP|INIT)\s+vhid\s+(\d+)\s+advbase\s+\d+\s+advskew\s+(\d+)", re.M)
STATUS_LINE = re.compile(r"^\s*status:\s+(\S.*)$", re.M)


def parse(text: str) -> dict[int, tuple[str, int]]:
    """vhid -> (state, advskew) from `ifconfig IF` output."""
    return {int(v): (st, int(skew)) for st, v, skew in CARP_LINE.findall(text)}


def link_active(text: str) -> bool:
    """The link has carrier: `status: active` (an interface without media status counts as up)."""
    m = STATUS_LINE.search(text)
    return m is None or m.group(1).strip() == "active"


def state_argv(iface: str, vhid: int, to: str) -> list[str]:
    return ["ifconfig", iface, "vhid", str(vhid), "state", to]


def advskew_argv(iface: str, vhid: int, advskew: int) -> list[str]:
    return ["ifconfig", iface, "vhid", str(vhid), "advskew", str(advskew)]


@dataclass
class KernelCarp:
    """View and commands for liveness.Liveness, over ifconfig; `run` is replaceable (tests)."""

    cfg: Appliance
    node: str
    paths: Paths
    run: object = field(default=None)
    last: str = ""

    def __post_init__(self) -> None:
        self.iface = self.cfg.cluster.interface
        self.groups = {g.vhid: g for g in role.groups(self.cfg, self.node)}
        self.run = self.run or (lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=5))

    def read(self) -> str:
        r = self.run(["ifconfig", self.iface])
        self.last = r.stdout if r.returncode == 0 else ""
        return self.last

    def roles(self) -> tuple[dict[int, str], dict[int, int]]:
        seen = parse(self.read())
        return ({v: seen.get(v, ("", 0))[0] for v in self.groups},
                {v: seen.get(v, ("", g.advskew))[1] for v, g in self.groups.items()})

    def link(self) -> bool:
        return link_active(self.last or self.read())

    def demoted(self) -> bool:
        ha = state.read_ha(self.paths)
        return bool(ha.get("demoted") or ha.get("health_demoted"))

    def command(self, vhid: int, verb: str, cause: str) -> None:
        """master: take the vhid now; leave: back to backup. hold: kernel CARP has no such control (nothing)."""
        if verb in ("master", "leave"):
            self.run(state_argv(self.iface, vhid, "master" if verb == "master" else "backup"))

    def set_demoted(self, failing: bool) -> None:
        """While this node's proxy or link is failing: the demotion advskew on every vhid (as `appliance demote`),
        so kernel CARP with preempt does not take the VIP straight back; the configured one again after."""
        demoted = failing or self.demoted()
        for g in self.groups.values():
            self.run(advskew_argv(self.iface, g.vhid, effective_advskew(self.cfg, g, demoted)))
