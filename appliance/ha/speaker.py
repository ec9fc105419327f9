"""A small CARP speaker (IPv4), wire-compatible with ucarp and FreeBSD carp, with monotonic, deadline-driven timers.

Run as `python -m appliance.ha.speaker` with ucarp's options (see --help). Differences from ucarp 1.5.2:
the poll timeout is computed from the next deadline (no 1 s pcap-timeout lag), SIGTERM sends a leave
advert (advbase 255/advskew 255) so backups take over at once, a master that sees a better master steps
down silently, scripts run in a worker thread so adverts never stall, a downed link means BACKUP (not exit).
Adverts pass appliance.ha.guard first (--peer sources only, configured advbase, advskew bounds, counters that
only go forward per source); drops are counted by reason in the state file and logged at a bounded rate.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from appliance.ha import engine_ctl, guard, speaker_state
from appliance.ha.advskew import AdvskewFile
from appliance.ha.netio import ETH_P_ARP, garp_frame, link_running, mreqn
from appliance.ha.peers import NextPass, PeersFile
from appliance.ha import protocol as cp
from appliance.ha.fsm import BACKUP, INIT, MASTER, Core
from appliance.ha.speaker_args import parser, read_pass

log = logging.getLogger("carp-speaker")

LINK_POLL = 0.5             # seconds between interface-state checks
STATE_EVERY = 10.0          # seconds between state-file rewrites while counters change

__all__ = ["BACKUP", "INIT", "MASTER", "Core", "Speaker", "main", "parser", "read_pass"]


# --------------------------------------------------------------------------- I/O runner

class Speaker:
    """Sockets, signals, the script worker and the event loop around a Core."""

    def __init__(self, args: argparse.Namespace, password: bytes) -> None:
        self.args = args
        self._pw = password
        self.iface = args.interface
        self.core = Core(vhid=args.vhid, advbase=args.advbase, advskew=args.advskew, srcip=args.srcip,
                         deadratio=args.deadratio, preempt=args.preempt, initial_wait=args.initial_wait)
        self.peers_file = PeersFile(args.peers_file, log) if args.peers_file else None
        peers = list(args.peer) + (self.peers_file.read() if self.peers_file else [])   # OSError/ValueError: exit 2
        self.guard = guard.Guard(password=password, vhid=args.vhid, vip=args.addr, srcip=args.srcip,
                                 advbase=args.advbase, mcast=args.mcast, peers=peers, resync=args.counter_resync)
        self.bad = guard.BadLog(log, burst=args.log_burst)
        self.next_pass = NextPass(args.passfile_next, log) if args.passfile_next else None
        self.advskew_file = AdvskewFile(args.advskew_file, log) if args.advskew_file else None
        if self.advskew_file:
            self.core.advskew = args.advskew = self.advskew_file.initial(args.advskew)
        self.counters: dict[str, int] = {"sent": 0, "send_errors": 0, "received": 0, "transitions": 0}
        self.counter = guard.initial_counter(self._restore())
        self._state_at = 0.0
        self.since = time.time()
        self.stop_sig = 0
        self.usr1 = self.usr2 = False
        self.jobs: queue.Queue = queue.Queue()
        self.vip_script = ""          # last script queued: "up" or "down"
        self._delayed_garp: int | None = None

    # -- setup
    def open(self) -> None:
        try:
            self.ifindex = socket.if_nametoindex(self.iface)
        except OSError:
            raise RuntimeError(f"no such interface: {self.iface}") from None
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, cp.IPPROTO_CARP)
        self.rx.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.iface.encode())
        self.rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn(self.args.mcast, "0.0.0.0", self.ifindex))
        self.rx.setblocking(False)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)   # implies IP_HDRINCL
        self.tx.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.iface.encode())
        self.tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn(self.args.mcast, "0.0.0.0", self.ifindex))
        self.tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self.ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.garp_sock = None
        if self.args.garp:
            self.garp_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
            self.garp_sock.bind((self.iface, ETH_P_ARP))
            self.hwaddr = bytes.fromhex(Path(f"/sys/class/net/{self.iface}/address").read_text().strip().replace(":", ""))
        self.ctl_sock = engine_ctl.open_control(self.args.control) if self.args.control else None
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

    def control(self) -> None:
        """Commands from the supervisor's fast liveness layer (see --control)."""
        for _ in range(16):                       # bounded drain per wake-up
            try:
                data = self.ctl_sock.recv(512)
            except (BlockingIOError, InterruptedError):
                return
            old = self.core.state
            acts = engine_ctl.command(self.core, data, time.monotonic())
            if acts:
                self.apply(acts, old)

    def _on_exit_signal(self, signum, _frame) -> None:
        self.stop_sig = signum

    # -- output
    def send(self, leave: bool = False) -> None:
        a = self.args
        self.counter = (self.counter + 1) & 0xFFFFFFFFFFFFFFFF
        advbase, advskew = (cp.LEAVE_ADVBASE, cp.LEAVE_ADVSKEW) if leave else (a.advbase, a.advskew)
        self.guard.note_sent(self.counter)
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

    def _restore(self) -> int | None:
        return speaker_state.restore(self)

    def all_counters(self) -> dict[str, int]:
        return speaker_state.all_counters(self)

    def write_state(self) -> None:
        self._state_at = time.monotonic()
        speaker_state.write(self)

    # -- input
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
                self.bad.record(e.reason, "?", now)
                continue
            try:
                adv = self.guard.admit(rx, now)
            except cp.BadPacket as e:
                self.bad.record(e.reason, rx.src, now, str(e).partition(": ")[2])
                continue
            self.counters["received"] += 1
            if self.args.debug:
                log.debug("advert from %s advbase %d advskew %d counter %d", rx.src, adv.advbase, adv.advskew, adv.counter)
            old = self.core.state
            self.apply(self.core.on_advert(now, rx.src, adv), old)

    def peers_text(self) -> str:
        return " ".join(f"{p.ip}(advskew>={p.min_advskew}{'' if p.counter == 'forward' else ',counter=' + p.counter})"
                        for p in self.guard.peers.values()) or "any"

    def reload_peers(self, now: float) -> None:
        """--peers-file changed (looked at once a second): the guard's peers are updated in place, no restart.
        A list that would be empty (every address heard) is refused while peers are configured."""
        if self.next_pass:
            self.next_pass.apply(self.guard, now)
        new = self.peers_file.poll(now) if self.peers_file else None
        if new is None:
            return
        peers = list(self.args.peer) + new
        if not peers and self.guard.peers:
            log.warning("peers file %s lists no peer (that would hear every address); the previous list stays",
                        self.peers_file.path)
            return
        before = self.peers_text()
        self.guard.set_peers(peers)
        if self.peers_text() != before:
            log.warning("peers updated from %s: %s (was %s)", self.peers_file.path, self.peers_text(), before)
            self.write_state()

    def reload_advskew(self, now: float, force: bool = False) -> None:
        """--advskew-file changed: the new advskew from now on. A master sends an advert with it at once, so a
        preempting backup with a better one takes over without waiting for a dead interval (no gap, no restart)."""
        new = self.advskew_file.poll(now, force) if self.advskew_file else None
        if new is None or new == self.core.advskew:
            return
        log.warning("advskew %d -> %d (%s)", self.core.advskew, new, self.advskew_file.path)
        self.core.advskew = self.args.advskew = new
        if self.core.state == MASTER:
            self.send()
            self.core.ad_deadline = now + self.core.interval
        self.write_state()

    # -- loop
    def run(self) -> int:
        a = self.args
        log.warning("vhid %d on %s: srcip %s vip %s advbase %d advskew %d deadratio %d preempt %s garp %s peers %s",
                    a.vhid, self.iface, a.srcip, a.addr, a.advbase, a.advskew, a.deadratio,
                    "on" if a.preempt else "off", "on" if a.garp else "off", self.peers_text())
        if not self.guard.peers:
            log.warning("no --peer given: adverts from any LAN address are heard (ucarp's behaviour); "
                        "give each other node's address with --peer")
        if a.start_master:
            self.vip_script = "up"              # the VIP is held: a clean exit runs the down script (--shutdown)
            self.apply(self.core.start_master(time.monotonic()), INIT)
        else:
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
            self.reload_advskew(now, force=self.usr1)
            if self.usr1:
                self.usr1 = False
                log.warning("%s on %s vhid %d %s", self.core.state, self.iface, a.vhid,
                            " ".join(f"{k}={v}" for k, v in sorted(self.all_counters().items())))
                self.write_state()
            elif now - self._state_at >= STATE_EVERY:
                self.write_state()                  # counters (and the peers' last counters) for status/restart
            self.bad.flush(now)
            self.reload_peers(now)
            if self.usr2:
                self.usr2 = False
                old = self.core.state
                self.apply(self.core.demote(now), old)
            old = self.core.state
            self.apply(self.core.on_timer(now), old)
            dl = self.core.next_deadline()
            timeout = LINK_POLL if dl is None else min(max(dl - time.monotonic(), 0.0), LINK_POLL)
            try:
                ready, _, _ = select.select([self.rx, self.wake_r] + ([self.ctl_sock] if self.ctl_sock else []),
                                           [], [], timeout)
            except InterruptedError:
                continue
            if self.wake_r in ready:
                self._drain_wake()
            if self.rx in ready:
                self.receive()
            if self.ctl_sock is not None and self.ctl_sock in ready:
                self.control()
        log.warning("signal %d: leaving", self.stop_sig)
        return self.shutdown(0)

    def _drain_wake(self) -> None:
        try:
            while self.wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    def shutdown(self, code: int) -> int:
        old = self.core.state
        self.apply(self.core.leave(time.monotonic()), old)
        self.write_state()                          # the last counters, for the next run
        if self.ctl_sock is not None:
            self.ctl_sock.close()
            try:
                os.unlink(self.args.control)
            except OSError:
                pass
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
    try:
        sp = Speaker(args, password)
    except (OSError, ValueError) as e:
        print(f"speaker: --peers-file {args.peers_file}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    try:
        sp.open()
    except (RuntimeError, OSError) as e:
        print(f"speaker: cannot open {args.interface}: {e}", file=sys.stderr)
        return 1
    return sp.run()


if __name__ == "__main__":
    sys.exit(main())
