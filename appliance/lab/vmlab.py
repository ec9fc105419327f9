"""The VM lab's life: `up` (check the host, build the lab namespace with a LAN and a sync bridge, a tap per VM NIC,
the client and the origin from the namespace lab, overlays, qemu per node, then wait until every VM reached
multi-user and one node holds the VIP), its description and status, and `down` (from the state file alone)."""
from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from appliance.core import loader
from appliance.core.model import Appliance
from appliance.ha import ip as netns
from appliance.lab import daemons, topology, vm, vmimages, vmnode
from appliance.lab.measure import client_get
from appliance.lab.model import Client, LabError, LanSegment, check_name
from appliance.lab.vmmodel import CLIENT_NETNS, LAB_NETNS, STATE_FILE, VMLAB, BootError, VmLab, VmNode, vmlab_dir

ORIGIN_PORT = 8080
TOOLS = ("ip", "ssh", "arping", "qemu-img")
WAIT = float(os.environ.get("APPLIANCE_VMLAB_WAIT", "600"))


def check_host() -> None:
    """Root, qemu and the tools, each missing one a one-line LabError (nothing made yet)."""
    if os.geteuid() != 0:
        raise LabError("vmlab up needs root (network namespaces, taps); run it as root")
    if not vm.qemu_binary():
        raise LabError(f"vmlab up needs {vm.QEMU} (apt-get install qemu-system-x86; `make vmlab` does it)")
    for t in TOOLS:
        if not shutil.which(netns.tool(t)):
            raise LabError(f"vmlab up needs {t} (`make vmlab` installs it)")


def check_free(name: str) -> None:
    check_name(name)
    if (vmlab_dir(name) / STATE_FILE).exists() or f"{name}-{LAB_NETNS}" in netns.netns_list():
        raise LabError(f"a VM lab named {name} is already up ({vmlab_dir(name)}); "
                       f"`appliance vmlab down --name {name}` first")


def new_lab(cfg: Appliance, config_path: Path, images: Path, name: str) -> VmLab:
    """The lab's description before anything exists: names, addresses, the VMs' files, taps and MACs."""
    c = cfg.cluster
    used = {c.vip.ip} | {n.lan.ip for n in cfg.nodes.values()} | {x.vip.ip for x in c.extra_vhids}
    origin_ip, client_ip = topology.free_hosts(c.vip.network, used | set(cfg.ha.lan_witness), 2)
    if cfg.ha.lan_witness:      # the origin stands in for the gateway the cluster names as its LAN witness
        origin_ip = cfg.ha.lan_witness[0]
    d = vmlab_dir(name)
    lab = VmLab(name=name, dir=d, source_config=str(config_path), vip=str(c.vip.ip),
                vips={str(c.vhid): str(c.vip.ip)}, proxy_port=cfg.proxy.port,
                origin=f"http://{origin_ip}:{ORIGIN_PORT}/",
                lan=LanSegment(netns=f"{name}-{LAB_NETNS}", bridge="br0", origin_ip=str(origin_ip)),
                client=Client(netns=f"{name}-{CLIENT_NETNS}", ip=str(client_ip), lan_if="eth0"),
                images=str(images), lan_if=c.interface, master=cfg.expected_master())
    for i, (node, n) in enumerate(cfg.nodes.items()):
        lab.vms[node] = VmNode(lan=str(n.lan), sync=str(n.sync), advskew=n.advskew,
                               image=str(vmimages.node_image(images, node)), overlay=str(d / f"{node}.qcow2"),
                               console=str(d / f"{node}.console"), qemu_log=str(d / f"{node}.qemu.log"),
                               taps=[f"t{i}lan", f"t{i}sync"], macs=[vm.mac(name, node, 0), vm.mac(name, node, 1)])
    return lab


def build_network(lab: VmLab, prefix: int) -> None:
    """The lab namespace: LAN bridge (origin address) with the client on a veth (the namespace lab's build_lan),
    the sync bridge, and per VM a LAN tap and a sync tap on them."""
    topology.build_lan(lab, prefix)
    ns = lab.netns
    netns.ip("link", "add", lab.sync_bridge, "type", "bridge", netns=ns)
    netns.ip("link", "set", lab.sync_bridge, "up", netns=ns)
    for v in lab.vms.values():
        for tap, bridge in zip(v.taps, (lab.lan.bridge, lab.sync_bridge)):
            netns.ip("tuntap", "add", "dev", tap, "mode", "tap", netns=ns)
            netns.ip("link", "set", tap, "master", bridge, "up", netns=ns)


def boot(lab: VmLab, node: str) -> int:
    """Start (or after a power loss, start again) the node's VM on its overlay; records the PID at once."""
    v = lab.vm(node)
    v.console_from = vm.console_size(v)
    v.qemu_pid = vm.start(lab.netns, f"{lab.name}-{node}", v, lab.accel)
    v.boots += 1
    lab.save()
    return v.qemu_pid


