"""The fast liveness heartbeat's wire format (HMAC keyed from the CARP pass) and the freshness check on receipt.

A heartbeat names its sender, the path it was sent on (sync link or LAN), the sender's epoch (strictly greater at
every start of its supervisor) and a sequence number, and echoes the receiver's own epoch and the highest sequence
number it has heard from the receiver (the ack). A receiver takes a heartbeat as fresh only when the MAC holds,
the source address is the sender's configured address on that path, the echo is its own current epoch, (epoch, seq)
is above the last one taken from that sender on that path, and the ack names one of the receiver's own heartbeats
sent within the last `max_age` seconds. So a captured heartbeat replayed later, on the other path or to a restarted
receiver is refused, and so is one held back and released later (it acks an old heartbeat): a LAN host that delays
the master's heartbeats cannot keep a backup believing in a dead master. CARP's own digest covers none of this.
"""
from __future__ import annotations

import bisect
import hashlib
import hmac
import struct
from collections import deque
from dataclasses import dataclass, field

MAGIC = b"CGHB"
VERSION = 1
HEARTBEAT, TAKEOVER = 1, 2
PATHS = ("sync", "lan")
ROLE_CODES = {"": 0, "BACKUP": 1, "MASTER": 2, "INIT": 3}
ROLE_NAMES = {v: k for k, v in ROLE_CODES.items()}
MAC_LEN = 16
MAX_LEN = 1024
F_PROXY_OK, F_LINK_OK, F_LEAVING, F_WITNESS_ON, F_WITNESS_OK = 1, 2, 4, 8, 16
SENT_KEPT = 4096       # own heartbeats remembered for the ack check (seconds of them at 10/s per peer and path)
_HEAD = struct.Struct("!4sBBBBQQQQ")         # magic, version, kind, path, flags, epoch, seq, echo, ack


