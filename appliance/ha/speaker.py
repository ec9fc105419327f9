"""A small CARP speaker (IPv4), wire-compatible with ucarp and FreeBSD carp, with monotonic, deadline-driven timers.

Run as `python -m appliance.ha.speaker` with ucarp's options (see --help). Differences from ucarp 1.5.2:
the poll timeout is computed from the next deadline (no 1 s pcap-timeout lag), SIGTERM sends a leave
advert (advbase 255/advskew 255) so backups take over at once, a master that sees a better master steps
down silently, scripts run in a worker thread so adverts never stall, a downed link means BACKUP (not exit).
"""
from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import logging
import os
import queue
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.ha import protocol as cp

log = logging.getLogger("carp-speaker")

INIT, BACKUP, MASTER = "INIT", "BACKUP", "MASTER"
LINK_POLL = 0.5             # seconds between interface-state checks
ETH_P_ARP = 0x0806
SIOCGIFFLAGS = 0x8913
IFF_UP, IFF_RUNNING = 0x1, 0x40


# --------------------------------------------------------------------------- protocol core (no I/O)

@dataclass
class Core:
    """The CARP state machine over a caller-supplied monotonic clock; returns actions for the runner.

    Actions: ("send",) an advert; ("leave",) a leave advert; ("up", why) / ("down", why) run a script;
    ("garp",) a gratuitous ARP for the VIP (the runner decides whether it is enabled)."""

    vhid: int
    advbase: int
    advskew: int
    srcip: str
    deadratio: int = 3
    preempt: bool = False
    initial_wait: float | None = None
    state: str = INIT
    ad_deadline: float | None = None
    md_deadline: float | None = None
    last_reason: str = ""
    _last_reassert: float = field(default=-1e9, repr=False)

    @property
    def interval(self) -> float:
        return self.advbase + self.advskew / 256.0

    @property
    def dead_interval(self) -> float:
        """ucarp/FreeBSD: advbase x deadratio + own advskew/256."""
        return self.advbase * self.deadratio + self.advskew / 256.0

    def next_deadline(self) -> float | None:
        return self.ad_deadline if self.state == MASTER else self.md_deadline

    def _to(self, state: str, why: str) -> None:
        self.last_reason = why
        self.state = state

    def start(self, now: float) -> list[tuple]:
        """INIT -> BACKUP; the down script runs (as ucarp without --neutral) and a full dead interval
        (or --initial-wait) passes before claiming MASTER, unless a master is heard first."""
        wait = self.dead_interval if self.initial_wait is None else self.initial_wait
        self._to(BACKUP, f"startup, waiting {wait:.2f} s for a master")
        self.md_deadline = now + wait
        self.ad_deadline = None
        return [("down", self.last_reason)]

    def _become_master(self, now: float, why: str) -> list[tuple]:
        self._to(MASTER, why)
        self.md_deadline = None
        self.ad_deadline = now + self.interval
        return [("send",), ("up", why), ("garp",)]

    def _become_backup(self, now: float, why: str, hold: float | None = None) -> list[tuple]:
        was = self.state
        self._to(BACKUP, why)
        self.ad_deadline = None
        self.md_deadline = now + (self.dead_interval if hold is None else hold)
        return [("down", why)] if was == MASTER else []

    def on_timer(self, now: float) -> list[tuple]:
        if self.state == MASTER and self.ad_deadline is not None and now >= self.ad_deadline:
            self.ad_deadline += self.interval
            if self.ad_deadline <= now:       # fell behind (stopped process, busy box): no burst
                self.ad_deadline = now + self.interval
            return [("send",)]
        if self.state == BACKUP and self.md_deadline is not None and now >= self.md_deadline:
            return self._become_master(now, f"master down (no advert for {self.dead_interval:.2f} s)")
        return []

    def on_advert(self, now: float, src: str, adv: cp.Advert) -> list[tuple]:
        """A verified advert from another node (same vhid)."""
        theirs, mine = adv.interval, self.interval
        if self.state == MASTER:
            if adv.is_leave:
                return []
            if mine > theirs or (mine == theirs and cp.ucarp_src_less(src, self.srcip)):
                return self._become_backup(
                    now, f"preferred master {src} (advbase {adv.advbase} advskew {adv.advskew})")
            # a lesser master: answer at once so it steps down (rate-limited), and re-announce the VIP
            if now - self._last_reassert >= self.advbase / 4:
                self._last_reassert = now
                return [("send",), ("garp",)]
            return []
        if self.state == BACKUP:
            if self.md_deadline is None:       # link down: not participating
                return []
            if self.preempt and mine < theirs:
                return self._become_master(
                    now, f"preempting {src} (advbase {adv.advbase} advskew {adv.advskew})")
            if self.advbase * self.deadratio + self.advskew / 256.0 < theirs:
                why = "master left (leave advert)" if adv.is_leave else "master advertises too slowly"
                return self._become_master(now, f"{why} from {src}")
            self.md_deadline = now + self.dead_interval
        return []

    def leave(self, now: float) -> list[tuple]:
        """Shutting down: a master bows out with a leave advert."""
        acts = [("leave",)] if self.state == MASTER else []
        self._to(INIT, "shutdown")
        self.ad_deadline = self.md_deadline = None
        return acts

    def demote(self, now: float, hold: float = 3.0) -> list[tuple]:
        """SIGUSR2 (ucarp: 'considering going down'): bow out and hold off for max(hold, dead interval)."""
        acts = [("leave",)] if self.state == MASTER else []
        return acts + self._become_backup(now, "asked to step down (SIGUSR2)", max(hold, self.dead_interval))

    def link_down(self, now: float) -> list[tuple]:
        acts = self._become_backup(now, "link down")
        self.md_deadline = None
        return acts

    def link_up(self, now: float) -> list[tuple]:
        self._to(BACKUP, "link up")
        self.md_deadline = now + self.dead_interval
        return []