def up(config_path: Path, images: Path, name: str | None = None, wait: float = WAIT, log=None) -> VmLab:
    """Build the lab and boot every node; returns it once all reached multi-user and the master holds the VIP.
    On any failure (the console tail in the message) everything made so far is removed again."""
    check_host()
    cfg = loader.load(config_path)
    name = name or f"vm{secrets.token_hex(3)}"
    check_free(name)
    lab = new_lab(cfg, Path(config_path).resolve(), Path(images).resolve(), name)
    dirs = [Path(lab.images), Path(config_path).resolve().parent]
    lab.ssh_key, keys = vmimages.admin_key(dirs), vmimages.host_keys(dirs, list(lab.vms))
    lab.dir.mkdir(parents=True, exist_ok=True)
    lab.save()
    try:
        _build(lab, cfg, keys, log or (lambda msg: None))
        wait_ready(lab, wait, log or (lambda msg: None))
    except BaseException:
        down(name)
        raise
    return lab


def _build(lab: VmLab, cfg: Appliance, keys: dict[str, str], log) -> None:
    lab.known_hosts = str(lab.dir / "known_hosts")
    Path(lab.known_hosts).write_text("".join(f"{lab.vms[n].lan_ip} {k}\n" for n, k in keys.items()))
    build_network(lab, cfg.cluster.vip.network.prefixlen)
    daemons.start_origin(lab, ORIGIN_PORT)
    for v in lab.vms.values():
        vm.create_overlay(v.image, v.overlay)
    lab.accel = vm.choose_accel(next(iter(lab.vms.values())).image, lab.dir)
    log(f"accelerator: {lab.accel}")
    for node in lab.vms:
        boot(lab, node)


def wait_booted(lab: VmLab, nodes: list[str], deadline: float, log) -> None:
    """Until each node's console says 'Reached target' (in this boot's part), SSH answers and systemd says
    running/degraded with the appliance units active; BootError with the console's tail when a VM dies or the
    deadline passes."""
    left, last = list(nodes), {}
    while left and time.monotonic() < deadline:
        for node in list(left):
            v = lab.vm(node)
            if not vm.is_ours(v.qemu_pid, v):
                raise BootError(f"{node}: qemu exited while booting: {vm.tail(v.qemu_log, 3, ' | ')}",
                                f"--- {node} console (tail) ---\n{vm.tail(v.console)}")
            if not vm.console_has(v, "Reached target", v.console_from):
                last[node] = "console: no 'Reached target' yet"
                continue
            st = vmnode.node_state(lab, node)
            last[node] = str(st)
            if st.ready:
                log(f"{node}: multi-user ({st})")
                left.remove(node)
        time.sleep(1.0 if left else 0)
    if left:
        node = left[0]
        shown = vm.tail(lab.vm(node).console) or "(nothing on the serial console)"
        raise BootError(f"{node} did not reach multi-user with the appliance units active within the wait "
                        f"({last.get(node)}; console above)", f"--- {node} console (tail) ---\n{shown}")


def wait_ready(lab: VmLab, wait: float, log) -> None:
    """Every VM booted, then exactly the master holds the VIP and the client gets the origin through it."""
    deadline = time.monotonic() + wait
    wait_booted(lab, list(lab.vms), deadline, log)
    h: list[str] = []
    status = ""
    while time.monotonic() < deadline:
        h = vmnode.holders_ssh(lab)
        if h == [lab.master]:
            status = client_get(lab, lab.vip, lab.origin, timeout=5)
            if status == "200":
                return
        time.sleep(1.0)
    raise LabError(f"VMs up but not serving in time: VIP holders {h or 'none'} (want {lab.master}), "
                   f"client through the VIP: {status or 'not tried'}")


def describe(lab: VmLab) -> dict:
    """The documented `vmlab up --json` shape."""
    return {"vip": lab.vip, "proxy_port": lab.proxy_port, "origin": lab.origin, "client": {"netns": lab.client.netns},
            "nodes": {node: {"qemu_pid": v.qemu_pid, "console": v.console, "exec": vmnode.ssh_argv(lab, node)}
                      for node, v in lab.vms.items()}}


def status(lab: VmLab) -> dict:
    """describe() plus name, dir, accelerator, per node qemu alive and its boot state, and the VIP holders."""
    d = {"name": lab.name, "dir": str(lab.dir), "accel": lab.accel, **describe(lab)}
    for node, n in d["nodes"].items():
        v = lab.vm(node)
        n["qemu_alive"] = vm.is_ours(v.qemu_pid, v)
        n["state"] = str(vmnode.node_state(lab, node)) if n["qemu_alive"] else "powered off"
    d["holders"] = vmnode.holders_arp(lab)
    return d


def down(name: str | None = None) -> list[str]:
    """Power off every VM (recorded PID, proven our qemu), stop what runs in the lab's namespaces, delete taps,
    bridges, namespaces, overlays and the lab dir; from the state file alone, also after a crash."""
    lab: VmLab = VMLAB.recorded(name)
    ours = f"{lab.name}-"
    spaces = sorted({n for n in lab.created_netns if n.startswith(ours)}
                    | {n for n in netns.netns_list() if n.startswith(ours)})
    for v in lab.vms.values():
        vm.power_off(v)
    inside = [p for ns in spaces for p in netns.netns_pids(ns)]
    daemons.kill([p for p in inside if daemons.pid_alive(p)], grace=3.0)
    if lab.netns in spaces:
        for link in [t for v in lab.vms.values() for t in v.taps] + [lab.lan.bridge, lab.sync_bridge]:
            netns.ip("link", "del", link, netns=lab.netns, check=False)
    for ns in spaces:
        netns.netns_del(ns)
    VMLAB.remove_dir(lab.dir)
    return spaces
