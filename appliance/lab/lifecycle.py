"""A lab's life: `up` (check, build, start, wait until ready), its description and status, and `down` (from the
state file alone, also after a crash)."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from pathlib import Path

from appliance.core import loader
from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.core.state import read_role
from appliance.ha import ip as netns
from appliance.lab import daemons, nodes, topology
from appliance.lab.faults import preferred
from appliance.lab.model import (LAB, LAB_ROOT_ENV, STATE_FILE, Client, Lab, LabError, LabNode, LanSegment, check_name,
                                  lab_dir)

ORIGIN_PORT = 8080
TOOLS = ("ip", "ucarp", "arping", "sshd", "ssh", "ssh-keygen", "rsync")


def _check_host() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces); run it as root")
    for t in TOOLS:
        if not shutil.which(netns.tool(t)):
            raise LabError(f"the lab needs {t} (make lab installs it)")


def _check_name(name: str) -> None:
    check_name(name)
    if (lab_dir(name) / STATE_FILE).exists():
        raise LabError(f"a lab named {name} is already up ({lab_dir(name)}); `appliance lab down --name {name}` first")


def _new_lab(cfg: Appliance, config_path: Path, name: str, engine: str | None, deadratio: int | None) -> Lab:
    """The lab's description before anything exists: names, the VIPs, and free LAN addresses for origin and client."""
    c = cfg.cluster
    used = {c.vip.ip} | {n.lan.ip for n in cfg.nodes.values()} | {x.vip.ip for x in c.extra_vhids}
    origin_ip, client_ip = topology.free_hosts(c.vip.network, used | set(cfg.ha.lan_witness), 2)
    if cfg.ha.lan_witness:      # the origin stands in for the gateway the cluster names as its LAN witness
        origin_ip = cfg.ha.lan_witness[0]
    return Lab(
        name=name, dir=lab_dir(name), source_config=str(config_path), engine=engine, deadratio=deadratio,
        vip=str(c.vip.ip), vips={str(c.vhid): str(c.vip.ip), **{str(x.vhid): str(x.vip.ip) for x in c.extra_vhids}},
        proxy_port=cfg.proxy.port, origin=f"http://{origin_ip}:{ORIGIN_PORT}/",
        lan=LanSegment(netns=f"{name}-lan", bridge="br0", origin_ip=str(origin_ip)),
        client=Client(netns=f"{name}-cli", ip=str(client_ip), lan_if="eth0"),
        proxy_cmd=os.environ.get("APPLIANCE_LAB_PROXY", "").split() or None,
    )


def up(config_path: Path, name: str | None = None, engine: str | None = None, deadratio: int | None = None,
       wait: float = 45.0) -> Lab:
    """Build the lab and start everything; returns the lab (describe() gives the `lab up --json` shape)."""
    _check_host()
    cfg = loader.load(config_path)
    config_path = Path(config_path).resolve()
    name = name or f"cg{secrets.token_hex(3)}"
    _check_name(name)
    lab = _new_lab(cfg, config_path, name, engine, deadratio)
    lab.dir.mkdir(parents=True, exist_ok=True)
    lab.save()
    try:
        _build(lab, cfg, config_path)
        _wait_ready(lab, wait)
    except BaseException:
        down(name)
        raise
    for node, n in lab.nodes.items():
        n.engine_pid = daemons.engine_pid(lab, node)
    lab.save()
    return lab


def _add_node(lab: Lab, cfg: Appliance, config_path: Path, node: str, index: int) -> None:
    """The node's namespace and file tree, recorded in the lab file, and its LAN link."""
    ns = f"{lab.name}-{node}"[:60]
    topology.add_netns(lab, ns)
    nd = lab.dir / node
    live = nodes.seed_tree(nd / "state", config_path, node)
    lab.nodes[node] = LabNode(netns=ns, lan_if=cfg.cluster.interface, sync_if=cfg.cluster.sync_interface,
                              lan=str(cfg.nodes[node].lan), sync=str(cfg.nodes[node].sync), config=live,
                              state=nd / "state", dir=nd)
    lab.save()
    topology.attach_node(lab, node, index)


def _build(lab: Lab, cfg: Appliance, config_path: Path) -> None:
    """Network and nodes, then sshd on every sync address, the origin, the proxies (a warm standby on every
    node), and last the CARP supervisors."""
    topology.build_lan(lab, cfg.cluster.vip.network.prefixlen)
    for i, node in enumerate(cfg.nodes):
        _add_node(lab, cfg, config_path, node, i)
    topology.build_sync_link(lab, cfg)
    nodes.setup_ssh(lab, loader.load(next(iter(lab.nodes.values())).config))
    for node in lab.nodes:
        daemons.start_sshd(lab, node)
    daemons.start_origin(lab, ORIGIN_PORT)
    for node in lab.nodes:
        daemons.start_proxy(lab, node)
        daemons.start_admin(lab, node)
    for node in lab.nodes:
        daemons.start_carp(lab, node)


