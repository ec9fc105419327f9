"""Cross-field rules of the cluster file (addresses, skews, vhids, the proxy, list directories): [(path, message)]."""
from __future__ import annotations

import re
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model calls these rules from its validator; only the type is needed here
    from appliance.core.model import Appliance

CATEGORY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")  # a list category: one directory name


class ClusterRuleError(ValueError):
    """Cross-field problems found after the fields themselves validated: [(path, message)]."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
        self.problems = problems


def cluster_rules(cfg: Appliance, base: Path | None) -> list[tuple[str, str]]:
    """Every cross-field problem; with `base` (the config file's directory) also missing list directories."""
    seen_addr: dict[IPv4Address, str] = {}
    problems = _node_rules(cfg, seen_addr) + _sync_link_rules(cfg) + _vhid_rules(cfg, seen_addr)
    problems += _proxy_rules(cfg) + _policy_rules(cfg) + _os_rules(cfg) + _witness_rules(cfg, seen_addr)
    if base is not None:
        problems.extend(_check_lists(cfg, base))
    return problems


def _witness_rules(cfg: Appliance, seen_addr: dict[IPv4Address, str]) -> list[tuple[str, str]]:
    """Each LAN witness a third host on the VIP's subnet: not a node, not a VIP."""
    c, problems = cfg.cluster, []
    vips = {c.vip.ip} | {x.vip.ip for x in c.extra_vhids}
    for i, w in enumerate(cfg.ha.lan_witness):
        if w not in c.vip.network:
            problems.append((f"ha.lan_witness[{i}]", f"{w} is not on the LAN ({c.vip.network})"))
        elif w in seen_addr or w in vips:
            problems.append((f"ha.lan_witness[{i}]", f"{w} is {seen_addr.get(w, 'a VIP')}'s: a witness must be "
                                                      "a third host (the gateway, a switch)"))
    return problems


def _node_rules(cfg: Appliance, seen_addr: dict[IPv4Address, str]) -> list[tuple[str, str]]:
    """Each node on the VIP's subnet, unique advskew and addresses, a sync address off the LAN.
    Fills `seen_addr` (address -> node) for the vhid rules."""
    c, problems = cfg.cluster, []
    seen_skew: dict[int, str] = {}
    for name, n in cfg.nodes.items():
        if c.vip.ip not in n.lan.network:
            problems.append((f"nodes.{name}.lan", f"{n.lan} is not on the VIP's subnet ({c.vip.ip} not in {n.lan.network})"))
        if n.lan.ip == c.vip.ip:
            problems.append((f"nodes.{name}.lan", f"{n.lan.ip} equals the VIP"))
        if n.advskew in seen_skew:
            problems.append((f"nodes.{name}.advskew", f"{n.advskew} is also {seen_skew[n.advskew]}'s advskew (ambiguous master)"))
        seen_skew.setdefault(n.advskew, name)
        for field, addr in (("lan", n.lan.ip), ("sync", n.sync.ip)):
            if addr in seen_addr:
                problems.append((f"nodes.{name}.{field}", f"{addr} is already used by {seen_addr[addr]}"))
            seen_addr.setdefault(addr, f"{name}")
        if n.sync.network.overlaps(n.lan.network) or n.sync.ip == c.vip.ip:
            problems.append((f"nodes.{name}.sync", f"{n.sync} is on the LAN; the sync link must be its own subnet"))
        for f, iface in (("lan", n.lan), ("sync", n.sync)):
            if iface.ip in (iface.network.network_address, iface.network.broadcast_address) and iface.network.prefixlen < 31:
                problems.append((f"nodes.{name}.{f}", f"{iface} is the subnet's network or broadcast address"))
    return problems

def _sync_link_rules(cfg: Appliance) -> list[tuple[str, str]]:
    nodes, problems = cfg.nodes, []
    if len({str(n.sync.network) for n in nodes.values()}) > 1:
        first = next(iter(nodes))
        for name, n in nodes.items():
            if str(n.sync.network) != str(nodes[first].sync.network):
                problems.append((f"nodes.{name}.sync", f"{n.sync} is not in {first}'s sync subnet {nodes[first].sync.network}"))
                break
    if cfg.cluster.interface == cfg.cluster.sync_interface:
        problems.append(("cluster.sync_interface", f"{cfg.cluster.sync_interface} is also the LAN interface; the sync link must be dedicated"))
    return problems

def _vhid_rules(cfg: Appliance, seen_addr: dict[IPv4Address, str]) -> list[tuple[str, str]]:
    c, problems = cfg.cluster, []
    vhids = {c.vhid: "cluster.vhid"}
    for i, x in enumerate(c.extra_vhids):
        if x.vhid in vhids:
            problems.append((f"cluster.extra_vhids[{i}].vhid", f"{x.vhid} is already used by {vhids[x.vhid]}"))
        vhids.setdefault(x.vhid, f"cluster.extra_vhids[{i}]")
        for name in x.advskew:
            if name not in cfg.nodes:
                problems.append((f"cluster.extra_vhids[{i}].advskew.{name}", "no such node"))
        for name, n in cfg.nodes.items():
            if x.vip.ip not in n.lan.network or x.vip.ip in seen_addr or x.vip.ip == c.vip.ip:
                problems.append((f"cluster.extra_vhids[{i}].vip", f"{x.vip} must be a free address on {n.lan.network}"))
                break
    return problems

def _proxy_rules(cfg: Appliance) -> list[tuple[str, str]]:
    problems = []
    if not cfg.proxy.open_proxy:
        for i, net in enumerate(cfg.proxy.clients):
            if net.prefixlen == 0:
                problems.append((f"proxy.clients[{i}]", f"{net} makes an open proxy; set proxy.open_proxy: true if you really mean it"))
    listen = cfg.proxy.listen
    if isinstance(listen, IPv4Address):
        ok = listen == cfg.cluster.vip.ip or any(listen == n.lan.ip for n in cfg.nodes.values())
        if not ok and not listen.is_loopback:
            problems.append(("proxy.listen", f"{listen} is neither the VIP, a node's LAN address nor loopback"))
    return problems

def _policy_rules(cfg: Appliance) -> list[tuple[str, str]]:
    problems = []
    for i, p in enumerate(cfg.filter.policies):
        for f in ("block", "allow"):
            for cat in getattr(p, f):
                if not CATEGORY_RE.match(cat):
                    problems.append((f"filter.policies[{i}].{f}", f"{cat!r} is not a category directory name"))
    return problems

# NIC names only one of the two systems gives: FreeBSD names a NIC by its driver (em0, igb0, vtnet0); Linux by the
# kernel's eth<N> or systemd's predictable names (eno1, ens3, enp0s3, enx<MAC>, wlp2s0)
FREEBSD_NIC_RE = re.compile(r"^(em|igb|igc|ix|ixl|ixv|ice|re|rl|bge|bce|bxe|vtnet|xn|hn|vmx|lagg|fxp|msk|sk|nfe|alc|ale|"
                            r"age|axe|axge|ue|cxgbe|cxl|mlxen|mce|ql|oce|lem|epair|bnxt|mgb|cas|gem|dc|vge|jme|et)[0-9]+(\.[0-9]+)?$")
LINUX_NIC_RE = re.compile(r"^(eth[0-9]+|en(o|s|p|x)[0-9a-f][0-9a-z_]*|wl(o|s|p|x)[0-9a-z_]+)(\.[0-9]+)?$")
DEBIAN_SYNC_USERS = ("appliance-sync", "root")  # the package makes appliance-sync (sudoers, sshd drop-in)


def _os_rules(cfg: Appliance) -> list[tuple[str, str]]:
    """cluster.os: a setting of the other system, or a NIC name the nodes' system never gives, is refused."""
    c, problems = cfg.cluster, []
    other = "freebsd" if c.os == "debian" else "debian"
    if other in c.model_fields_set:
        problems.append((f"cluster.{other}", f"is a setting of cluster.os: {other} nodes; this cluster is cluster.os: {c.os} "
                                             f"(remove it{' or use cluster.debian' if other == 'freebsd' else ''})"))
    for field in ("interface", "sync_interface"):
        name = getattr(c, field)
        if c.os == "debian" and FREEBSD_NIC_RE.match(name):
            problems.append((f"cluster.{field}", f"{name} is a FreeBSD interface name; a Debian node's NICs are eth0, eth1, ... "
                                                 "(the image boots with net.ifnames=0)"))
        elif c.os == "freebsd" and LINUX_NIC_RE.match(name):
            problems.append((f"cluster.{field}", f"{name} is a Linux interface name; FreeBSD names a NIC by its driver "
                                                 "(em0, igb0, vtnet0); for Linux nodes set cluster.os: debian"))
    if c.os == "debian" and cfg.sync.user not in DEBIAN_SYNC_USERS:
        problems.append(("sync.user", f"{cfg.sync.user} is not a sync user the Debian package sets up "
                                      f"({' or '.join(DEBIAN_SYNC_USERS)})"))
    return problems


def _check_lists(cfg: Appliance, base: Path) -> list[tuple[str, str]]:
    lists = cfg.lists_dir(base)
    out: list[tuple[str, str]] = []
    if not lists.is_dir():
        return [("filter.lists", f"directory {lists} does not exist")]
    refs: list[tuple[str, list[str]]] = [
        ("filter.block", cfg.filter.block),
        ("filter.allow", cfg.filter.allow),
        ("filter.intercept_exempt", cfg.filter.intercept_exempt),
    ]
    for i, p in enumerate(cfg.filter.policies):
        refs += [(f"filter.policies[{i}].block", p.block), (f"filter.policies[{i}].allow", p.allow)]
    for path, cats in refs:
        for j, cat in enumerate(cats):
            if not (lists / cat).is_dir():
                out.append((f"{path}[{j}]", f"category {cat!r} has no directory {lists / cat}"))
    return out

