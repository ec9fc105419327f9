"""The speaker's command line: ucarp's options (same names, same meaning) plus the speaker's own, and the pass file."""
from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from appliance.ha import peers
from appliance.ha import protocol as cp


def _int_range(lo: int, hi: int, what: str):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {s!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be {lo}-{hi}, got {v}")
        return v
    return conv


def _ipv4(s: str) -> str:
    try:
        return str(ipaddress.IPv4Address(s.split("/")[0]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {s!r}") from None


def _peer(s: str) -> peers.Peer:
    try:
        return peers.parse_peer(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m appliance.ha.speaker",
        description="CARP speaker (ucarp-compatible options and wire format; monotonic timers; leave advert on SIGTERM)")
    a = p.add_argument
    a("-i", "--interface", required=True, help="interface to speak CARP on")
    a("-s", "--srcip", required=True, type=_ipv4, help="this host's real address (advert source)")
    a("-m", "--mcast", default=cp.CARP_MCAST, type=_ipv4, help="multicast group (default 224.0.0.18)")
    a("-v", "--vhid", required=True, type=_int_range(1, 255, "--vhid"), help="virtual host id 1-255")
    a("-p", "--pass", dest="password", help="pass (visible in ps; prefer --passfile)")
    a("-o", "--passfile", help="read the pass from this file (first line; keep it mode 0600)")
    a("--passfile-next", metavar="FILE", help="during a pass rotation: also accept adverts signed with the pass in "
      "this file (first line); re-read when it changes, missing = no rotation. Not a ucarp option")
    a("-P", "--preempt", action="store_true", help="take over from a master that advertises slower")
    a("-a", "--addr", required=True, type=_ipv4, help="the virtual IP (passed to the scripts, part of the HMAC)")
    a("-b", "--advbase", default=1, type=_int_range(1, 254, "--advbase"), help="seconds between adverts")
    a("-k", "--advskew", default=0, type=_int_range(0, 254, "--advskew"), help="skew 0-254 (lowest is master)")
    a("-u", "--upscript", help="run on becoming MASTER: SCRIPT IFACE VIP [XPARAM]")
    a("-d", "--downscript", help="run on becoming BACKUP: SCRIPT IFACE VIP [XPARAM]")
    a("-r", "--deadratio", default=3, type=_int_range(1, 255, "--deadratio"), help="adverts missed before takeover")
    a("-z", "--shutdown", action="store_true", help="run the down script on exit if MASTER")
    a("-x", "--xparam", help="extra parameter for the scripts")
    a("-D", "--debug", action="store_true", help="log every advert")
    a("-S", "--ignoreifstate", action="store_true", help="ignore interface state (down, no carrier)")
    a("-n", "--neutral", action="store_true", help=argparse.SUPPRESS)
    a("--garp", action=argparse.BooleanOptionalAction, default=True,
      help="send a gratuitous ARP for the VIP after the up script, as ucarp does (--no-garp: the up script does it)")
    a("--initial-wait", type=float, default=None,
      help="seconds to listen in BACKUP at start before claiming MASTER (default: one dead interval)")
    a("--script-timeout", type=float, default=60.0, help="kill an up/down script after this many seconds")
    a("--state-file", help="write {state, since, counters, peers, bad} JSON here on every transition, on SIGUSR1 and "
                           "every few seconds while counters change; read back at start (counters survive a restart)")
    a("--peer", action="append", default=[], type=_peer, metavar="IP[,advskew=N][,counter=forward|any]",
      help="a node allowed to send adverts for this vhid (repeat per node); N is the lowest advskew it is configured "
           "with; counter=any for a ucarp or kernel-CARP peer (their counters do not only go up). With --peer, "
           "adverts from any other address are dropped (without it, any address is heard, as ucarp)")
    a("--peers-file", metavar="FILE",
      help="more peers, one IP[,advskew=N][,counter=forward|any] a line (# comments); re-read when it changes "
           "(checked once a second), so a peer's advskew or address changes without a restart. A file that does "
           "not parse, or that would empty the list, is logged and the previous list kept")
    a("--advskew-file", metavar="FILE",
      help="this node's advskew (first line, 0-254), re-read when it changes (looked at every 0.25 s, at once on "
           "SIGUSR1): a demotion or promotion without a restart; a master announces the new value at once, so a "
           "preempting backup takes over with no gap. Overrides --advskew when readable at start. Not a ucarp option")
    a("--counter-resync", type=float, default=0.0, metavar="SECONDS",
      help="accept a counter below the last one from a source that was silent this long (a ucarp or kernel-CARP "
           "peer that restarted; such a restart picks a random counter). Default 0: never (speaker peers never need it)")
    a("--control", metavar="SOCKET",
      help="a Unix datagram socket (made 0600) for the fast liveness layer: 'master CAUSE' (become master now), "
           "'hold' (the master is alive: restart the dead timer), 'leave CAUSE' (leave advert, then backup). "
           "Not a ucarp option")
    a("--start-master", action="store_true",
      help="start as MASTER (advert at once, no up script): the supervisor restarting a crashed master that kept "
           "its VIP. Not a ucarp option")
    a("--log-burst", type=_int_range(1, 10000, "--log-burst"), default=10,
      help="dropped-advert log lines allowed in a burst; refilled over a minute (the rest are counted)")
    return p


def read_pass(args: argparse.Namespace) -> bytes:
    if args.password is not None and args.passfile:
        raise ValueError("give --pass or --passfile, not both")
    if args.passfile:
        path = Path(args.passfile)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ValueError(f"--passfile {path}: {e.strerror}") from None
        pw = raw.split(b"\n", 1)[0].rstrip(b"\r")
        try:
            return cp.check_pass(pw)
        except ValueError as e:
            raise ValueError(f"--passfile {path}: {e}") from None
    if args.password is None:
        raise ValueError("a pass is required: --passfile FILE (or --pass)")
    return cp.check_pass(args.password.encode())
