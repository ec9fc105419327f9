"""The speaker's control socket for the fast liveness layer: a 0600 Unix datagram socket, its verbs, the sender."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from appliance.ha.fsm import MASTER, Core

VERBS = ("master", "hold", "leave", "announce")


def open_control(path: str) -> socket.socket:
    """Bind the control socket, made 0600 before anyone can send to it (only root, or the engine's user, can)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # the umask is the process's: the speaker calls this from its one thread, before its script worker starts
    old = os.umask(0o177)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    s.setblocking(False)
    return s


def command(core: Core, data: bytes, now: float) -> list[tuple] | None:
    """One datagram applied to the state machine: the actions to run, None when it is not a command."""
    verb, _, cause = data.decode(errors="replace").partition(" ")
    cause = cause[:200]
    if verb == "master":
        return core.force_master(now, cause)
    if verb == "hold":
        core.hold(now)
        return []
    if verb == "leave":
        return core.demote(now, why=f"fast liveness: {cause}") if core.state == MASTER else []
    if verb == "announce":
        # another node says it is MASTER too (back from a cut): an advert now settles who stays, and the gratuitous
        # ARP takes the clients back from the node that held the VIP meanwhile
        return [("send",), ("garp",)] if core.state == MASTER else []
    return None


class Sender:
    """The supervisor's end: one unbound datagram socket, commands to each vhid's engine; never blocks."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def send(self, path: Path, verb: str, cause: str = "") -> bool:
        if verb not in VERBS:
            raise ValueError(f"unknown engine command {verb!r}")
        try:
            self.sock.sendto(f"{verb} {cause}".strip().encode()[:512], str(path))
            return True
        except OSError:          # the engine is restarting (no socket yet) or its queue is full: the next tick repeats
            return False
