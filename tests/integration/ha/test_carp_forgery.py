"""Issue 12, finding 1: a LAN host without the CARP pass cannot black-hole or split the VIP (real namespaces).

fw1 (advskew 0) and fw2 (advskew 100) run the speaker with --peer for each other, as the supervisor starts
them; a third namespace on the same bridge is the attacker. It captures fw1's adverts off the wire and
replays them rewritten in the fields outside the CARP digest (source, advbase, advskew), forges leave adverts,
and floods bad adverts. Throughout, fw1 holds the VIP alone and neither node runs a script.

Run as a child inside the attacker's namespace: `python -m tests.integration.ha.test_carp_forgery PLAN-JSON`.
"""
from __future__ import annotations

import json
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.carp_lan import PY, ROOT, Lan
from tests.support.env import need_tool
from tests.support.wait import poll

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timing]

SKEW2 = 100
FLOOD = 20_000


# --------------------------------------------------------------------------- the attacker (child process)

def _rewrite(pkt: bytes, src: str | None, advbase: int | None, advskew: int | None) -> bytes:
    """A captured advert with the fields outside the digest changed, both checksums fixed up (digest kept)."""
    from appliance.ha import protocol as cp
    ihl = (pkt[0] & 0x0F) * 4
    ip, carp = bytearray(pkt[:ihl]), bytearray(pkt[ihl:ihl + cp.CARP_HEADER_LEN])
    if src is not None:
        ip[12:16] = socket.inet_aton(src)
    if advskew is not None:
        carp[2] = advskew
    if advbase is not None:
        carp[5] = advbase
    carp[6:8] = b"\0\0"
    carp[6:8] = struct.pack("!H", cp.inet_checksum(bytes(carp)))
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", cp.inet_checksum(bytes(ip)))
    return bytes(ip) + bytes(carp)