class BadHeartbeat(ValueError):
    """A datagram that is not a heartbeat we take; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def key(password: bytes) -> bytes:
    """The heartbeat key: derived from the CARP pass, so no new secret to distribute and none reused as is."""
    return hmac.new(password, b"carpguard fast liveness v1", hashlib.sha256).digest()


@dataclass
class Beat:
    """One heartbeat: who, on which path, what it holds (vhid -> (role, advskew)), and for TAKEOVER the vhids and why."""

    node: str
    path: str
    epoch: int
    seq: int
    echo: int
    ack: int = 0
    kind: int = HEARTBEAT
    proxy_ok: bool = True
    link_ok: bool = True
    leaving: bool = False
    witness: str = ""                    # the LAN witness as this node sees it: "" none, "ok" answers, "lost"
    vhids: dict[int, tuple[str, int]] = field(default_factory=dict)
    cause: str = ""

    def role(self, vhid: int) -> str:
        return self.vhids.get(vhid, ("", 0))[0]


def pack(b: Beat, keys: list[bytes]) -> bytes:
    """The datagram for `b`, its MAC under the first key (the current pass)."""
    name, cause = b.node.encode()[:63], b.cause.encode()[:200]
    flags = (F_PROXY_OK if b.proxy_ok else 0) | (F_LINK_OK if b.link_ok else 0) | (F_LEAVING if b.leaving else 0)
    flags |= (F_WITNESS_ON if b.witness else 0) | (F_WITNESS_OK if b.witness == "ok" else 0)
    body = _HEAD.pack(MAGIC, VERSION, b.kind, PATHS.index(b.path), flags, b.epoch, b.seq, b.echo, b.ack)
    body += bytes([len(name)]) + name + bytes([len(b.vhids)])
    for vhid, (role, advskew) in sorted(b.vhids.items())[:64]:
        body += bytes([vhid, ROLE_CODES.get(role, 0), advskew])
    body += bytes([len(cause)]) + cause
    return body + hmac.new(keys[0], body, hashlib.sha256).digest()[:MAC_LEN]


def unpack(data: bytes, keys: list[bytes]) -> Beat:
    """Parse and authenticate one datagram (any of `keys`: the pass and, in a rotation, the next one)."""
    if len(data) > MAX_LEN or len(data) < _HEAD.size + 3 + MAC_LEN:
        raise BadHeartbeat("malformed", f"{len(data)} bytes")
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if body[:4] != MAGIC:
        raise BadHeartbeat("malformed", "not a heartbeat")
    if not any(hmac.compare_digest(hmac.new(k, body, hashlib.sha256).digest()[:MAC_LEN], mac) for k in keys):
        raise BadHeartbeat("mac")
    _, version, kind, path, flags, epoch, seq, echo, ack = _HEAD.unpack_from(body)
    if version != VERSION or kind not in (HEARTBEAT, TAKEOVER) or path >= len(PATHS):
        raise BadHeartbeat("malformed", f"version {version} kind {kind} path {path}")
    try:
        at = _HEAD.size
        name = body[at + 1:at + 1 + body[at]].decode()
        at += 1 + body[at]
        vhids = {}
        for i in range(body[at]):
            vhid, role, advskew = body[at + 1 + 3 * i:at + 4 + 3 * i]
            vhids[vhid] = (ROLE_NAMES.get(role, ""), advskew)
        at += 1 + 3 * body[at]
        cause = body[at + 1:at + 1 + body[at]].decode(errors="replace")
        if at + 1 + body[at] != len(body):
            raise IndexError
    except (IndexError, ValueError):
        raise BadHeartbeat("malformed", "truncated") from None
    return Beat(node=name, path=PATHS[path], epoch=epoch, seq=seq, echo=echo, ack=ack, kind=kind,
                proxy_ok=bool(flags & F_PROXY_OK), link_ok=bool(flags & F_LINK_OK), leaving=bool(flags & F_LEAVING),
                witness=("ok" if flags & F_WITNESS_OK else "lost") if flags & F_WITNESS_ON else "",
                vhids=vhids, cause=cause)


@dataclass
class Replay:
    """The receiver's side: its own epoch, when it sent its recent heartbeats, the highest (epoch, seq) taken per
    sender and path, and the highest (epoch, seq) heard per sender (what it echoes and acks)."""

    epoch: int
    sources: dict[tuple[str, str], str]                 # (node, path) -> the address it must come from
    max_age: float = 0.3                                # an ack older than this: the beat was held back
    best: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    heard: dict[str, tuple[int, int]] = field(default_factory=dict)
    sent: deque = field(default_factory=lambda: deque(maxlen=SENT_KEPT))   # (seq, monotonic time), ascending

    def note_sent(self, seq: int, now: float) -> None:
        self.sent.append((seq, now))

    def sent_at(self, seq: int) -> float | None:
        i = bisect.bisect_left(self.sent, (seq, -1.0))
        return self.sent[i][1] if i < len(self.sent) and self.sent[i][0] == seq else None

    def admit(self, b: Beat, src: str, now: float, path: str | None = None) -> Beat:
        """`b` (MAC already checked) from `src`, arrived on `path`: returned when fresh, else BadHeartbeat naming why."""
        want = self.sources.get((b.node, b.path))
        if want is None or want != src or (path is not None and b.path != path):
            raise BadHeartbeat("unknown_source", f"{b.node!r} on {b.path} from {src}")
        # the sender's newest (epoch, seq) is what we echo and ack, also before it has heard us (no forgery can
        # raise it; an older replay cannot lower it)
        if (b.epoch, b.seq) > self.heard.get(b.node, (0, 0)):
            self.heard[b.node] = (b.epoch, b.seq)
        last = self.best.get((b.node, b.path), (0, 0))
        if (b.epoch, b.seq) <= last:
            raise BadHeartbeat("replayed", f"{b.node} {b.path} epoch {b.epoch} seq {b.seq}")
        self.best[(b.node, b.path)] = (b.epoch, b.seq)
        if b.echo != self.epoch:
            # genuine but not (yet) addressed to this run of ours: remembered as the newest, not taken as liveness
            raise BadHeartbeat("stale", f"{b.node} {b.path} echoes {b.echo}, not our epoch")
        at = self.sent_at(b.ack)
        if at is None or now - at > self.max_age:
            raise BadHeartbeat("stale", f"{b.node} {b.path} acks our seq {b.ack}, "
                                        f"{'unknown' if at is None else f'sent {now - at:.2f} s ago'}")
        return b

    def echo_for(self, node: str) -> int:
        return self.heard.get(node, (0, 0))[0]

    def ack_for(self, node: str) -> int:
        return self.heard.get(node, (0, 0))[1]
