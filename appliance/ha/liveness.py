"""The fast liveness layer beside CARP: heartbeats to every peer on the sync link and the LAN, the master's own
failure signals (LAN link via netlink, proxy exit via a pidfd, a hung proxy via a check every interval), and the
fastpolicy rules acted on through the engine's control (docs/ha.md, "Fast liveness").

It never replaces CARP's election: it only tells the engine to become master now, to hold its dead timer while the
master is provably alive, or to leave; with `ha.fast_interval: 0`, or a peer that sends no heartbeats, CARP alone
decides, as before.
"""
from __future__ import annotations

import select
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from appliance.core.fsio import read_json, write_json_atomic, write_text_atomic
from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.ha import heartbeat as hb
from appliance.ha import watchdog
from appliance.ha.fastpolicy import Own, PeerView, Policy
from appliance.ha.liveness_report import kind_of, prometheus
from appliance.ha.netio import link_running
from appliance.ha.proxywatch import ProxyWatch
from appliance.ha.witness import Witness

RTMGRP_LINK = 1
WRITE_EVERY = 0.5            # seconds between status file writes
STATUS_NAME, PROM_NAME = "liveness.json", "liveness.prom"


def new_epoch(paths: Paths) -> int:
    """This run's epoch: above the last one recorded (and the clock in microseconds), recorded before use."""
    f = paths.state / "liveness.epoch"
    try:
        last = int(f.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        last = 0
    epoch = max(last + 1, time.time_ns() // 1000)
    write_text_atomic(f, f"{epoch}\n")
    return epoch


def status_file(paths: Paths) -> Path:
    return paths.run / STATUS_NAME


def read_status(paths: Paths) -> dict | None:
    return read_json(status_file(paths))


@dataclass
class View:
    """What the supervisor tells the layer about this node each tick: roles and advskew per vhid, demoted or not."""

    roles: dict[int, str]
    advskew: dict[int, int]
    demoted: bool


class Liveness:
    """Heartbeats out and in on both paths, the policy every interval, actions through `command(vhid, verb, cause)`."""

    def __init__(self, cfg: Appliance, node: str, paths: Paths, view: Callable[[], View],
                 command: Callable[[int, str, str], None], log: Callable[[str], None],
                 on_failure: Callable[[], None] = lambda: None, acting: bool = True, check: tuple[str, int] | None = None,
                 link: Callable[[], bool] | None = None):
        ha = cfg.ha
        self.cfg, self.node, self.paths, self.view, self.command, self.log = cfg, node, paths, view, command, log
        self.on_failure, self.acting, self.link_check = on_failure, acting, link
        self.interval, self.port = ha.fast_interval, ha.fast_port
        self.policy = Policy(ha.fast_interval, ha.fast_misses)
        me = cfg.nodes[node]
        self.addr = {"sync": str(me.sync.ip), "lan": str(me.lan.ip)}
        self.iface = cfg.cluster.interface
        self.peers = {n: PeerView(n, str(p.lan.ip)) for n, p in cfg.nodes.items() if n != node}
        self.dest = {n: {"sync": str(p.sync.ip), "lan": str(p.lan.ip)} for n, p in cfg.nodes.items() if n != node}
        self.keys = [hb.key(cfg.cluster.password.get_secret_value().encode())]
        if cfg.cluster.password_next is not None:
            self.keys.append(hb.key(cfg.cluster.password_next.get_secret_value().encode()))
        self.epoch = new_epoch(paths)
        self.replay = hb.Replay(self.epoch, {(n, path): ip for n, d in self.dest.items() for path, ip in d.items()},
                                max_age=2 * self.policy.dead)
        self.ifaces = {"sync": cfg.cluster.sync_interface, "lan": cfg.cluster.interface}
        # the LAN witness needs a packet socket (Linux); without one a LAN-only cut moves nothing
        self.witness = (Witness(cfg.cluster.interface, self.addr["lan"], [str(w) for w in ha.lan_witness])
                        if ha.lan_witness and hasattr(socket, "AF_PACKET") else None)
        self.started = time.monotonic()
        self.proxy = ProxyWatch(paths, check or watchdog.check_target(cfg), ha.fast_interval, ha.fast_check_timeout)
        self.seq = 0
        self.link_ok = True
        self.failure = ""
        self.handing: dict[int, tuple[str, float]] = {}      # vhid -> (cause, until): TAKEOVER resent until then
        self.counts: Counter = Counter()
        self.takeovers: Counter = Counter()
        self.path_up: dict[tuple[str, str], bool] = {}
        self._written = 0.0
        self.lock = threading.Lock()

    # -- sockets
    def open(self) -> None:
        self.socks: dict[str, socket.socket] = {}
        for path, ip in self.addr.items():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_BINDTODEVICE"):
                # only what arrives on that path's own interface: a LAN host routing to our sync address through
                # our LAN address never reaches the sync socket (Linux; on FreeBSD the weak host model lets it in)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.ifaces[path].encode())
            s.bind((ip, self.port))
            s.setblocking(False)
            self.socks[path] = s
        self.ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # link changes as the kernel announces them: netlink on Linux, the routing socket on FreeBSD (RTM_IFINFO,
        # what devd's LINK_DOWN comes from); each message only makes the next tick come now
        if hasattr(socket, "AF_NETLINK"):
            self.nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            self.nl.bind((0, RTMGRP_LINK))
        else:
            self.nl = socket.socket(socket.AF_ROUTE, socket.SOCK_RAW, 0)
        self.nl.setblocking(False)
        if self.witness is not None:
            self.witness.open()

    def start(self, stop: threading.Event) -> None:
        self.open()
        self.threads = [threading.Thread(target=self.proxy.run, args=(stop,), name="fast-check", daemon=True),
                        threading.Thread(target=self.run, args=(stop,), name="fast-liveness", daemon=True)]
        for t in self.threads:
            t.start()

    def join(self, timeout: float = 3.0) -> None:
        """After `stop` was set: wait for both threads, then free the port (a reload starts a new layer on it)."""
        for t in self.threads:
            t.join(timeout)
        for s in (*self.socks.values(), self.nl, self.ctl):
            s.close()
        if self.witness is not None:
            self.witness.close()
        self.proxy.close()

    def send(self, path: str, peer: str, kind: int, vhids: dict, cause: str = "") -> None:
        self.seq += 1
        self.replay.note_sent(self.seq, time.monotonic())
        beat = hb.Beat(node=self.node, path=path, epoch=self.epoch, seq=self.seq, echo=self.replay.echo_for(peer),
                       ack=self.replay.ack_for(peer),
                       kind=kind, proxy_ok=not self.failure.startswith("proxy"), link_ok=self.link_ok,
                       leaving=bool(self.handing), witness=self.witness_state(time.monotonic()), vhids=vhids,
                       cause=cause)
        try:
            self.socks[path].sendto(hb.pack(beat, self.keys), (self.dest[peer][path], self.port))
            self.counts[f"sent_{path}"] += 1
        except OSError:
            self.counts[f"send_errors_{path}"] += 1       # the path is down: its silence is the peer's to see

    def receive(self, path: str, now: float) -> None:
        s = self.socks[path]
        for _ in range(64):                                 # bounded drain per wake-up
            try:
                data, (src, _port) = s.recvfrom(hb.MAX_LEN + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                beat = self.replay.admit(hb.unpack(data, self.keys), src, now, path)
            except hb.BadHeartbeat as e:
                self.counts[f"bad_{e.reason}"] += 1
                continue
            self.counts[f"received_{path}"] += 1
            p = self.peers[beat.node]
            p.heard[path] = now
            if beat.kind == hb.TAKEOVER:
                p.takeover, p.takeover_at = beat, now
            elif p.beat is None or (beat.epoch, beat.seq) > (p.beat.epoch, p.beat.seq):
                p.beat = beat

    def witness_state(self, now: float) -> str:
        """'' (no witness, or not asked long enough yet), 'ok' (one answered lately) or 'lost'."""
        # a request every interval, to the witnesses in turn: each is asked every len(witnesses) intervals
        window = self.policy.dead + self.interval * len(self.witness.targets) if self.witness else 0.0
        if self.witness is None or now - self.started < window:
            return ""
        return "ok" if self.witness.reachable(now, window) else "lost"

    # -- the loop
    def own_failure(self, now: float) -> str:
        if not self.link_ok:
            return "LAN link down"
        return self.proxy.failure(now)

    def tick(self, now: float) -> None:
        v = self.view()
        self.proxy.refresh()
        self.link_ok = self._link()
        failure = self.own_failure(now)
        if failure != self.failure:
            self.log(f"fast: {failure}" if failure else f"fast: {self.failure or 'failure'} over")
            self.failure = failure
            self.on_failure()
        if self.witness is not None:
            self.witness.probe()
        own = Own(self.node, self.addr["lan"], v.roles, v.advskew, proxy_ok=not failure.startswith("proxy"),
                  link_ok=self.link_ok, demoted=v.demoted, witness=self.witness_state(now))
        with self.lock:
            acts = self.policy.tick(own, list(self.peers.values()), now, failure)
        for act in acts:
            self.act(act, now)
        vhids = {vh: (role, v.advskew.get(vh, 0)) for vh, role in v.roles.items()}
        self.handing = {vh: hu for vh, hu in self.handing.items() if hu[1] > now}
        for peer in self.peers:
            for path in ("sync", "lan"):
                self.send(path, peer, hb.HEARTBEAT, vhids)
                for vh, (cause, _) in self.handing.items():
                    self.send(path, peer, hb.TAKEOVER, {vh: ("MASTER", v.advskew.get(vh, 0))}, cause)
        self.watch_paths(now)
        if now - self._written >= WRITE_EVERY:
            self.write(now)

    def act(self, act: tuple, now: float) -> None:
        verb, vhid = act[0], act[1]
        if verb in ("hold", "announce"):
            if self.acting:
                self.command(vhid, verb, "")
            return
        cause = act[2]
        if verb == "handover":
            self.handing[vhid] = (cause, now + self.policy.dead)
            self.counts[f"handovers_{kind_of(cause)}"] += 1
            self.log(f"fast: handing vhid {vhid} over ({cause})")
            if self.acting:
                self.command(vhid, "leave", cause)
        elif verb == "master":
            self.takeovers[kind_of(cause)] += 1
            self.log(f"fast: taking vhid {vhid} over: {cause}" + ("" if self.acting else " (report only: the engine "
                                                                                          "has no control; CARP decides)"))
            if self.acting:
                self.command(vhid, "master", cause)

    def _link(self) -> bool:
        if self.link_check is not None:
            return self.link_check()
        try:
            return link_running(self.ctl, self.iface)
        except OSError:
            return False

    def watch_paths(self, now: float) -> None:
        """Log each path of each peer going silent or coming back (one path alone changes nothing: reported)."""
        for name, p in self.peers.items():
            if p.beat is None:
                continue
            for path in ("sync", "lan"):
                up = p.age(path, now) <= self.policy.dead
                if self.path_up.get((name, path), True) != up:
                    other = "lan" if path == "sync" else "sync"
                    self.log(f"fast: {path} path from {name} {'back' if up else 'silent'}"
                             f" ({other} {'heard' if p.age(other, now) <= self.policy.dead else 'silent too'})")
                    self.counts[f"path_{'up' if up else 'down'}_{path}"] += 1
                self.path_up[(name, path)] = up

    def run(self, stop: threading.Event) -> None:
        """The loop, kept going through a bug: a dead thread would stop this node's heartbeats, and a backup would
        take over from a healthy master again and again (CARP handing it back each time)."""
        while not stop.is_set():
            try:
                self._loop(stop)
            except Exception as e:  # noqa: BLE001 (logged, counted, then the loop goes on)
                self.counts["loop_errors"] += 1
                if self.counts["loop_errors"] in (1, 10) or self.counts["loop_errors"] % 1000 == 0:
                    self.log(f"fast: liveness loop error #{self.counts['loop_errors']} (it goes on): "
                             f"{type(e).__name__}: {e}")
                stop.wait(self.interval)
        self.write(time.monotonic())

    def _loop(self, stop: threading.Event) -> None:
        nxt = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= nxt:
                self.tick(now)
                nxt = max(nxt + self.interval, now + self.interval / 4)
            fds = [*self.socks.values(), self.nl] + ([self.proxy] if self.proxy.pidfd is not None else [])
            fds += [self.witness] if self.witness is not None else []
            try:
                ready, _, _ = select.select(fds, [], [], max(0.0, nxt - time.monotonic()))
            except (InterruptedError, ValueError):
                continue
            now = time.monotonic()
            for path, s in self.socks.items():
                if s in ready:
                    self.receive(path, now)
            if self.witness is not None and self.witness in ready:
                self.witness.receive(now)
            if self.proxy in ready:
                self.proxy.on_exit()
                nxt = now                                   # act on it now, not at the next tick
            if self.nl in ready:
                self._drain_netlink()
                if self._link() != self.link_ok:
                    nxt = now

    def _drain_netlink(self) -> None:
        for _ in range(64):
            try:
                self.nl.recv(65536)
            except (BlockingIOError, OSError):
                return

    # -- what the engine-crash rule and status read
    def keep_master(self, vhid: int, now: float) -> bool:
        """An engine that died while MASTER on a healthy node is restarted as master (the VIP stays) unless a peer
        says it is MASTER of vhid now."""
        if self.own_failure(now) or not self.link_ok:
            return False
        with self.lock:
            return not any(p.beat is not None and p.silent_for(now) <= self.policy.dead and p.beat.role(vhid) == "MASTER"
                           for p in self.peers.values())

    def snapshot(self, now: float) -> dict:
        def age(x: float) -> float | None:
            return None if x == float("inf") else round(x, 3)
        return {
            "interval": self.interval, "misses": self.policy.misses, "port": self.port, "epoch": self.epoch,
            "acting": self.acting, "link_ok": self.link_ok, "failure": self.failure, "updated": time.time(),
            "witness": self.witness_state(now),
            "peers": {n: {"sync_age": age(p.age("sync", now)), "lan_age": age(p.age("lan", now)),
                          "roles": {str(k): r for k, (r, _) in p.beat.vhids.items()} if p.beat else {},
                          "proxy_ok": p.beat.proxy_ok if p.beat else None,
                          "link_ok": p.beat.link_ok if p.beat else None,
                          "witness": p.beat.witness if p.beat else None} for n, p in self.peers.items()},
            "counters": dict(sorted(self.counts.items())), "takeovers": dict(sorted(self.takeovers.items())),
        }

    def write(self, now: float) -> None:
        self._written = now
        snap = self.snapshot(now)
        try:
            write_json_atomic(status_file(self.paths), snap)
            write_text_atomic(self.paths.run / PROM_NAME, prometheus(snap))
        except OSError:
            pass
