"""Who may see the status page: source addresses (loopback, the sync subnet, admin.allow), HTTP Basic checked with
bcrypt (a few checks at a time, none for an address or a cluster over its failure budget), and where it binds."""
from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal

import bcrypt

from appliance.core.model import Appliance

FREE_FAILURES = 5        # failed logins per address within FAIL_WINDOW; past them it gets 429 without a check
GLOBAL_FAILURES = 50     # failed logins from all addresses together within FAIL_WINDOW; past them everyone gets 429
FAIL_WINDOW = 120.0      # seconds a failure is remembered (and so the longest a lock-out lasts)
CHECKS_AT_ONCE = 2       # bcrypt checks running at the same time (each costs ~0.1 s of a core at cost 10)
MAX_CLIENTS = 4096       # failure records kept (the oldest are forgotten past this: memory stays bounded)
PEER_PATH = "/status.json"  # the only thing the peers ask each other for
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Verdict = Literal["ok", "denied", "locked"]


def bind_addresses(cfg: Appliance, node: str) -> list[str]:
    """admin.listen resolved to this node's addresses, in order, without repeats."""
    me = cfg.nodes[node]
    named = {"loopback": "127.0.0.1", "sync": str(me.sync.ip), "lan": str(me.lan.ip)}
    return list(dict.fromkeys(named.get(str(x), str(x)) for x in cfg.admin.listen))


@dataclass
class Gate:
    """The checks for one node's config. Once a hash is set every client needs the password (loopback too), except
    a peer's sync address asking our sync listener for /status.json: the generation column over the sync link."""

    allow: list[Net]
    sync_nets: list[Net]
    peers: set[str]                 # the OTHER nodes' sync addresses (never this node's own)
    own_sync: str | None = None     # this node's sync address: the listener the peers reach
    user: str = "admin"
    password_hash: bytes | None = None
    clock: Callable[[], float] = time.monotonic
    failures: dict[str, list[float]] = field(default_factory=dict)
    all_failures: deque = field(default_factory=lambda: deque(maxlen=GLOBAL_FAILURES))
    lock: threading.Lock = field(default_factory=threading.Lock)
    checks: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(CHECKS_AT_ONCE))

    @classmethod
    def from_config(cls, cfg: Appliance, node: str) -> "Gate":
        a = cfg.admin
        h = a.password_hash.get_secret_value().encode() if a.password_hash is not None else None
        sync_nets = list(dict.fromkeys(n.sync.network for n in cfg.nodes.values()))
        own = str(cfg.nodes[node].sync.ip)
        peers = {str(n.sync.ip) for name, n in cfg.nodes.items() if name != node} - {own}
        return cls(list(a.allow), sync_nets, peers, own, a.user, h)

    def source_ok(self, ip: str) -> bool:
        addr = _addr(ip)
        if addr is None:
            return False
        return addr in LOOPBACK or any(addr in n for n in (*self.sync_nets, *self.allow))

    def needs_password(self, ip: str, local: str, path: str) -> bool:
        """Whether this request needs HTTP Basic: always once a hash is set, except a peer's sync address asking
        for /status.json on our sync address (a local user binding our own sync address gains nothing)."""
        if self.password_hash is None:
            return False
        peer, here = _addr(ip), _addr(local)
        exempt = (peer is not None and here is not None and self.own_sync is not None
                  and str(peer) in self.peers and str(here) == self.own_sync and path == PEER_PATH)
        return not exempt

    def verdict(self, ip: str, authorization: str | None) -> Verdict:
        """"ok" for the right user and password; "locked" (no bcrypt run) while ip or everyone is over the failure
        budget; else "denied", recorded as a failure of ip when a password was offered."""
        user, password = _basic(authorization)
        if self.password_hash is None or password is None:
            return "locked" if self.locked(ip) else "denied"
        with self.checks:
            # asked again inside: parallel connections queue here, and the ones behind a failure see it
            if self.locked(ip):
                return "locked"
            # bcrypt runs for a wrong user too, so the answer's time does not tell which part was wrong
            ok = bcrypt.checkpw(password.encode(), self.password_hash)
        if ok and hmac.compare_digest((user or "").encode(), self.user.encode()):
            return "ok"
        self._failed(ip)
        return "denied"

    def check(self, ip: str, authorization: str | None) -> bool:
        return self.verdict(ip, authorization) == "ok"

    def locked(self, ip: str) -> bool:
        """Whether ip (FREE_FAILURES) or all clients together (GLOBAL_FAILURES) failed too often within FAIL_WINDOW."""
        now = self.clock()
        with self.lock:
            mine = [t for t in self.failures.get(ip, []) if now - t < FAIL_WINDOW]
            everyone = sum(1 for t in self.all_failures if now - t < FAIL_WINDOW)
        return len(mine) >= FREE_FAILURES or everyone >= GLOBAL_FAILURES

    def _failed(self, ip: str) -> None:
        now = self.clock()
        with self.lock:
            if ip not in self.failures and len(self.failures) >= MAX_CLIENTS:
                self.failures.pop(next(iter(self.failures)))
            recent = [t for t in self.failures.pop(ip, []) if now - t < FAIL_WINDOW]
            self.failures[ip] = (recent + [now])[-FREE_FAILURES:]  # re-inserted: the oldest entries go first
            self.all_failures.append(now)


def _addr(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        a = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def _basic(header: str | None) -> tuple[str | None, str | None]:
    """(user, password) from `Basic base64(user:password)`, (None, None) when absent or unreadable."""
    if not header:
        return None, None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, None
    return (user, password) if sep else (None, None)


def hash_password(password: str, rounds: int = 12) -> str:
    """A bcrypt hash for admin.password_hash."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()