def _capture(iface: str, src: str, timeout: float) -> bytes:
    """One CARP packet from `src` seen on the wire (AF_PACKET, bounded by `timeout`)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    s.bind((iface, 0x0800))
    s.settimeout(0.5)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            data = s.recv(2048)
        except socket.timeout:
            continue
        if len(data) >= 56 and data[9] == 112 and socket.inet_ntoa(data[12:16]) == src:
            return data[:56]
    raise SystemExit(f"no advert from {src} within {timeout} s")


def _attack(plan: dict) -> None:
    from appliance.ha import protocol as cp
    iface = plan["iface"]
    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                  struct.pack("4s4si", socket.inet_aton(cp.CARP_MCAST), socket.inet_aton("0.0.0.0"),
                              socket.if_nametoindex(iface)))
    captured = _capture(iface, plan["victim"], 10.0)
    sent, end = 0, time.monotonic() + plan.get("max_seconds", 30)
    rnd = random.Random(12)
    for i in range(plan["count"]):                       # bounded in count and time
        if time.monotonic() > end:
            break
        kind = plan["kind"]
        if kind == "replay":                             # the captured advert, rewritten outside the digest
            pkt = _rewrite(captured, plan.get("src"), plan.get("advbase"), plan.get("advskew"))
        elif kind == "forge":                            # a new advert without the pass (wrong key)
            pkt = cp.build_packet(b"not-the-pass", plan["vhid"], plan["vip"], plan["src"], plan["advbase"],
                                  plan["advskew"], rnd.getrandbits(64), ident=i)
        else:                                            # flood: random sources, and the peers' with a bad digest
            src = plan["peers"][(i // 4) % 2] if i % 4 == 0 else f"{plan['net']}.{rnd.randrange(1, 255)}"
            pkt = bytearray(_rewrite(captured, src, None, rnd.choice([100, 150, 200])))
            pkt[36:56] = rnd.randbytes(20)               # garbage digest...
            pkt = _rewrite(bytes(pkt), None, None, None)  # ...under a correct checksum, so it reaches the digest check
            if i % 200 == 199:
                time.sleep(0.002)                        # ~50k/s at most: a flood, not a test of socket buffers
        try:
            tx.sendto(pkt, (cp.CARP_MCAST, 0))
            sent += 1
        except OSError:
            time.sleep(0.001)                            # ENOBUFS under the flood: back off a moment
        if plan.get("interval"):
            time.sleep(plan["interval"])
    print(json.dumps({"sent": sent, "captured_counter": struct.unpack("!Q", captured[28:36])[0]}), flush=True)


# --------------------------------------------------------------------------- the test side

class Holders:
    """Samples the VIP holders every 50 ms in a thread (bounded by stop() and a 120 s cap)."""

    def __init__(self, lan: Lan) -> None:
        self.lan, self.samples, self._stop = lan, [], threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        end = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < end:
            self.samples.append(tuple(self.lan.holders()))
            self._stop.wait(0.05)

    def stop(self) -> set[tuple]:
        self._stop.set()
        self.t.join(timeout=10)
        return set(self.samples)


@pytest.fixture
def cluster(tmp_path):
    need_tool("ip")
    lan = Lan(3, tmp_path)
    try:
        lan.up()
        fw1, fw2, attacker = lan.nodes
        for node, skew, other, oskew in ((fw1, 0, fw2, SKEW2), (fw2, SKEW2, fw1, 0)):
            node.state = tmp_path / f"{node.name}.json"
            lan.start("speaker", node, advskew=skew,
                      extra=[f"--peer={other.ip},advskew={oskew}", f"--state-file={node.state}"])
        assert poll(lambda: lan.holders() == [fw1.name], 10), (lan.holders(), diag(lan))
        time.sleep(1.5)                                  # fw2 has heard fw1 for a while
        yield lan
    finally:
        lan.close()


def diag(lan: Lan) -> str:
    return "\n".join(f"--- {n.name} events {n.events()}\n{n.stderr.read_text()[-2000:] if n.stderr and n.stderr.exists() else ''}"
                     for n in lan.nodes)


def attack(lan: Lan, **plan) -> dict:
    fw1, fw2, attacker = lan.nodes
    plan = {"iface": attacker.ifname, "victim": fw1.ip, "vhid": 1, "vip": lan.vip(), "net": lan.vip().rsplit(".", 1)[0],
            "peers": [fw1.ip, fw2.ip], **plan}
    r = subprocess.run(["ip", "netns", "exec", attacker.netns, PY, "-m", "tests.integration.ha.test_carp_forgery",
                        json.dumps(plan)], capture_output=True, text=True, cwd=ROOT, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def state(node) -> dict:
    """The speaker's state file, rewritten now (SIGUSR1)."""
    before = node.state.stat().st_mtime_ns if node.state.exists() else 0
    node.proc.send_signal(signal.SIGUSR1)
    poll(lambda: node.state.exists() and node.state.stat().st_mtime_ns != before, 5)
    return json.loads(node.state.read_text())


def steady(lan: Lan, holders: Holders, ev0: list[list[str]]) -> None:
    """fw1 alone held the VIP at every sample, and no node ran a script since the attack began."""
    seen = holders.stop()
    assert seen == {("n0",)}, (seen, diag(lan))
    assert [n.events() for n in lan.nodes[:2]] == ev0, diag(lan)


def test_replayed_advert_with_advbase0_from_a_stranger_is_ignored(cluster):
    """The review's replay: fw1's advert, advbase 0 / advskew 0, from an address no node has."""
    lan = cluster
    fw1, fw2, _ = lan.nodes
    ev0 = [n.events() for n in (fw1, fw2)]
    h = Holders(lan)
    stranger = f"{lan.vip().rsplit('.', 1)[0]}.77"
    r = attack(lan, kind="replay", src=stranger, advbase=0, advskew=0, count=40, interval=0.15)
    time.sleep(4.5)                                      # longer than fw1's and fw2's dead interval
    steady(lan, h, ev0)
    assert r["sent"] == 40
    for n in (fw1, fw2):
        st = state(n)
        assert st["counters"].get("bad_badsrc", 0) >= 30, st
        assert any(s["src"] == stranger for s in st["bad"]["recent_sources"]), st
    assert state(fw1)["state"] == "MASTER" and state(fw2)["state"] == "BACKUP"
    # and with fw1's own address the timing fields are still refused (advbase 0 is never valid)
    h = Holders(lan)
    attack(lan, kind="replay", src=fw1.ip, advbase=0, advskew=0, count=20, interval=0.1)
    time.sleep(1)
    steady(lan, h, ev0)
    assert state(fw2)["counters"].get("bad_badadvbase", 0) >= 15


