"""The CARP state machine (INIT/BACKUP/MASTER) over a caller-supplied monotonic clock: no sockets, no time calls."""
from __future__ import annotations

from dataclasses import dataclass, field

from appliance.ha import protocol as cp

INIT, BACKUP, MASTER = "INIT", "BACKUP", "MASTER"


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
    no_preempt_until: float = -1e9      # after stepping down on purpose: no preempting straight back
    forced_until: float = -1e9          # just made MASTER by the fast layer: adverts sent before that are stale

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
            if adv.is_leave or now < self.forced_until:
                # the master that handed over (or fell silent) may have sent this before it left: one advert in
                # flight must not bounce the VIP back and forth; a master that really stays says so again
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
            if self.preempt and mine < theirs and now >= self.no_preempt_until:
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

    def demote(self, now: float, hold: float = 3.0, why: str = "asked to step down (SIGUSR2)") -> list[tuple]:
        """SIGUSR2 (ucarp: 'considering going down'): bow out and hold off for max(hold, dead interval)."""
        acts = [("leave",)] if self.state == MASTER else []
        self.no_preempt_until = now + max(hold, self.dead_interval)
        return acts + self._become_backup(now, why, max(hold, self.dead_interval))

    def force_master(self, now: float, why: str) -> list[tuple]:
        """The fast liveness layer says the master is gone (or handed over): MASTER now, not after the dead timer.
        A backup whose link is down (not taking part) stays as it is."""
        if self.state != BACKUP or self.md_deadline is None:
            return []
        self.forced_until = now + self.advbase / 4
        return self._become_master(now, f"fast liveness: {why}")

    def hold(self, now: float) -> None:
        """The fast liveness layer hears the master (on the sync link too): the dead timer starts again, as on an
        advert, so a backup cut off from the LAN alone does not take over."""
        if self.state == BACKUP and self.md_deadline is not None:
            self.md_deadline = max(self.md_deadline, now + self.dead_interval)

    def start_master(self, now: float) -> list[tuple]:
        """Restarted after a crash while MASTER on a healthy node (the supervisor kept the VIP): advertise at once."""
        self._to(MASTER, "restarted as master after an engine exit (the VIP stayed)")
        self.md_deadline = None
        self.ad_deadline = now + self.interval
        return [("send",), ("garp",)]

    def link_down(self, now: float) -> list[tuple]:
        acts = self._become_backup(now, "link down")
        self.md_deadline = None
        return acts

    def link_up(self, now: float) -> list[tuple]:
        self._to(BACKUP, "link up")
        self.md_deadline = now + self.dead_interval
        return []
