"""Who may see the status page: source addresses (loopback, the sync subnet, admin.allow), HTTP Basic checked with
bcrypt, a short delay for a client after a few failures, and where the listener binds."""
from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import threading
import time
from dataclasses import dataclass, field

import bcrypt

from appliance.core.model import Appliance

FREE_FAILURES = 3      # failed logins per client before each answer to it is delayed
FAIL_WINDOW = 300.0    # seconds a failure is remembered
FAIL_DELAY = 2.0       # seconds a client past FREE_FAILURES waits for each answer
MAX_CLIENTS = 4096     # failure records kept (the oldest are forgotten past this: memory stays bounded)
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def bind_addresses(cfg: Appliance, node: str) -> list[str]:
    """admin.listen resolved to this node's addresses, in order, without repeats."""
    me = cfg.nodes[node]
    named = {"loopback": "127.0.0.1", "sync": str(me.sync.ip), "lan": str(me.lan.ip)}
    return list(dict.fromkeys(named.get(str(x), str(x)) for x in cfg.admin.listen))


@dataclass
class Gate:
    """The checks for one config. Once a hash is set every client needs the password (loopback too), except the
    nodes' own sync addresses (`private`): the peers read each other's /status.json over the sync link."""

    allow: list[Net]
    sync_nets: list[Net]
    private: set[str]
    user: str = "admin"
    password_hash: bytes | None = None
    failures: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_config(cls, cfg: Appliance) -> "Gate":
        a = cfg.admin
        h = a.password_hash.get_secret_value().encode() if a.password_hash is not None else None
        sync_nets = list(dict.fromkeys(n.sync.network for n in cfg.nodes.values()))
        private = {str(n.sync.ip) for n in cfg.nodes.values()}
        return cls(list(a.allow), sync_nets, private, a.user, h)

    def source_ok(self, ip: str) -> bool:
        addr = _addr(ip)
        if addr is None:
            return False
        return addr in LOOPBACK or any(addr in n for n in (*self.sync_nets, *self.allow))

    def needs_password(self, ip: str) -> bool:
        addr = _addr(ip)
        return self.password_hash is not None and not (addr is not None and str(addr) in self.private)

    def check(self, ip: str, authorization: str | None) -> bool:
        """Whether the Authorization header holds the right user and password; a failure is recorded for ip."""
        user, password = _basic(authorization)
        ok = self.password_hash is not None and password is not None
        # bcrypt runs for a wrong user too, so the answer's time does not tell which part was wrong
        pw_ok = bcrypt.checkpw((password or "").encode(), self.password_hash) if ok else False
        ok = ok and pw_ok and hmac.compare_digest((user or "").encode(), self.user.encode())
        if not ok and authorization is not None:
            self._failed(ip)
        return ok

    def delay(self, ip: str) -> float:
        """Seconds to wait before answering ip: FAIL_DELAY once it failed more than FREE_FAILURES times lately."""
        now = time.monotonic()
        with self.lock:
            recent = [t for t in self.failures.get(ip, []) if now - t < FAIL_WINDOW]
            return FAIL_DELAY if len(recent) >= FREE_FAILURES else 0.0

    def _failed(self, ip: str) -> None:
        now = time.monotonic()
        with self.lock:
            if ip not in self.failures and len(self.failures) >= MAX_CLIENTS:
                self.failures.pop(next(iter(self.failures)))
            recent = [t for t in self.failures.get(ip, []) if now - t < FAIL_WINDOW]
            self.failures[ip] = (recent + [now])[-FREE_FAILURES * 4:]


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

