"""The guard's inputs that change while the speaker runs: the peer list (--peer, --peers-file) and the next pass."""
from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.ha import protocol as cp
from appliance.ha.watched import WatchedFile

if TYPE_CHECKING:
    from appliance.ha.guard import Guard

COUNTER_MODES = ("forward", "any")
PEERS_FILE_MAX = 65536      # bytes read from a --peers-file (one spec a line; a cluster has a handful of nodes)


@dataclass(frozen=True)
class Peer:
    """A configured node that may send adverts for this vhid, and the lowest advskew it is configured with."""

    ip: str
    min_advskew: int = 0
    counter: str = "forward"    # forward: a speaker (counters only go up); any: ucarp/carp(4) (replays by cache)


def parse_peer(spec: str) -> Peer:
    """`IP[,advskew=N][,counter=forward|any]` (the supervisor passes every other node's LAN address and its
    advskew for the vhid)."""
    parts = [p.strip() for p in spec.split(",")]
    try:
        ip = str(ipaddress.IPv4Address(parts[0].split("/")[0]))
    except ValueError:
        raise ValueError(f"--peer {spec!r}: not an IPv4 address") from None
    skew, mode = 0, "forward"
    for p in parts[1:]:
        k, _, v = p.partition("=")
        if k == "advskew" and v.isdigit() and 0 <= int(v) <= 254:
            skew = int(v)
        elif k == "counter" and v in COUNTER_MODES:
            mode = v
        else:
            raise ValueError(f"--peer {spec!r}: expected IP[,advskew=0-254][,counter=forward|any], got {p!r}")
    return Peer(ip, skew, mode)


def parse_peers(text: str, where: str = "peers file") -> list[Peer]:
    """A --peers-file: one `parse_peer` spec a line; blank lines and `#` comments skipped. ValueError names the line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        try:
            out.append(parse_peer(spec))
        except ValueError as e:
            raise ValueError(f"{where}:{n}: {e}") from None
    return out


class PeersFile(WatchedFile):
    """--peers-file: re-read when its mtime, size or inode changes, looked at no more than once per `every`
    seconds (one fstat, at most PEERS_FILE_MAX bytes). A file that is missing or does not parse is logged once
    per version and changes nothing: the caller keeps the list it has."""

    what, keeps = "peers file", "the previous peer list stays"

    def read(self) -> list[Peer]:
        """The file's peers now (at start); OSError or ValueError when it cannot be used."""
        raw = self.read_bytes(PEERS_FILE_MAX)
        try:
            return parse_peers(raw.decode(), self.path)
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: not UTF-8 text") from None


class NextPass:
    """--passfile-next: the pass being rotated in (cluster.password_next). Read at start and re-read when it changes
    (looked at once a second, like the peers file); missing or empty means no rotation. The guard then accepts adverts
    signed with either pass; the speaker keeps signing with its own (docs/security.md)."""

    def __init__(self, path: str, logger: logging.Logger, every: float = 1.0) -> None:
        self.path, self.log, self.every = path, logger, every
        self._sig: tuple | None = None
        self._next = 0.0

    def apply(self, g: "Guard", now: float) -> None:
        if now < self._next:
            return
        self._next = now + self.every
        try:
            st = os.stat(self.path)
            sig: tuple = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            sig = ("missing",)
        if sig == self._sig:
            return
        self._sig = sig
        pw = None
        if sig != ("missing",):
            try:
                with open(self.path, "rb") as f:
                    raw = f.read(256).split(b"\n", 1)[0].rstrip(b"\r")
                pw = cp.check_pass(raw) if raw else None
            except (OSError, ValueError) as e:
                self.log.warning("next-pass file %s not used: %s", self.path, getattr(e, "strerror", None) or e)
                pw = None
        if pw != g.next_pw:
            g.next_pw = pw
            self.log.warning("pass rotation: %s", "also accepting the next pass" if pw else "accepting only the pass")
