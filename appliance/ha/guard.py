"""Who may steer this node's CARP: source allowlist, advbase/advskew bounds, forward-only counters, bad-advert accounting.

The CARP digest (ucarp, FreeBSD carp(4)) covers version, type, vhid, the VIP and the 8-byte counter only.
A LAN host without the pass can therefore replay any advert it captured with another source address,
advbase or advskew. `Guard.admit` closes that: the source must be a configured peer, advbase must be the
configured one (or the leave pair 255/255, from a peer), advskew must be 0-254 and not below the peer's
configured advskew, and the counter (inside the digest) must be above the last one accepted from that
source. `BadLog` counts every drop by reason and logs at a bounded rate with bounded memory.

Counters on the wire differ by engine: the speaker's only go up, across restarts too (`initial_counter`);
ucarp 1.5.2 sends a fresh random counter in every advert; FreeBSD carp(4) counts up from the last counter it
heard. So "forward only" is the rule for speaker peers (`counter=forward`, the default); for a ucarp or
kernel-CARP peer (`counter=any`) and without --peer, an advert whose counter was already seen from that
source (a bounded cache) is a replay.
"""
from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from appliance.core.rotation import pass_fingerprint
from appliance.ha import protocol as cp
from appliance.ha.peers import Peer

MAX_SOURCES = 64            # per-source counter state kept when no peers are configured (LRU)
MAX_BAD_SOURCES = 16        # recent senders of dropped adverts kept for the status (LRU)
SEEN_MAX = 8192             # (source, counter) pairs remembered for peers whose counters are random (LRU)
COUNTER_TIME_SHIFT = 20     # our counters start at wall-clock ms << 20: a restart always continues above
COUNTER_MASK = (1 << 64) - 1
OWN_RANGES_MAX = 16         # ranges of counters this node sent (one per run, kept in the state file)
RECOVER_ADVERTS = 10        # a forward peer refused only by its counter this many advbase periods in a row: resync
RESYNC_LEAP = 1 << 20       # a mark this far above a peer's adverts (12 days of them at advbase 1) cannot be one of
                            # its own recent counters: a forged, replayed-from-another-source or restarted counter


