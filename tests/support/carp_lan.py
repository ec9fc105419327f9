"""Throwaway CARP LANs in network namespaces for the speaker tests and bench: a bridge, N nodes, an advert observer."""
from __future__ import annotations

import json
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.ha import protocol as cp
from tests.support.wait import poll

ROOT = Path(__file__).resolve().parents[2]       # the repo root (cwd of the children: -m appliance..., -m tests...)
PY = sys.executable
SUBNET = "10.231.{}.{}"

UPDOWN = """#!/bin/sh
# $1 iface, $2 VIP, $3 log file (xparam)
if [ "$(basename "$0")" = up.sh ]; then ip addr add "$2/32" dev "$1" 2>/dev/null; w=up
else ip addr del "$2/32" dev "$1" 2>/dev/null; w=down; fi
echo "$w $(cut -d' ' -f1 /proc/uptime) $1 $2" >> "$3"
"""


def sh(*cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout)


@dataclass
class Node:
    name: str
    netns: str
    ip: str
    ifname: str = "eth0"
    log: Path | None = None
    proc: subprocess.Popen | None = None
    stderr: Path | None = None

    def has_vip(self, vip: str) -> bool:
        out = sh("ip", "-n", self.netns, "-4", "-o", "addr", "show", "dev", self.ifname, check=False).stdout
        return f" {vip}/" in out

    def events(self) -> list[str]:
        return self.log.read_text().split("\n")[:-1] if self.log and self.log.exists() else []


@dataclass
class Lan:
    """`n` nodes on one bridge; everything lives in namespaces named cgsp-<suffix>-*; close() removes all."""

    n: int
    workdir: Path
    net: int = 0
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: list[Node] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def sw(self) -> str:
        return f"cgsp-{self.suffix}-sw"

    def vip(self, k: int = 100) -> str:
        return SUBNET.format(self.net, k)

    def up(self) -> "Lan":
        sh("ip", "netns", "add", self.sw)
        sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0", "forward_delay", "0")
        sh("ip", "-n", self.sw, "link", "set", "br0", "up")
        sh("ip", "-n", self.sw, "link", "set", "lo", "up")
        for i in range(self.n):
            ns = f"cgsp-{self.suffix}-n{i}"
            sh("ip", "netns", "add", ns)
            peer = f"sp{self.suffix}{i}"
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer, "netns", self.sw)
            sh("ip", "-n", self.sw, "link", "set", peer, "master", "br0", "up")
            ip = SUBNET.format(self.net, i + 1)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            node = Node(name=f"n{i}", netns=ns, ip=ip, log=self.workdir / f"n{i}.events",
                        stderr=self.workdir / f"n{i}.stderr")
            self.nodes.append(node)
        for name in ("up.sh", "down.sh"):
            p = self.workdir / name
            p.write_text(UPDOWN)
            p.chmod(0o755)
        pf = self.workdir / "pass"
        pf.write_text("s3cret-pass\n")
        pf.chmod(0o600)
        return self

    @property
    def passfile(self) -> Path:
        return self.workdir / "pass"

    def engine_argv(self, engine: str, node: Node, vhid: int = 1, advbase: int = 1, advskew: int = 0,
                    preempt: bool = True, deadratio: int = 3, extra: list[str] | None = None) -> list[str]:
        common = [f"--interface={node.ifname}", f"--srcip={node.ip}", f"--vhid={vhid}",
                  f"--passfile={self.passfile}", f"--addr={self.vip()}", f"--advbase={advbase}",
                  f"--advskew={advskew}", f"--deadratio={deadratio}", f"--upscript={self.workdir / 'up.sh'}",
                  f"--downscript={self.workdir / 'down.sh'}", f"--xparam={node.log}", "--shutdown"]
        if preempt:
            common.append("--preempt")
        if engine == "ucarp":
            return ["ucarp", *common, *(extra or [])]
        return [PY, "-m", "appliance.ha.speaker", *common, *(extra or [])]

    def start(self, engine: str, node: Node, **kw) -> subprocess.Popen:
        argv = ["ip", "netns", "exec", node.netns, *self.engine_argv(engine, node, **kw)]
        err = open(node.stderr, "ab")
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, start_new_session=True)
        err.close()
        node.proc = p
        self.procs.append(p)
        return p

    def stop(self, node: Node, sig: int = signal.SIGTERM, wait: float = 10) -> None:
        p = node.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)

    def holders(self) -> list[str]:
        return [n.name for n in self.nodes if n.has_vip(self.vip())]

    def observe(self) -> "Observer":
        o = Observer(self.sw)
        self.procs.append(o.proc)
        return o

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for n in self.nodes:
            sh("ip", "netns", "del", n.netns, check=False)
        sh("ip", "netns", "del", self.sw, check=False)


class Observer:
    """Records every CARP advert crossing the bridge: (monotonic time, src, vhid, advbase, advskew)."""

    def __init__(self, sw_netns: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", sw_netns, PY, "-u", "-m", "tests.support.carp_lan", "observe", "br0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.adverts: list[dict] = []
        self._lock = threading.Lock()
        # "ready" once the socket is bound (bounded: a child that hangs fails here, not forever)
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        first = self.proc.stdout.readline() if ready else ""
        if not first.startswith("ready"):
            self.close()
            raise RuntimeError(f"observer did not start: {first!r}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.adverts.append(d)

    def since(self, t: float) -> list[dict]:
        with self._lock:
            return [a for a in self.adverts if a["t"] >= t]

    def first(self, pred, t0: float) -> dict | None:
        """The first advert seen since t0 that matches pred, or None (yet)."""
        return next((a for a in self.since(t0) if pred(a)), None)

    def wait_for(self, pred, t0: float, timeout: float) -> dict | None:
        """First advert after t0 matching pred, waiting at most `timeout` seconds; None if none came."""
        return poll(lambda: self.first(pred, t0), timeout, step=0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _observe(iface: str) -> None:
    """Child process: AF_PACKET on the bridge, print one JSON line per CARP packet (bounded by the parent's kill)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    s.bind((iface, 0x0800))
    print("ready", flush=True)
    while True:
        frame, addr = s.recvfrom(2048)
        t = time.monotonic()
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        try:
            rx = cp.parse_ip(frame)
        except cp.BadPacket:
            continue
        a = rx.advert
        print(json.dumps({"t": t, "src": rx.src, "ttl": rx.ttl, "vhid": a.vhid, "advbase": a.advbase,
                          "advskew": a.advskew, "counter": a.counter, "smac": addr[4].hex(":") if len(addr) > 4 else ""}),
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "observe":
        _observe(sys.argv[2])
