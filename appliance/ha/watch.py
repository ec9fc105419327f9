"""`appliance carp-watch`: listen to the CARP adverts on the LAN (read-only) and flag the forged ones.

Kernel CARP (FreeBSD) and ucarp check only the digest, which covers neither the source address nor advbase and
advskew: a replayed advert with a better advbase/advskew moves the VIP. The watcher sees what they accept and
says when no configured node can be sending it: a valid digest (pass or pass_next) from an address that is no
node's LAN address, with an advbase other than cluster.advbase, or with an advskew below the sending node's
configured one for that vhid, or from a node that says over the sync link, in an answer given after the advert
arrived, that it is BACKUP (one given before may predate a takeover). It logs (rate-limited),
counts in <run>/carp-watch.json (what `appliance status` shows) and <run>/carp-watch.prom (Prometheus text)."""
from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from appliance.core.fsio import read_json, write_json_atomic, write_text_atomic
from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.ha import protocol as cp
from appliance.ha import role

STATE_NAME = "carp-watch.json"
PROM_NAME = "carp-watch.prom"
MAX_SOURCES = 32          # per-source counters kept (the rest are counted under "other"): bounded memory
LOG_EVERY = 10.0          # seconds between log lines for one (source, reason)
WRITE_EVERY = 1.0         # seconds between state file writes
PENDING_MAX = 64          # adverts from a node that said BACKUP, waiting for its next answer
PENDING_FOR = 30.0        # seconds an unanswered one waits before it is dropped (unknown, not counted)
# node, after -> (role, answered_at): what the node last said over the sync link; asks again (in the background)
# when that answer is older than `after`
PeerRole = Callable[[str, float], "tuple[str, float] | None"]


@dataclass(frozen=True)
class Sender:
    """What one node may send for one vhid."""

    node: str
    advskew: int


@dataclass
class Expect:
    """The cluster as the watcher needs it: per vhid its VIP and senders, the advbase and the passes."""

    advbase: int
    passes: list[bytes]
    vips: dict[int, str]
    senders: dict[int, dict[str, Sender]]  # vhid -> LAN address -> sender

    @classmethod
    def from_config(cls, cfg: Appliance) -> "Expect":
        c = cfg.cluster
        passes = [p.get_secret_value().encode() for p in (c.password, getattr(c, "password_next", None)) if p]
        vips: dict[int, str] = {}
        senders: dict[int, dict[str, Sender]] = {}
        for name, n in cfg.nodes.items():
            for g in role.groups(cfg, name):
                vips[g.vhid] = str(g.vip.ip)
                senders.setdefault(g.vhid, {})[str(n.lan.ip)] = Sender(name, g.advskew)
        return cls(c.advbase, passes, vips, senders)


def authentic(exp: Expect, a: cp.Advert) -> bool:
    """The digest is right under the current or the next pass: kernel CARP would act on this advert."""
    for pw in exp.passes:
        try:
            cp.check_auth(a, pw, a.vhid, exp.vips[a.vhid])
            return True
        except cp.BadPacket:
            continue
    return False


def judge(exp: Expect, rx: cp.Received, peer_role: PeerRole | None = None) -> tuple[str, str | None]:
    """('ignored'|'bad'|'ok'|'forged'|'suspect', why): bad = wrong header or digest (CARP drops it); forged = CARP
    would accept it but no configured node sends it; suspect = the node last said BACKUP (why = the node): its
    next answer decides (watch())."""
    a = rx.advert
    if a.vhid not in exp.vips:
        return "ignored", None
    try:
        cp.check_header(rx, a.vhid)
    except cp.BadPacket as e:
        return "bad", e.reason
    if not authentic(exp, a):
        return "bad", "badauth"
    s = exp.senders[a.vhid].get(rx.src)
    if s is None:
        return "forged", f"{rx.src} is not a node's LAN address"
    if a.is_leave:
        return "ok", None
    if a.advbase != exp.advbase:
        return "forged", f"advbase {a.advbase}: {s.node} sends advbase {exp.advbase}"
    if a.advskew < s.advskew:
        return "forged", f"advskew {a.advskew} is below {s.node}'s configured {s.advskew}"
    said = peer_role(s.node, 0.0) if peer_role else None
    if said and said[0] == "BACKUP":
        return "suspect", s.node
    return "ok", None


