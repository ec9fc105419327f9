"""Run inside the lab's namespaces (root): the attacks a LAN host can make on the fast liveness heartbeats.

`PORT_IFACE DST PORT replay|forge COUNT` (in the LAN namespace, on the node's bridge port): capture one heartbeat on
its way to the node and send it again, as is (a replay) or with one byte of its body changed (a forgery).
`holdback IFACE DST PORT SECONDS GO_FILE TO_MAC EVERY` (in the client namespace, the master's heartbeats steered to
it by a spoofed neighbour entry): keep every heartbeat to DST for SECONDS, then, once GO_FILE exists, release them
to TO_MAC one every EVERY seconds (a LAN host delaying the master's heartbeats past its death)."""
from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

ETH_P_ALL, PACKET_HOST, PACKET_OUTGOING = 0x0003, 0, 4


def capture(iface: str, dst: str, port: int, timeout: float, kind: int = PACKET_OUTGOING) -> bytes:
    """One IPv4/UDP frame to dst:port seen on `iface` (leaving a bridge port towards the node, or `kind`)."""
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
        if addr[2] != kind or frame[12:14] != b"\x08\x00" or frame[23] != 17 or frame[30:34] != want:
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


def hold_back(iface: str, dst: str, port: int, seconds: float, go: str, to_mac: str, every: float) -> None:
    frames, end = [], time.monotonic() + seconds
    while time.monotonic() < end and len(frames) < 500:
        try:
            frames.append(capture(iface, dst, port, max(0.05, end - time.monotonic()), PACKET_HOST))
        except SystemExit:
            break
    print(f"captured {len(frames)}", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    mac = bytes.fromhex(to_mac.replace(":", ""))
    for f in frames:
        out = no_checksum(f)
        out[0:6] = mac
        s.send(bytes(out))
        time.sleep(every)
    print(json.dumps({"mode": "holdback", "sent": len(frames)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "holdback":
        hold_back(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6], sys.argv[7],
                  float(sys.argv[8]))
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
