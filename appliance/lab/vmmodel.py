"""The VM lab's state: a VmLab (the namespace lab's LAN, client and origin, plus one qemu VM per node: image,
overlay, taps, MACs, console, PID), saved as <vmlab dir>/vmlab.json after every change."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.lab.model import Addressed, Lab, LabError, LabKind, _build

VMLAB_ROOT_ENV = "APPLIANCE_VMLAB_DIR"
STATE_FILE = "vmlab.json"
LAB_NETNS = "vm"       # <name>-vm: the bridges, the taps, qemu, the origin
CLIENT_NETNS = "cli"   # <name>-cli: the LAN client


class BootError(LabError):
    """A VM that did not come up: a one-line message, and the console's tail apart (printed before it)."""

    def __init__(self, message: str, tail: str = "", code: int = 1):
        super().__init__(message, code)
        self.tail = tail


def vmlab_dir(name: str) -> Path:
    """<vmlab root>/<name>, for a valid name only (the namespace lab's check_name: never a path)."""
    return VMLAB.dir(name)


@dataclass
class VmNode(Addressed):
    """One node as a qemu VM: its addresses, base image and overlay, NICs (eth0 LAN, eth1 sync), console, PID."""

    lan: str                 # eth0's address, e.g. 192.168.1.2/24
    sync: str                # eth1's address
    advskew: int
    image: str               # the node's qcow2 from the image build (never written)
    overlay: str             # copy-on-write overlay the VM boots from
    console: str             # the serial console, a file
    qemu_log: str            # qemu's own stdout/stderr
    taps: list[str] = field(default_factory=list)   # [LAN tap, sync tap] in the lab namespace
    macs: list[str] = field(default_factory=list)   # [eth0, eth1]
    qemu_pid: int | None = None
    boots: int = 0           # how many times the lab started this VM (a power loss and boot adds one)
    console_from: int = 0    # where the current boot's part of the console starts (it is appended to)

@dataclass
class VmLab(Lab):
    """The cluster as VMs. From the namespace lab: name, dir, vip, proxy_port, origin, lan (its namespace holds
    the bridges, taps and qemu), client, created_netns, origin_pid; `nodes` stays empty (`vms` instead)."""

    accel: str = "tcg"
    images: str = ""          # the image build's out dir
    ssh_key: str = ""         # the admin key from the image build (private)
    known_hosts: str = ""     # the lab's known_hosts: each node's pinned host key on its LAN address
    sync_bridge: str = "br1"
    lan_if: str = "eth0"      # the nodes' LAN interface (the cluster file's cluster.interface)
    master: str = ""          # the node the cluster file makes master (lowest advskew)
    vms: dict[str, VmNode] = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def netns(self) -> str:
        return self.lan.netns

    def vm(self, name: str) -> VmNode:
        if name not in self.vms:
            raise LabError(f"no node {name!r} in VM lab {self.name} ({', '.join(self.vms)})")
        return self.vms[name]

    def node_by_ip(self) -> dict[str, str]:
        return {v.lan_ip: name for name, v in self.vms.items()}

    def node_by_mac(self) -> dict[str, str]:
        return {v.macs[0]: name for name, v in self.vms.items() if v.macs}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "VmLab":
        lab = super().from_json(data)
        try:
            lab.vms = {k: _build(VmNode, v) for k, v in (data.get("vms") or {}).items()}
        except (TypeError, AttributeError) as e:
            raise LabError(f"{data.get('name', '?')}: not a VM lab state file ({e})") from None
        return lab


VMLAB = LabKind(what="VM lab", command="vmlab", root_env=VMLAB_ROOT_ENV, default_root="/run/appliance-vmlab",
                name_env="APPLIANCE_VMLAB", state_file=STATE_FILE, cls=VmLab)


def load(name: str | None = None) -> VmLab:
    """The VM lab's state file; with no name ($APPLIANCE_VMLAB or) the only VM lab there is."""
    return VMLAB.load(name)
