"""The speaker's raw-socket pieces: multicast membership, the link's state, a gratuitous ARP frame."""
from __future__ import annotations

import fcntl
import socket
import struct

ETH_P_ARP = 0x0806
SIOCGIFFLAGS = 0x8913
IFF_UP, IFF_RUNNING = 0x1, 0x40


def mreqn(group: str, addr: str, ifindex: int) -> bytes:
    return struct.pack("4s4si", socket.inet_aton(group), socket.inet_aton(addr), ifindex)


def link_running(sock: socket.socket, iface: str) -> bool:
    """IFF_UP and IFF_RUNNING (carrier); OSError when the interface is gone."""
    res = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack("16sh14x", iface.encode(), 0))
    flags = struct.unpack("16sh14x", res)[1]
    return bool(flags & IFF_UP) and bool(flags & IFF_RUNNING)


def garp_frame(hwaddr: bytes, vip: str) -> bytes:
    """ucarp's gratuitous ARP: a broadcast request with sender = target = (our MAC, VIP)."""
    ip = socket.inet_aton(vip)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, hwaddr, ip, hwaddr, ip)
    return b"\xff" * 6 + hwaddr + struct.pack("!H", ETH_P_ARP) + arp