def test_forged_or_replayed_leave_never_gives_two_holders(cluster):
    lan = cluster
    fw1, fw2, _ = lan.nodes
    ev0 = [n.events() for n in (fw1, fw2)]
    h = Holders(lan)
    # a captured advert of fw1's, rewritten to the leave pair: its counter is one fw2 has already seen
    r = attack(lan, kind="replay", src=fw1.ip, advbase=255, advskew=255, count=30, interval=0.1)
    # a fresh leave from fw1's address, without the pass
    attack(lan, kind="forge", src=fw1.ip, advbase=255, advskew=255, count=30, interval=0.1)
    # fw2's address claiming a better advskew than fw2 is configured with
    attack(lan, kind="replay", src=fw2.ip, advbase=1, advskew=0, count=30, interval=0.1, victim=fw1.ip)
    time.sleep(1.5)
    steady(lan, h, ev0)
    st2, st1 = state(fw2), state(fw1)
    assert st2["counters"].get("bad_replay", 0) >= 25, st2
    assert st2["counters"].get("bad_badauth", 0) >= 25, st2
    assert st1["counters"].get("bad_badadvskew", 0) >= 25, st1
    assert st2["peers"][fw1.ip]["counter"] > r["captured_counter"]     # fw1's real adverts still go forward
    assert st2["state"] == "BACKUP" and st1["state"] == "MASTER"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_flood_of_bad_adverts_keeps_memory_and_log_flat(cluster, capsys):
    lan = cluster
    fw1, fw2, _ = lan.nodes
    ev0 = [n.events() for n in (fw1, fw2)]
    time.sleep(1)
    before = {n.name: (rss_kb(n.proc.pid), len(n.stderr.read_text().splitlines())) for n in (fw1, fw2)}
    h = Holders(lan)
    t0 = time.monotonic()
    r = attack(lan, kind="flood", count=FLOOD, max_seconds=30)
    took = time.monotonic() - t0
    time.sleep(2)
    steady(lan, h, ev0)
    after = {n.name: (rss_kb(n.proc.pid), len(n.stderr.read_text().splitlines())) for n in (fw1, fw2)}
    sts = {n.name: state(n) for n in (fw1, fw2)}
    with capsys.disabled():
        print(f"\nflood: {r['sent']} adverts in {took:.1f} s; RSS/log lines before {before} after {after}; "
              f"dropped {[sts[k]['counters'] for k in sts]}")
    assert r["sent"] >= FLOOD * 0.95
    for n in (fw1, fw2):
        (rss0, lines0), (rss1, lines1) = before[n.name], after[n.name]
        c = sts[n.name]["counters"]
        dropped = sum(v for k, v in c.items() if k.startswith("bad_"))
        assert dropped >= FLOOD // 4, c                   # most got to the speaker (some die in full socket buffers)
        assert c.get("bad_badauth", 0) >= 100 and c.get("bad_badsrc", 0) >= 1000, c
        assert rss1 - rss0 < 2048, (n.name, rss0, rss1)   # KB: flat (the review saw +9 MB for 200k)
        assert lines1 - lines0 <= 15, (n.name, lines1 - lines0)   # the token bucket: 10 a minute and a summary
        assert len(sts[n.name]["bad"]["recent_sources"]) <= 16


if __name__ == "__main__":
    _attack(json.loads(sys.argv[1]))
