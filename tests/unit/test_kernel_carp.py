"""The fast liveness layer's FreeBSD side on a fake ifconfig: roles and link read from its output, the commands sent."""
from __future__ import annotations

import os
import subprocess

from appliance.core.loader import load
from appliance.core.paths import Paths
from appliance.ha import kernel_carp
from tests.support.env import APPLIANCE, EXAMPLES

# FreeBSD 14's ifconfig for an em0 with two vhids (carp(4), sbin/ifconfig/carp.c: "carp: %s vhid %d advbase %d
# advskew %d", then the peer line)
IFCONFIG = """em0: flags=1008843<UP,BROADCAST,RUNNING,SIMPLEX,MULTICAST,LOWER_UP> metric 0 mtu 1500
\toptions=4e524bb<RXCSUM,TXCSUM,VLAN_MTU,VLAN_HWTAGGING,JUMBO_MTU>
\tether 08:00:27:aa:bb:cc
\tinet 192.168.1.2 netmask 0xffffff00 broadcast 192.168.1.255
\tinet 192.168.1.50 netmask 0xffffff00 broadcast 192.168.1.255 vhid 1
\tcarp: MASTER vhid 1 advbase 1 advskew 0
\t      peer 224.0.0.18 peer6 ff02::12
\tcarp: BACKUP vhid 2 advbase 1 advskew 100
\t      peer 224.0.0.18 peer6 ff02::12
\tmedia: Ethernet autoselect (1000baseT <full-duplex>)
\tstatus: active
"""


class FakeRun:
    def __init__(self, out: str = IFCONFIG):
        self.out, self.calls = out, []

    def __call__(self, argv):
        self.calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, self.out if argv[:1] == ["ifconfig"] and len(argv) == 2 else "", "")


def test_roles_advskew_and_link_from_ifconfig() -> None:
    assert kernel_carp.parse(IFCONFIG) == {1: ("MASTER", 0), 2: ("BACKUP", 100)}
    assert kernel_carp.link_active(IFCONFIG)
    assert not kernel_carp.link_active(IFCONFIG.replace("status: active", "status: no carrier"))


def test_commands_are_ifconfig_state_and_advskew(tmp_path) -> None:
    cfg = load(EXAMPLES / "appliance.yaml")
    run = FakeRun()
    k = kernel_carp.KernelCarp(cfg, "fw1", Paths(tmp_path), run=run)
    roles, skews = k.roles()
    assert roles == {1: "MASTER"} and skews == {1: 0} and k.link()
    k.command(1, "master", "fw2 silent")
    k.command(1, "hold", "")                     # kernel CARP has no hold: nothing is run
    k.command(1, "leave", "proxy exited")
    k.set_demoted(True)
    k.set_demoted(False)
    assert run.calls[1:] == [["ifconfig", "em0", "vhid", "1", "state", "master"],
                             ["ifconfig", "em0", "vhid", "1", "state", "backup"],
                             ["ifconfig", "em0", "vhid", "1", "advskew", str(cfg.ha.demote_advskew)],
                             ["ifconfig", "em0", "vhid", "1", "advskew", "0"]]


def test_the_command_refuses_on_linux(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_KERNEL_CARP_TEST"}
    env.update(APPLIANCE_STATE_DIR=str(tmp_path), APPLIANCE_NODE="fw1")
    r = subprocess.run([APPLIANCE, "-c", str(EXAMPLES / "appliance.yaml"), "liveness"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2 and "on Linux `appliance carp` runs the fast liveness layer" in r.stderr, r.stderr
