"""Run inside the lab's LAN namespace (root): capture one heartbeat on its way to a node and send it to the node
again, as is (a replay) or with one byte of its body changed (a forgery), the attacks a LAN host can make."""
from __future__ import annotations

import json
import socket
import struct
import sys
import time

ETH_P_ALL, PACKET_OUTGOING = 0x0003, 4


def capture(iface: str, dst: str, port: int, timeout: float) -> bytes:
    """One IPv4/UDP frame to dst:port leaving `iface` (a bridge port, so towards the node), within timeout."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    s.settimeout(0.2)
    end = time.monotonic() + timeout
    want = socket.inet_aton(dst)
    while time.monotonic() < end:
        try:
            frame, addr = s.recvfrom(2048)
        except socket.timeout:
            continue
        if addr[2] != PACKET_OUTGOING or frame[12:14] != b"\x08\x00" or frame[23] != 17 or frame[30:34] != want:
            continue
        ihl = (frame[14] & 0x0F) * 4
        if struct.unpack("!H", frame[14 + ihl + 2:14 + ihl + 4])[0] == port:
            return frame
    raise SystemExit(f"no heartbeat to {dst}:{port} seen on {iface} within {timeout} s")


def no_checksum(frame: bytes) -> bytearray:
    """The frame with its UDP checksum off (0: none, legal in IPv4). A frame captured on a veth leaves the checksum
    to the device (offload), so as captured it would be dropped on arrival; an attacker fixes it the same way."""
    udp = 14 + (frame[14] & 0x0F) * 4
    out = bytearray(frame)
    out[udp + 6:udp + 8] = b"\0\0"
    return out


def forge(frame: bytes) -> bytes:
    """The same frame with one byte of the heartbeat changed."""
    out = no_checksum(frame)
    out[14 + (frame[14] & 0x0F) * 4 + 8 + 40] ^= 0x55          # inside the heartbeat's body, before its MAC
    return bytes(out)


def main(iface: str, dst: str, port: int, mode: str, count: int) -> None:
    frame = capture(iface, dst, port, 5.0)
    out = forge(frame) if mode == "forge" else bytes(no_checksum(frame))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    for _ in range(count):
        s.send(out)
    print(json.dumps({"mode": mode, "sent": count, "bytes": len(out)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
