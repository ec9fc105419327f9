"""A stub DNS server of the tests' own (UDP, loopback): fixed A/AAAA answers, NXDOMAIN for anything else."""
from __future__ import annotations

import socket
import struct
import threading
from ipaddress import ip_address


class StubDNS:
    """Answers A (1) and AAAA (28) queries from `records` {name: [addresses]} on 127.0.0.1:<port>; `queries` logs
    the names asked. Start with start(), end with close() (the thread ends with the socket)."""

    def __init__(self, records: dict[str, list[str]], host: str = "127.0.0.1"):
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.address = self.sock.getsockname()
        self.queries: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "StubDNS":
        self.thread.start()
        return self

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                self.sock.sendto(self.answer(data), peer)
            except (OSError, ValueError, IndexError, struct.error):
                continue

    def answer(self, q: bytes) -> bytes:
        qid = q[:2]
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode("ascii", "replace"))
            i += q[i] + 1
        qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
        question = q[12:i + 5]
        name = ".".join(labels).lower()
        self.queries.append(name)
        addrs = [ip_address(a) for a in self.records.get(name, [])]
        want = [a for a in addrs if (a.version == 4) == (qtype == 1)] if qtype in (1, 28) else []
        rcode = 0 if name in self.records else 3
        out = qid + struct.pack("!HHHHH", 0x8180 | rcode, 1, len(want), 0, 0) + question
        for a in want:
            out += struct.pack("!HHHIH", 0xC00C, qtype, 1, 0, len(a.packed)) + a.packed  # TTL 0: asked every time
        return out
