"""What the fast liveness layer does on one tick, from what this node and its peers last said: no sockets, no clock.

The rules (docs/ha.md, "Fast liveness"): a backup takes a vhid over at once when its master is silent on BOTH paths
(sync link and LAN) for `misses` intervals, or when the master says it is failing (a TAKEOVER, or a heartbeat with
its proxy or LAN link down); while the master is heard on any path and says it is well, the backup holds its own
CARP dead timer (a backup cut off from the LAN stays backup). Only the best candidate among the live, healthy
backups (lowest advskew, then lowest LAN address, as CARP) acts. A master that fails hands over once per failure.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from appliance.ha.heartbeat import Beat


@dataclass
class PeerView:
    """One peer as heard: when each path last carried a fresh heartbeat, its last heartbeat, its last TAKEOVER."""

    name: str
    lan_ip: str
    heard: dict[str, float] = field(default_factory=dict)       # path -> monotonic time of the last fresh beat
    beat: Beat | None = None
    takeover: Beat | None = None
    takeover_at: float = -1e9

    def age(self, path: str, now: float) -> float:
        return now - self.heard[path] if path in self.heard else float("inf")

    def silent_for(self, now: float) -> float:
        """Seconds since the peer was last heard on any path (inf: never)."""
        return min((self.age(p, now) for p in ("sync", "lan")), default=float("inf"))


@dataclass
class Own:
    """This node now: role and advskew per vhid, its proxy and LAN link, demoted or not."""

    name: str
    lan_ip: str
    roles: dict[int, str]
    advskew: dict[int, int]
    proxy_ok: bool
    link_ok: bool
    demoted: bool = False
    witness: str = ""                    # the LAN witness from here: "" none configured (or not known yet), ok, lost


def _rank(advskew: int, lan_ip: str) -> tuple[int, int]:
    return advskew, int(ipaddress.IPv4Address(lan_ip))


def master_of(vhid: int, peers: list[PeerView]) -> PeerView | None:
    """The peer whose latest heartbeat says it is MASTER of vhid (the most recently heard, if several)."""
    ms = [p for p in peers if p.beat is not None and p.beat.role(vhid) == "MASTER"]
    return max(ms, key=lambda p: max(p.heard.values(), default=-1e9)) if ms else None


def best_candidate(own: Own, vhid: int, peers: list[PeerView], now: float, dead: float) -> bool:
    """True when no live, healthy backup of vhid outranks this node (CARP's order: advskew, then address)."""
    mine = _rank(own.advskew.get(vhid, 0), own.lan_ip)
    for p in peers:
        b = p.beat
        if b is None or p.silent_for(now) > dead or b.role(vhid) != "BACKUP" or not (b.proxy_ok and b.link_ok):
            continue
        if _rank(b.vhids[vhid][1], p.lan_ip) < mine:
            return False
    return True


def failing(b: Beat) -> str:
    """Why a master's own heartbeat says it cannot serve ('' when it can)."""
    if not b.link_ok:
        return "its LAN link is down"
    if not b.proxy_ok:
        return "its proxy is down or hung"
    return "it is leaving" if b.leaving else ""


@dataclass
class Policy:
    """Per-vhid memory between ticks: a takeover is asked once per silence, a hand-over sent once per failure."""

    interval: float
    misses: int
    forced: dict[int, float] = field(default_factory=dict)       # vhid -> when we forced master (until heard again)
    handed: dict[int, str] = field(default_factory=dict)         # vhid -> cause we handed over for
    mastered: dict[int, float] = field(default_factory=dict)     # vhid -> when we were last seen MASTER
    announced: dict[int, float] = field(default_factory=dict)    # vhid -> when we last re-announced it
    rival: dict[int, float] = field(default_factory=dict)        # vhid -> when a peer last said it was MASTER too
    lan_up: dict[str, bool] = field(default_factory=dict)        # peer -> its LAN heartbeats were fresh last tick

    @property
    def dead(self) -> float:
        return self.interval * self.misses

    def tick(self, own: Own, peers: list[PeerView], now: float, own_failure: str) -> list[tuple]:
        """Actions: ("master", vhid, cause), ("hold", vhid), ("handover", vhid, cause), ("announce", vhid)."""
        acts: list[tuple] = []
        back = self._lan_back(peers, now)
        for vhid, role in sorted(own.roles.items()):
            if role == "MASTER":
                self.mastered[vhid] = now
                # a peer back on the LAN that was MASTER too a moment ago: the clients may still send to it
                rejoined = back and now - self.rival.get(vhid, -1e9) <= 5.0
                if not own_failure and (self._other_master(vhid, peers, now) or rejoined):
                    acts.append(("announce", vhid))
            # a failure that stopped the engine (LAN link down) may have taken MASTER away before this tick saw it
            was_master = now - self.mastered.get(vhid, -1e9) <= self.dead
            if own_failure and was_master:
                if self.handed.get(vhid) != own_failure:
                    self.handed[vhid] = own_failure
                    acts.append(("handover", vhid, own_failure))
                continue
            if not own_failure:
                self.handed.pop(vhid, None)
            if role == "BACKUP":
                act = self._backup(own, vhid, peers, now)
                if act is not None:
                    acts.append(act)
        return acts

    def _lan_back(self, peers: list[PeerView], now: float) -> bool:
        """Whether some peer's LAN heartbeats came back this tick (a LAN cut just ended)."""
        back = False
        for p in peers:
            up = p.age("lan", now) <= self.dead
            back = back or (up and not self.lan_up.get(p.name, True))
            self.lan_up[p.name] = up
        return back

    def _other_master(self, vhid: int, peers: list[PeerView], now: float) -> bool:
        """A live peer says it is MASTER of our vhid too (acted on once a second at most)."""
        if not any(p.beat is not None and p.silent_for(now) <= self.dead and p.beat.role(vhid) == "MASTER"
                   for p in peers):
            return False
        self.rival[vhid] = now
        if now - self.announced.get(vhid, -1e9) < 1.0:
            return False
        self.announced[vhid] = now
        return True

    def _backup(self, own: Own, vhid: int, peers: list[PeerView], now: float) -> tuple | None:
        asker = next((p for p in peers if p.takeover is not None and vhid in p.takeover.vhids
                      and now - p.takeover_at <= self.dead), None)
        m = asker or master_of(vhid, peers)
        if m is None or m.beat is None and asker is None:
            return None
        able = own.proxy_ok and own.link_ok and not own.demoted
        silent = m.silent_for(now)
        if asker is not None:
            why = f"{m.name} handed over: {asker.takeover.cause}"
        elif silent > self.dead:
            why = f"{m.name} silent on both paths for {silent:.2f} s"
        elif failing(m.beat):
            why = f"{m.name} says {failing(m.beat)}"
        elif m.age("lan", now) > self.dead and m.beat.witness == "lost" and own.witness == "ok":
            # heard on the sync link only: the master's LAN or ours is cut; the witness answers us, not it
            why = f"{m.name} is cut off from the LAN (its LAN witness is silent, ours answers)"
        else:
            why = ""
        if not why:
            self.forced.pop(vhid, None)
            return ("hold", vhid)
        # once per silence: a takeover that CARP undid (the master still advertises) is not forced again until the
        # master is heard again, or both nodes would flap, each gratuitous ARP pulling the clients across
        if not able or vhid in self.forced or not best_candidate(own, vhid, peers, now, self.dead):
            return None
        self.forced[vhid] = now
        return ("master", vhid, why)