@dataclass
class Tally:
    """The counters, bounded: totals, the last forged advert, per-source counts for MAX_SOURCES sources."""

    path: Path
    forged: int = 0
    bad: int = 0
    ok: int = 0
    last: dict | None = None
    sources: dict[str, int] = field(default_factory=dict)
    logged: dict[tuple[str, str], float] = field(default_factory=dict)
    suppressed: int = 0
    written: float = 0.0
    dirty: bool = False

    def record(self, verdict: str, why: str | None, rx: cp.Received, log: Callable[[str], None]) -> None:
        if verdict == "ignored":
            return
        self.dirty = True
        if verdict == "ok":
            self.ok += 1
            return
        if verdict == "bad":
            self.bad += 1
            return
        self.forged += 1
        a = rx.advert
        self.last = {"src": rx.src, "vhid": a.vhid, "advbase": a.advbase, "advskew": a.advskew, "why": why,
                     "at": time.time()}
        key = rx.src if rx.src in self.sources or len(self.sources) < MAX_SOURCES else "other"
        self.sources[key] = self.sources.get(key, 0) + 1
        self._log(rx.src, why or "", f"carp-watch: forged advert vhid {a.vhid} from {rx.src} (advbase {a.advbase} "
                                     f"advskew {a.advskew}): {why}", log)

    def _log(self, src: str, why: str, msg: str, log: Callable[[str], None]) -> None:
        now = time.monotonic()
        k = (src if src in self.sources else "other", why.replace(src, "*").split(":")[0])
        if now - self.logged.get(k, -LOG_EVERY) < LOG_EVERY:
            self.suppressed += 1
            return
        if len(self.logged) > 4 * MAX_SOURCES:
            self.logged.clear()
        self.logged[k] = now
        more, self.suppressed = self.suppressed, 0
        log(msg + (f" ({more} more forged adverts not logged)" if more else ""))

    def to_json(self) -> dict:
        return {"forged": self.forged, "bad": self.bad, "ok": self.ok, "last_forged": self.last,
                "sources": self.sources, "updated": time.time()}

    def flush(self, force: bool = False) -> None:
        if not self.dirty or (not force and time.monotonic() - self.written < WRITE_EVERY):
            return
        write_json_atomic(self.path, self.to_json())
        write_text_atomic(self.path.with_name(PROM_NAME), prometheus(self))
        self.written, self.dirty = time.monotonic(), False


def prometheus(t: Tally) -> str:
    return ("# HELP appliance_carp_adverts_total CARP adverts seen on the LAN by carp-watch, by verdict\n"
            "# TYPE appliance_carp_adverts_total counter\n"
            f'appliance_carp_adverts_total{{verdict="forged"}} {t.forged}\n'
            f'appliance_carp_adverts_total{{verdict="bad"}} {t.bad}\n'
            f'appliance_carp_adverts_total{{verdict="ok"}} {t.ok}\n'
            "# HELP appliance_carp_forged_last_seconds when the last forged advert was seen (epoch)\n"
            "# TYPE appliance_carp_forged_last_seconds gauge\n"
            f"appliance_carp_forged_last_seconds {t.last['at'] if t.last else 0}\n")


def state_file(paths: Paths) -> Path:
    return paths.run / STATE_NAME


def read_state(paths: Paths) -> dict | None:
    return read_json(state_file(paths))


