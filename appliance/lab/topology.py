"""The lab's network: namespaces (recorded as they are made), the LAN bridge, veth links, addresses, the sync
link; and who holds a VIP right now."""
from __future__ import annotations

import ipaddress

from appliance.core.model import Appliance
from appliance.ha import ip as netns
from appliance.lab.model import Lab, LabError


def free_hosts(net: ipaddress.IPv4Network, used: set, count: int) -> list[ipaddress.IPv4Address]:
    """`count` addresses from the top of net that nobody in the cluster file uses (origin, client)."""
    out = []
    for host in reversed(list(net.hosts())[-64:]):
        if host not in used:
            out.append(host)
            if len(out) == count:
                return out
    raise LabError(f"no {count} free addresses left at the top of {net}")


def add_netns(lab: Lab, ns: str) -> None:
    """Record a namespace in the lab file, then create it (so `lab down`, which removes only recorded namespaces,
    removes it after any crash)."""
    lab.created_netns.append(ns)
    lab.save()
    netns.netns_add(ns)


def build_lan(lab: Lab, prefix: int) -> None:
    """The LAN namespace with its bridge (carrying the origin's address) and the client on a veth to it."""
    lan_ns, cli_ns, br = lab.lan.netns, lab.client.netns, lab.lan.bridge
    add_netns(lab, lan_ns)
    netns.ip("link", "add", br, "type", "bridge", netns=lan_ns)
    # a fixed address: a bridge otherwise takes its lowest port's, so a port leaving (a lab's LAN cut) would change
    # the origin's MAC under every node's ARP cache
    netns.ip("link", "set", br, "address", "02:ca:fe:00:00:01", netns=lan_ns)
    netns.ip("link", "set", br, "up", netns=lan_ns)
    # the origin (the lab's gateway) answers ARP only on the bridge, as a host of its own would: a node port taken
    # off the bridge (a LAN cut) must not reach it through the namespace it shares with the bridge
    for scope in ("all", "default"):
        netns.sysctl(lan_ns, f"net.ipv4.conf.{scope}.arp_ignore", "1")
    netns.ip("addr", "add", f"{lab.lan.origin_ip}/{prefix}", "dev", br, netns=lan_ns)
    add_netns(lab, cli_ns)
    eth = lab.client.lan_if
    netns.ip("link", "add", eth, "type", "veth", "peer", "name", "pcli", "netns", lan_ns, netns=cli_ns)
    netns.ip("link", "set", "pcli", "master", br, "up", netns=lan_ns)
    netns.ip("addr", "add", f"{lab.client.ip}/{prefix}", "dev", eth, netns=cli_ns)
    netns.ip("link", "set", eth, "up", netns=cli_ns)


def attach_node(lab: Lab, node: str, index: int) -> None:
    """The node's LAN interface: a veth into the LAN bridge, its address, up; it may bind the VIP before holding it."""
    n, lan_ns = lab.nodes[node], lab.lan.netns
    netns.ip("link", "add", n.lan_if, "type", "veth", "peer", "name", f"p{index}", "netns", lan_ns, netns=n.netns)
    netns.ip("link", "set", f"p{index}", "master", lab.lan.bridge, "up", netns=lan_ns)
    netns.ip("addr", "add", n.lan, "dev", n.lan_if, netns=n.netns)
    netns.ip("link", "set", n.lan_if, "up", netns=n.netns)
    netns.sysctl(n.netns, "net.ipv4.ip_nonlocal_bind", "1")


def build_sync_link(lab: Lab, cfg: Appliance) -> None:
    """The dedicated sync link: a veth pair for two nodes, a bridge of its own (in the LAN namespace) for more."""
    sync_if, names = cfg.cluster.sync_interface, list(lab.nodes)
    if len(names) == 2:
        a, b = (lab.nodes[n].netns for n in names)
        netns.ip("link", "add", sync_if, "type", "veth", "peer", "name", sync_if, "netns", b, netns=a)
    else:
        lan_ns = lab.lan.netns
        netns.ip("link", "add", "br1", "type", "bridge", netns=lan_ns)
        netns.ip("link", "set", "br1", "up", netns=lan_ns)
        for i, node in enumerate(names):
            ns = lab.nodes[node].netns
            netns.ip("link", "add", sync_if, "type", "veth", "peer", "name", f"s{i}", "netns", lan_ns, netns=ns)
            netns.ip("link", "set", f"s{i}", "master", "br1", "up", netns=lan_ns)
    for n in lab.nodes.values():
        netns.ip("addr", "add", n.sync, "dev", n.sync_if, netns=n.netns)
        netns.ip("link", "set", n.sync_if, "up", netns=n.netns)


def holders(lab: Lab, vip: str | None = None) -> list[str]:
    """Nodes whose LAN interface carries the VIP right now (ip addr in each namespace)."""
    addr = ipaddress.IPv4Address(vip or lab.vip)
    return [node for node, n in lab.nodes.items() if netns.has_address(n.lan_if, addr, n.netns)]
