"""The LAN witness: an ARP request to each `ha.lan_witness` address every fast interval, and who answered.

When a backup stops hearing the master on the LAN while the sync link still carries its heartbeats, either the
backup or the master is cut off from the clients, and the two nodes alone cannot tell which (the cut is the same
seen from both ends). A third LAN host that answers ARP (the gateway, a switch's address) can: the node it still
answers is the one on the LAN. Linux (a packet socket on the LAN interface); not available on FreeBSD.
"""
from __future__ import annotations

import socket
import struct
from pathlib import Path

from appliance.ha.netio import ETH_P_ARP

BROADCAST = b"\xff" * 6


def request_frame(hwaddr: bytes, own_ip: str, target: str) -> bytes:
    """A broadcast ARP request: who has `target`? tell (our MAC, our LAN address)."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, hwaddr, socket.inet_aton(own_ip), b"\0" * 6,
                      socket.inet_aton(target))
    return BROADCAST + hwaddr + struct.pack("!H", ETH_P_ARP) + arp


def reply_from(frame: bytes) -> str | None:
    """The sender address of an ARP reply frame (None for anything else)."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06" or frame[20:22] != b"\x00\x02":
        return None
    return socket.inet_ntoa(frame[28:32])


class Witness:
    """ARP requests out, replies in; `reachable()` says whether any witness answered lately."""

    def __init__(self, iface: str, own_ip: str, targets: list[str]) -> None:
        self.iface, self.own_ip, self.targets = iface, own_ip, list(targets)
        self.seen: dict[str, float] = {}
        self.sock: socket.socket | None = None

    def open(self) -> None:
        self.hwaddr = bytes.fromhex(Path(f"/sys/class/net/{self.iface}/address").read_text().strip().replace(":", ""))
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        s.bind((self.iface, ETH_P_ARP))
        s.setblocking(False)
        self.sock = s

    def fileno(self) -> int:
        return self.sock.fileno()

    def probe(self) -> None:
        """One ARP request per call, to the witnesses in turn: at most 10 a second per node whatever their number
        (switches police ARP per port, e.g. Cisco DAI's default of 15 a second err-disables the port)."""
        self.turn = (getattr(self, "turn", -1) + 1) % len(self.targets)
        try:
            self.sock.send(request_frame(self.hwaddr, self.own_ip, self.targets[self.turn]))
        except OSError:
            pass                        # link down: nobody answers, which is the answer

    def receive(self, now: float) -> None:
        for _ in range(64):             # bounded drain per wake-up
            try:
                frame = self.sock.recv(128)
            except (BlockingIOError, InterruptedError, OSError):
                return
            src = reply_from(frame)
            if src in self.targets:
                self.seen[src] = now

    def reachable(self, now: float, window: float) -> bool:
        return any(now - t <= window for t in self.seen.values())

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