# --------------------------------------------------------------------------- options

def _int_range(lo: int, hi: int, what: str):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {s!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be {lo}-{hi}, got {v}")
        return v
    return conv


def _ipv4(s: str) -> str:
    try:
        return str(ipaddress.IPv4Address(s.split("/")[0]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {s!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m appliance.ha.speaker",
        description="CARP speaker (ucarp-compatible options and wire format; monotonic timers; leave advert on SIGTERM)")
    a = p.add_argument
    a("-i", "--interface", required=True, help="interface to speak CARP on")
    a("-s", "--srcip", required=True, type=_ipv4, help="this host's real address (advert source)")
    a("-m", "--mcast", default=cp.CARP_MCAST, type=_ipv4, help="multicast group (default 224.0.0.18)")
    a("-v", "--vhid", required=True, type=_int_range(1, 255, "--vhid"), help="virtual host id 1-255")
    a("-p", "--pass", dest="password", help="pass (visible in ps; prefer --passfile)")
    a("-o", "--passfile", help="read the pass from this file (first line; keep it mode 0600)")
    a("-P", "--preempt", action="store_true", help="take over from a master that advertises slower")
    a("-a", "--addr", required=True, type=_ipv4, help="the virtual IP (passed to the scripts, part of the HMAC)")
    a("-b", "--advbase", default=1, type=_int_range(1, 254, "--advbase"), help="seconds between adverts")
    a("-k", "--advskew", default=0, type=_int_range(0, 254, "--advskew"), help="skew 0-254 (lowest is master)")
    a("-u", "--upscript", help="run on becoming MASTER: SCRIPT IFACE VIP [XPARAM]")
    a("-d", "--downscript", help="run on becoming BACKUP: SCRIPT IFACE VIP [XPARAM]")
    a("-r", "--deadratio", default=3, type=_int_range(1, 255, "--deadratio"), help="adverts missed before takeover")
    a("-z", "--shutdown", action="store_true", help="run the down script on exit if MASTER")
    a("-x", "--xparam", help="extra parameter for the scripts")
    a("-D", "--debug", action="store_true", help="log every advert")
    a("-S", "--ignoreifstate", action="store_true", help="ignore interface state (down, no carrier)")
    a("-n", "--neutral", action="store_true", help=argparse.SUPPRESS)
    a("--garp", action=argparse.BooleanOptionalAction, default=True,
      help="send a gratuitous ARP for the VIP after the up script, as ucarp does (--no-garp: the up script does it)")
    a("--initial-wait", type=float, default=None,
      help="seconds to listen in BACKUP at start before claiming MASTER (default: one dead interval)")
    a("--script-timeout", type=float, default=60.0, help="kill an up/down script after this many seconds")
    a("--state-file", help="write {state, since, counters} JSON here on every transition and on SIGUSR1")
    return p


def read_pass(args: argparse.Namespace) -> bytes:
    if args.password is not None and args.passfile:
        raise ValueError("give --pass or --passfile, not both")
    if args.passfile:
        path = Path(args.passfile)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ValueError(f"--passfile {path}: {e.strerror}") from None
        pw = raw.split(b"\n", 1)[0].rstrip(b"\r")
        try:
            return cp.check_pass(pw)
        except ValueError as e:
            raise ValueError(f"--passfile {path}: {e}") from None
    if args.password is None:
        raise ValueError("a pass is required: --passfile FILE (or --pass)")
    return cp.check_pass(args.password.encode())


# --------------------------------------------------------------------------- I/O runner

def _mreqn(group: str, addr: str, ifindex: int) -> bytes:
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


class Speaker:
    """Sockets, signals, the script worker and the event loop around a Core."""

    def __init__(self, args: argparse.Namespace, password: bytes) -> None:
        self.args = args
        self._pw = password
        self.iface = args.interface
        self.core = Core(vhid=args.vhid, advbase=args.advbase, advskew=args.advskew, srcip=args.srcip,
                         deadratio=args.deadratio, preempt=args.preempt, initial_wait=args.initial_wait)
        self.counter = random.getrandbits(64)
        self.counters: dict[str, int] = {"sent": 0, "send_errors": 0, "received": 0, "transitions": 0}
        self.since = time.time()
        self.stop_sig = 0
        self.usr1 = self.usr2 = False
        self.jobs: queue.Queue = queue.Queue()
        self.vip_script = ""          # last script queued: "up" or "down"
        self._bad_logged: dict[str, float] = {}
        self._delayed_garp: int | None = None

    # -- setup
    def open(self) -> None:
        try:
            self.ifindex = socket.if_nametoindex(self.iface)
        except OSError:
            raise RuntimeError(f"no such interface: {self.iface}") from None
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, cp.IPPROTO_CARP)
        self.rx.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.iface.encode())
        self.rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, _mreqn(self.args.mcast, "0.0.0.0", self.ifindex))
        self.rx.setblocking(False)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)   # implies IP_HDRINCL
        self.tx.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.iface.encode())
        self.tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, _mreqn(self.args.mcast, "0.0.0.0", self.ifindex))
        self.tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self.ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.garp_sock = None
        if self.args.garp:
            self.garp_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
            self.garp_sock.bind((self.iface, ETH_P_ARP))
            self.hwaddr = bytes.fromhex(Path(f"/sys/class/net/{self.iface}/address").read_text().strip().replace(":", ""))
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(s, self._on_exit_signal)
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "usr1", True))
        signal.signal(signal.SIGUSR2, lambda *_: setattr(self, "usr2", True))
        self.worker = threading.Thread(target=self._work, name="carp-scripts", daemon=True)
        self.worker.start()

    def _on_exit_signal(self, signum, _frame) -> None:
        self.stop_sig = signum

    # -- output
    def send(self, leave: bool = False) -> None:
        a = self.args
        self.counter = (self.counter + 1) & 0xFFFFFFFFFFFFFFFF
        advbase, advskew = (cp.LEAVE_ADVBASE, cp.LEAVE_ADVSKEW) if leave else (a.advbase, a.advskew)
        pkt = cp.build_packet(self._pw, a.vhid, a.addr, a.srcip, advbase, advskew, self.counter,
                              ident=random.getrandbits(16), dst=a.mcast)
        try:
            self.tx.sendto(pkt, (a.mcast, 0))
            self.counters["sent"] += 1
        except OSError as e:
            self.counters["send_errors"] += 1
            if self.counters["send_errors"] == 1 or self.counters["send_errors"] % 60 == 0:
                log.warning("sending an advert failed (%d so far): %s", self.counters["send_errors"], e.strerror)
        if self._delayed_garp is not None and not leave:
            self._delayed_garp -= 1
            if self._delayed_garp <= 0:
                self._delayed_garp = None
                self.jobs.put(("garp",))

    def garp(self) -> None:
        if self.garp_sock is None or self.core.state != MASTER:
            return
        try:
            self.garp_sock.send(garp_frame(self.hwaddr, self.args.addr))
        except OSError as e:
            log.warning("gratuitous ARP failed: %s", e.strerror)

    def run_script(self, kind: str) -> None:
        script = self.args.upscript if kind == "up" else self.args.downscript
        if not script:
            return
        argv = [script, self.iface, self.args.addr] + ([self.args.xparam] if self.args.xparam is not None else [])
        t0 = time.monotonic()
        try:
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=self.args.script_timeout).returncode
        except subprocess.TimeoutExpired:
            log.error("%s script %s killed after %.0f s", kind, script, self.args.script_timeout)
            return
        except OSError as e:
            log.error("%s script %s could not run: %s", kind, script, e.strerror)
            return
        lvl = logging.INFO if rc == 0 else logging.ERROR
        log.log(lvl, "%s script %s exited %d after %.2f s", kind, script, rc, time.monotonic() - t0)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job[0] == "quit":
                    return
                if job[0] == "garp":
                    self.garp()
                else:
                    self.run_script(job[0])
            except Exception:  # a broken script must not kill the speaker
                log.exception("script job %s failed", job)
            finally:
                self.jobs.task_done()

    def apply(self, actions: list[tuple], old_state: str) -> None:
        for act in actions:
            kind = act[0]
            if kind == "send":
                self.send()
            elif kind == "leave":
                self.send(leave=True)
                self.send(leave=True)           # twice: one lost packet must not cost a dead interval
            elif kind in ("up", "down"):
                self.vip_script = kind
                self.jobs.put((kind,))
            elif kind == "garp" and self.args.garp:
                self.jobs.put(("garp",))
                if old_state != MASTER:
                    self._delayed_garp = 2       # ucarp: another ARP two adverts later (L3 switches)
        if self.core.state != old_state:
            self.counters["transitions"] += 1
            self.since = time.time()
            log.warning("%s -> %s: %s", old_state, self.core.state, self.core.last_reason)
            self.write_state()

    def write_state(self) -> None:
        if not self.args.state_file:
            return
        path = Path(self.args.state_file)
        data = {"state": self.core.state, "vhid": self.args.vhid, "iface": self.iface, "vip": self.args.addr,
                "advbase": self.args.advbase, "advskew": self.args.advskew, "since": self.since,
                "pid": os.getpid(), "engine": "speaker", "counters": dict(self.counters)}
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, sort_keys=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot write state file %s: %s", path, e.strerror)

    # -- input
    def _bad(self, reason: str, src: str) -> None:
        key = f"bad_{reason}"
        self.counters[key] = self.counters.get(key, 0) + 1
        now = time.monotonic()
        if reason in ("badvhid",) and not self.args.debug:
            return
        if now - self._bad_logged.get(reason + src, -1e9) >= 60:
            self._bad_logged[reason + src] = now
            log.warning("dropped advert from %s: %s (%d so far)", src, reason, self.counters[key])

    def receive(self) -> None:
        for _ in range(64):                      # bounded drain per wake-up
            try:
                data = self.rx.recv(2048)
            except BlockingIOError:
                return
            except OSError as e:                 # e.g. ENETDOWN while the link flaps: the loop notices the link
                log.debug("receive failed: %s", e.strerror)
                return
            now = time.monotonic()
            try:
                rx = cp.parse_ip(data)
            except cp.BadPacket as e:
                self._bad(e.reason, "?")
                continue
            if rx.src == self.args.srcip:
                continue
            try:
                adv = cp.verify(rx, self._pw, self.args.vhid, self.args.addr, self.args.mcast)
            except cp.BadPacket as e:
                self._bad(e.reason, rx.src)
                continue
            self.counters["received"] += 1
            if self.args.debug:
                log.debug("advert from %s advbase %d advskew %d counter %d", rx.src, adv.advbase, adv.advskew, adv.counter)
            old = self.core.state
            self.apply(self.core.on_advert(now, rx.src, adv), old)

    # -- loop
    def run(self) -> int:
        a = self.args
        log.warning("vhid %d on %s: srcip %s vip %s advbase %d advskew %d deadratio %d preempt %s garp %s",
                    a.vhid, self.iface, a.srcip, a.addr, a.advbase, a.advskew, a.deadratio,
                    "on" if a.preempt else "off", "on" if a.garp else "off")
        self.apply(self.core.start(time.monotonic()), INIT)
        link_ok = True
        next_link_check = 0.0
        while not self.stop_sig:
            now = time.monotonic()
            if not a.ignoreifstate and now >= next_link_check:
                next_link_check = now + LINK_POLL
                try:
                    up = link_running(self.ctl, self.iface)
                except OSError:
                    log.error("interface %s is gone; exiting", self.iface)
                    return self.shutdown(1)
                if up != link_ok:
                    link_ok = up
                    old = self.core.state
                    self.apply(self.core.link_down(now) if not up else self.core.link_up(now), old)
            if self.usr1:
                self.usr1 = False
                log.warning("%s on %s vhid %d %s", self.core.state, self.iface, a.vhid,
                            " ".join(f"{k}={v}" for k, v in sorted(self.counters.items())))
                self.write_state()
            if self.usr2:
                self.usr2 = False
                old = self.core.state
                self.apply(self.core.demote(now), old)
            old = self.core.state
            self.apply(self.core.on_timer(now), old)
            dl = self.core.next_deadline()
            timeout = LINK_POLL if dl is None else min(max(dl - time.monotonic(), 0.0), LINK_POLL)
            try:
                ready, _, _ = select.select([self.rx, self.wake_r], [], [], timeout)
            except InterruptedError:
                continue
            if self.wake_r in ready:
                try:
                    while self.wake_r.recv(64):
                        pass
                except BlockingIOError:
                    pass
            if self.rx in ready:
                self.receive()
        log.warning("signal %d: leaving", self.stop_sig)
        return self.shutdown(0)

    def shutdown(self, code: int) -> int:
        old = self.core.state
        self.apply(self.core.leave(time.monotonic()), old)
        self.jobs.put(("quit",))
        self.worker.join(timeout=self.args.script_timeout + 5)
        if self.args.shutdown and self.vip_script == "up":
            self.vip_script = "down"
            self.run_script("down")
        return code


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s carp-speaker[{os.getpid()}] vhid {args.vhid}: %(message)s")
    if args.neutral:
        print("speaker: --neutral is not supported (it keeps a stale VIP at restart)", file=sys.stderr)
        return 2
    try:
        password = read_pass(args)
    except ValueError as e:
        print(f"speaker: {e}", file=sys.stderr)
        return 2
    for opt in ("upscript", "downscript"):
        s = getattr(args, opt)
        if s and not os.access(s, os.X_OK):
            print(f"speaker: --{opt} {s}: not an executable file", file=sys.stderr)
            return 2
    sp = Speaker(args, password)
    try:
        sp.open()
    except (RuntimeError, OSError) as e:
        print(f"speaker: cannot open {args.interface}: {e}", file=sys.stderr)
        return 1
    return sp.run()


if __name__ == "__main__":
    sys.exit(main())