def initial_counter(saved: int | None = None, now_ns: int | None = None) -> int:
    """Where our advert counter starts: wall-clock milliseconds << 20 plus a random low part, and above the
    last counter we saved (in the state file), so peers that remember our last counter accept a restarted us."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    c = (ms << COUNTER_TIME_SHIFT) | random.getrandbits(16)
    if saved is not None:
        c = max(c, saved + (1 << COUNTER_TIME_SHIFT))
    return c & COUNTER_MASK


# one HMAC per pass, not per advert: the pass and, during a rotation, the next one are the only keys in use
_fingerprint = functools.lru_cache(maxsize=4)(pass_fingerprint)


@dataclass
class _Source:
    counter: int
    last: float                 # monotonic time of the last accepted advert
    accepted: int = 0
    lo: int = -1                # the contiguous run of counters accepted from it that ends at `counter`
    streak: tuple | None = None  # (first time, first counter, last counter) of adverts refused only by the counter
    signed: str = ""            # pass_fingerprint of the pass its last accepted advert was signed with


class Guard:
    """Admission of a parsed advert; raises cp.BadPacket(reason) or returns the Advert for the state machine.

    Checks in order (cheap ones first, the digest only for a plausible sender, the counter only after the
    digest, so a forged counter can never move the high-water mark): own source, header (ucarp's), source
    allowlist, advbase, advskew, digest, counter."""

    def __init__(self, *, password: bytes, vhid: int, vip: str, srcip: str, advbase: int,
                 mcast: str = cp.CARP_MCAST, peers: Iterable[Peer] = (), resync: float = 0.0,
                 max_sources: int = MAX_SOURCES) -> None:
        self._pw = password
        self.vhid, self.vip, self.srcip, self.advbase, self.mcast = vhid, vip, srcip, advbase, mcast
        self.peers = {p.ip: p for p in peers}
        self.resync = resync
        self._open_max = max_sources
        self.max_sources = len(self.peers) if self.peers else max_sources
        self.sources: OrderedDict[str, _Source] = OrderedDict()
        self.seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.counter_resets = 0
        self.next_pw: bytes | None = None      # during a pass rotation: adverts signed with it are accepted too
        self.own: list[list[int]] = []          # [first, last] counters this node sent, per run (note_sent)
        self.by_counter: OrderedDict[int, str] = OrderedDict()   # counter -> source it was accepted from (LRU)

    def note_sent(self, counter: int) -> None:
        """The speaker sent an advert with this counter: one of ours is a replay from any source."""
        if self.own and self.own[-1][1] + 1 == counter:
            self.own[-1][1] = counter
        else:
            self.own.append([counter, counter])
            del self.own[:-OWN_RANGES_MAX]

    def restore_own(self, ranges) -> None:
        """Our counter ranges from the state file an earlier run left (kept before this run's)."""
        ok = [[int(a), int(b)] for a, b in (r for r in (ranges or []) if isinstance(r, list) and len(r) == 2)
              if isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= COUNTER_MASK]
        self.own = (ok + self.own)[-OWN_RANGES_MAX:]

    def is_own(self, counter: int) -> bool:
        return any(a <= counter <= b for a, b in self.own)

    def set_peers(self, peers: Iterable[Peer]) -> None:
        """Replace the allowed peers in place (the supervisor's peers file changed). The counter state of a peer
        that stays, with the same counter mode, is kept, so its replays stay refused; the state of a removed peer
        (or of one whose counter mode changed) is dropped. Without peers every source counts as `counter=any`."""
        new = {p.ip: p for p in peers}

        def mode(table: dict, ip: str) -> str | None:
            return table[ip].counter if ip in table else (None if table else "any")
        if new:
            keep = {ip for ip in new if mode(self.peers, ip) == new[ip].counter}
            for ip in [ip for ip in self.sources if ip not in keep]:
                del self.sources[ip]
            for key in [k for k in self.seen if k[0] not in keep]:
                del self.seen[key]
        self.peers = new
        self.max_sources = len(new) if new else self._open_max

    def admit(self, rx: cp.Received, now: float) -> cp.Advert:
        if rx.src == self.srcip:
            raise cp.BadPacket("ownsrc", "an advert with this node's own address")
        a = cp.check_header(rx, self.vhid, self.mcast)
        peer = self.peers.get(rx.src)
        if self.peers and peer is None:
            raise cp.BadPacket("badsrc", "not a configured peer")
        if a.advbase == 0:
            raise cp.BadPacket("badadvbase", "advbase 0")
        if a.is_leave:
            pass                                    # the leave pair; sources are already limited to peers
        elif a.advbase != self.advbase:
            raise cp.BadPacket("badadvbase", f"advbase {a.advbase}, configured {self.advbase}")
        elif a.advskew > 254:
            raise cp.BadPacket("badadvskew", f"advskew {a.advskew} without advbase 255")
        elif peer is not None and a.advskew < peer.min_advskew:
            raise cp.BadPacket("badadvskew", f"advskew {a.advskew}, below the peer's {peer.min_advskew}")
        passes = (self._pw, self.next_pw) if self.next_pw else (self._pw,)
        signed = passes[cp.auth_index(a, passes, self.vhid, self.vip)]
        self._count(rx.src, a.counter, now, peer.counter if peer is not None else "any")
        self.sources[rx.src].signed = _fingerprint(signed)
        return a

    def _count(self, src: str, counter: int, now: float, mode: str) -> None:
        # the digest does not cover the source: a counter we sent, or one accepted from another source, is a
        # replay under a borrowed address; refused before anything about `src` is touched
        if self.is_own(counter):
            raise cp.BadPacket("replay", f"counter {counter} was sent by this node")
        other = self.by_counter.get(counter)
        if other is not None and other != src:
            raise cp.BadPacket("replay", f"counter {counter} already seen from {other}")
        s = self.sources.get(src)
        if mode == "any":
            key = (src, counter)
            if key in self.seen:
                raise cp.BadPacket("replay", f"counter {counter} already seen")
            self.seen[key] = None
            while len(self.seen) > SEEN_MAX:
                self.seen.popitem(last=False)
        elif s is not None and counter <= s.counter:
            if self.resync > 0 and now - s.last >= self.resync:
                self.counter_resets += 1            # opt-in: a ucarp/carp(4) peer restarted with a random counter
            elif not self._recovered(s, counter, now):
                raise cp.BadPacket("replay", f"counter {counter} not above {s.counter}")
        if s is None:
            s = self.sources[src] = _Source(counter, now, lo=counter)
            while len(self.sources) > max(self.max_sources, 1):
                self.sources.popitem(last=False)
        self.sources.move_to_end(src)
        if counter != s.counter + 1 or s.lo < 0:
            s.lo = counter
        s.counter, s.last, s.streak = counter, now, None
        s.accepted += 1
        self.by_counter[counter] = src
        self.by_counter.move_to_end(counter)
        while len(self.by_counter) > SEEN_MAX:
            self.by_counter.popitem(last=False)

    def _recovered(self, s: _Source, counter: int, now: float) -> bool:
        """One bad high-water mark must not lock a peer out for good. A forward peer whose digest-valid adverts
        fail only the counter check, with counters that go up by one each (as a speaker's do), none of them in
        the run already accepted from it, for RECOVER_ADVERTS x advbase seconds without any advert accepted,
        is resynced to its counter (counted in counter_resets). A replay of adverts this node accepted never
        counts; a break in the sequence starts over. Only counters RESYNC_LEAP or more below the mark are resynced:
        the mark is then no recent counter of this peer's (a forged one, another node's advert replayed under this
        peer's address, a restart on another clock). Counters just below the mark are adverts this node missed (a
        lost packet, its own restart): replayed once the peer is dead, they must not make it look alive."""
        if s.lo <= counter <= s.counter:
            return False                            # one we accepted already: a plain replay (the streak stays)
        if s.counter - counter < RESYNC_LEAP:
            return False
        st = s.streak
        if st is None or counter != st[2] + 1:
            s.streak = (now, counter, counter)
            return False
        s.streak = (st[0], st[1], counter)
        if now - st[0] < RECOVER_ADVERTS * max(self.advbase, 1):
            return False
        self.counter_resets += 1
        logging.getLogger(__name__).warning("counter resync: %d adverts in a row below the last counter, now %d",
                                            counter - st[1] + 1, counter)
        return True

    def snapshot(self, now: float | None = None) -> dict[str, dict]:
        """Per source: the last accepted counter, how many were accepted, and when (wall clock) the last one came
        with which pass (its fingerprint: a sync receiver refuses a config that stops accepting it)."""
        mono, wall = (time.monotonic() if now is None else now), time.time()
        return {ip: {"counter": s.counter, "accepted": s.accepted, "signed": s.signed,
                     "at": round(wall - (mono - s.last), 3)} for ip, s in self.sources.items()}

    def restore(self, saved: Mapping, now: float) -> int:
        """Counters saved by an earlier run (its state file): replays stay refused across a restart.
        Only sources this guard would accept; returns how many were restored."""
        n = 0
        for ip, d in (saved or {}).items():
            peer = self.peers.get(ip)
            if peer is None or peer.counter != "forward" or not isinstance(d, Mapping):
                continue
            c = d.get("counter")
            if isinstance(c, int) and 0 <= c <= COUNTER_MASK and len(self.sources) < max(self.max_sources, 1):
                self.sources[ip] = _Source(c, now - 1e6, lo=c)   # as if silent for long (matters only with resync)
                n += 1
        return n


class BadLog:
    """Dropped adverts: counted by reason, logged through a token bucket (`burst` lines, refilled at
    burst/per per second) with a "K more suppressed" note, the last few senders kept in a small LRU."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, per: float = 60.0,
                 quiet: Iterable[str] = ("badvhid",), max_sources: int = MAX_BAD_SOURCES) -> None:
        self.log = logger
        self.burst, self.rate = float(burst), burst / per
        self.tokens = float(burst)
        self.t = None
        self.quiet = set(quiet)
        self.counts: dict[str, int] = {}
        self.suppressed = 0                          # lines not logged, in all
        self.pending: dict[str, int] = {}            # not logged since the last line, by reason
        self.sources: OrderedDict[str, list] = OrderedDict()
        self.max_sources = max_sources

    def _refill(self, now: float) -> None:
        if self.t is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now

    def _pending_note(self) -> str:
        if not self.pending:
            return ""
        n = sum(self.pending.values())
        why = ", ".join(f"{k} {v}" for k, v in sorted(self.pending.items()))
        self.pending.clear()
        return f"; {n} more dropped since the last line ({why})"

    def record(self, reason: str, src: str, now: float, detail: str = "", mac: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if src != "?":
            e = self.sources.pop(src, None) or [0, "", 0.0, ""]
            e[0] += 1
            e[1], e[2], e[3] = reason, time.time(), mac or e[3]
            self.sources[src] = e
            while len(self.sources) > self.max_sources:
                self.sources.popitem(last=False)
        if reason in self.quiet and not self.log.isEnabledFor(logging.DEBUG):
            return
        self._refill(now)
        if self.tokens < 1.0:
            self.suppressed += 1
            self.pending[reason] = self.pending.get(reason, 0) + 1
            return
        self.tokens -= 1.0
        who = f"{src} ({mac})" if mac else src
        self.log.warning("dropped advert from %s: %s%s (%d so far)%s", who, reason, f" [{detail}]" if detail else "",
                         self.counts[reason], self._pending_note())

    def flush(self, now: float) -> None:
        """A quiet moment after suppression: one summary line, so the log shows how many were dropped."""
        if not self.pending:
            return
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.log.warning("dropped adverts%s", self._pending_note().replace("; ", ": ", 1))

    def snapshot(self) -> dict:
        return {"by_reason": dict(sorted(self.counts.items())), "log_suppressed": self.suppressed,
                "recent_sources": [{"src": s, "count": e[0], "reason": e[1], "last": round(e[2], 3),
                                    **({"mac": e[3]} if e[3] else {})}
                                   for s, e in reversed(self.sources.items())]}