def _ready(lab: Lab, want: str) -> tuple[bool, str]:
    """(ready, what it looks like): every watchdog healthy, every sshd listening, every engine up, VIP on `want`."""
    healthy = all(daemons.carp_status(lab, nd).get("healthy") for nd in lab.nodes)
    sshd = all(daemons.sshd_listening(lab, nd) for nd in lab.nodes)
    h = topology.holders(lab)
    ok = healthy and sshd and h == [want] and all(daemons.engine_pid(lab, nd) for nd in lab.nodes)
    return ok, f"holders {h}, watchdogs healthy: {healthy}, sshd listening: {sshd}"


def _wait_ready(lab: Lab, wait: float) -> None:
    """Until every engine runs, every proxy passes the watchdog and exactly the preferred node holds the VIP;
    LabError at once when a daemon exits, or after `wait` seconds."""
    deadline = time.monotonic() + wait
    want = preferred(lab)
    last = ""
    while time.monotonic() < deadline:
        exited = daemons.exited_daemon(lab)
        if exited:
            raise LabError(exited)
        ok, last = _ready(lab, want)
        if ok:
            return
        time.sleep(0.2)
    raise LabError(f"lab not ready after {wait:.0f} s ({last}); logs in {lab.dir}")


def describe(lab: Lab) -> dict:
    """The documented `lab up --json` shape (plus name and dir)."""
    return {
        "name": lab.name, "dir": str(lab.dir), "vip": lab.vip, "proxy_port": lab.proxy_port, "origin": lab.origin,
        "client": {"netns": lab.client.netns},
        "nodes": {node: {"netns": n.netns, "engine_pid": daemons.engine_pid(lab, node), "proxy_pid": n.proxy_pid,
                         "sshd_pid": n.sshd_pid, "lan_if": n.lan_if, "config": str(n.config)}
                  for node, n in lab.nodes.items()},
    }


def status(lab: Lab) -> dict:
    """describe() plus, per node, its recorded role, watchdog health and which daemons run; VIP holders per vhid."""
    d = describe(lab)
    for node, n in d["nodes"].items():
        ln = lab.nodes[node]
        n["role_state"] = (read_role(Paths(ln.state)) or {}).get("role")
        n["healthy"] = daemons.carp_status(lab, node).get("healthy")
        n["proxy_alive"] = daemons.pid_alive(ln.proxy_pid)
        n["carp_alive"] = daemons.pid_alive(ln.carp_pid)
        n["sshd_alive"] = daemons.pid_alive(ln.sshd_pid)
    d["holders"] = {v: topology.holders(lab, ip) for v, ip in lab.vips.items()}
    return d


def down(name: str | None = None) -> list[str]:
    """Stop the lab's processes and delete its namespaces; works from the state file alone, also after a crash.
    Returns the namespaces removed."""
    lab = LAB.recorded(name)
    # only namespaces the lab's state file records (add_netns records each before creating it), named <name>-*,
    # that exist: never one that merely shares the prefix (without a state file, down removes no namespace)
    ours, existing = f"{lab.name}-", set(netns.netns_list())
    spaces = sorted({n for n in lab.created_netns if n.startswith(ours) and n in existing})
    # the supervisors first (they stop their engines and drop the VIP), then everything left in our namespaces;
    # a recorded PID is ours only while it still runs in one of the lab's namespaces (after a reboot or a
    # long-dead daemon the number may belong to something else: never signal that)
    inside = {p for ns in spaces for p in netns.netns_pids(ns)}
    sup = [n.carp_pid for n in lab.nodes.values()]
    daemons.kill([p for p in sup if p in inside and daemons.pid_alive(p)])
    rest = [p for n in lab.nodes.values() for p in (n.proxy_pid, n.sshd_pid)] + [lab.origin_pid]
    rest = [p for p in rest if p in inside]
    for ns in spaces:
        rest += netns.netns_pids(ns)
    daemons.kill([p for p in rest if p and daemons.pid_alive(p)], grace=2.0)
    for ns in spaces:
        netns.netns_del(ns)
    LAB.remove_dir(lab.dir)
    return spaces


@contextlib.contextmanager
def running(config_path: Path, root: Path, prefix: str = "ct", **kw):
    """A lab under `root` ($APPLIANCE_LAB_DIR set meanwhile, so `appliance lab ...` finds it), always taken down;
    raises LabError if `lab down` left a namespace behind."""
    old = os.environ.get(LAB_ROOT_ENV)
    os.environ[LAB_ROOT_ENV] = str(root)
    name = f"{prefix}{secrets.token_hex(3)}"
    try:
        yield up(config_path, name, **kw)
    finally:
        down(name)
        left = [n for n in netns.netns_list() if n.startswith(name + "-")]
        if old is None:
            os.environ.pop(LAB_ROOT_ENV, None)
        else:
            os.environ[LAB_ROOT_ENV] = old
        if left:
            raise LabError(f"lab down left namespaces: {left}")