def open_raw(iface: str) -> socket.socket:
    """A raw IPv4 socket for protocol 112 on `iface` (Linux), joined to 224.0.0.18 there so the adverts arrive.
    Receive-only: nothing is ever sent on it. OSError when that is not possible (not root, no such interface)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, cp.IPPROTO_CARP)
    try:
        if hasattr(socket, "SO_BINDTODEVICE"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        mreq = struct.pack("4s4si", socket.inet_aton(cp.CARP_MCAST), socket.inet_aton("0.0.0.0"),
                           socket.if_nametoindex(iface))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        s.settimeout(0.5)
    except OSError:
        s.close()
        raise
    return s


def raw_packets(s: socket.socket, stop: Callable[[], bool]) -> Iterator[bytes]:
    """What the socket receives until stop(); b"" every half second without a packet (a tick)."""
    with s:
        while not stop():
            try:
                yield s.recv(2048)
            except socket.timeout:
                yield b""


def pcap_packets(stream: BinaryIO, stop: Callable[[], bool]) -> Iterator[bytes]:
    """IPv4 packets from a pcap stream of Ethernet frames (`tcpdump -U -w - ip proto 112`, the FreeBSD path:
    kernel CARP consumes protocol 112 before raw sockets see it)."""
    head = stream.read(24)
    if len(head) < 24:
        return
    endian = "<" if head[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", head[20:24])[0]
    skip = 14 if linktype == 1 else 0  # DLT_EN10MB; DLT_RAW and friends carry the IP packet as is
    while not stop():
        rec = stream.read(16)
        if len(rec) < 16:
            return
        incl = struct.unpack(endian + "IIII", rec)[2]
        if incl > 65535:
            return  # not a pcap stream we understand
        frame = stream.read(incl)
        if skip and frame[12:14] != b"\x08\x00":
            continue  # not IPv4 (a VLAN tag: tcpdump's filter would have needed `vlan and`)
        yield frame[skip:]


def settle(pending: list, tally: Tally, log: Callable[[str], None], peer_role: PeerRole) -> None:
    """Decide the adverts from nodes that said BACKUP: forged when an answer given after the advert still says
    BACKUP, fine when it says anything else, dropped unanswered after PENDING_FOR seconds."""
    now = time.time()
    for item in list(pending):
        rx, node, seen = item
        said = peer_role(node, seen)
        if said is not None and said[1] > seen:
            pending.remove(item)
            if said[0] == "BACKUP":
                tally.record("forged", f"{node} says over the sync link it is BACKUP (not sending adverts)", rx, log)
            else:
                tally.record("ok", None, rx, log)
        elif now - seen > PENDING_FOR:
            pending.remove(item)


def watch(exp: Expect, packets: Iterator[bytes], tally: Tally, log: Callable[[str], None],
          peer_role: PeerRole | None = None) -> None:
    """Judge every packet `packets` yields (b"" is a tick), keep the tally and its files current."""
    pending: list = []
    for pkt in packets:
        if pkt:
            try:
                rx = cp.parse_ip(pkt)
            except cp.BadPacket:
                tally.bad += 1
                tally.dirty = True
                continue
            verdict, why = judge(exp, rx, peer_role)
            if verdict == "suspect":
                if len(pending) < PENDING_MAX and not any(p[1] == why for p in pending):
                    pending.append((rx, why, time.time()))
            else:
                tally.record(verdict, why, rx, log)
        if pending and peer_role:
            settle(pending, tally, log, peer_role)
        tally.flush()
    tally.flush(force=True)


def summary(d: dict | None) -> str | None:
    """One line for `appliance status`; None when the watcher never ran here."""
    if not d:
        return None
    last = d.get("last_forged")
    if not last:
        return f"forged adverts: 0 (bad {d.get('bad', 0)}, good {d.get('ok', 0)})"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["at"]))
    return (f"forged adverts: {d['forged']}, last from {last['src']} at {when} (vhid {last['vhid']} advbase "
            f"{last['advbase']} advskew {last['advskew']}: {last['why']}); bad {d.get('bad', 0)}")
