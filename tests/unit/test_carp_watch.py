"""The CARP watcher's judgement (appliance.ha.watch): which adverts no configured node sends, bounded counters,
rate-limited logging, the sync-link answer that must postdate the advert, and the pcap reader (FreeBSD path)."""
from __future__ import annotations

import io
import json
import struct
import time
from pathlib import Path

from appliance.core.loader import load
from appliance.ha import protocol as cp
from appliance.ha import watch
from tests.support.env import EXAMPLES

CFG = load(EXAMPLES / "appliance.yaml")
PW = CFG.cluster.password.get_secret_value().encode()
VIP = str(CFG.cluster.vip.ip)
FW1, FW2 = str(CFG.nodes["fw1"].lan.ip), str(CFG.nodes["fw2"].lan.ip)


def pkt(src: str, advbase: int = 1, advskew: int = 0, password: bytes = PW, vhid: int = 1, counter: int = 7) -> bytes:
    return cp.build_packet(password, vhid, VIP, src, advbase, advskew, counter)


def verdict(p: bytes, peer_role=None) -> tuple[str, str | None]:
    return watch.judge(watch.Expect.from_config(CFG), cp.parse_ip(p), peer_role)


def test_judge() -> None:
    assert verdict(pkt(FW1, advskew=0)) == ("ok", None)
    assert verdict(pkt(FW2, advskew=100)) == ("ok", None)
    assert verdict(pkt(FW2, advskew=200)) == ("ok", None)  # demoted: a worse advskew is fine
    assert verdict(pkt(FW1, 255, 255)) == ("ok", None)      # a leave advert from a node
    assert verdict(pkt("192.168.1.66")) == ("forged", "192.168.1.66 is not a node's LAN address")
    assert verdict(pkt(FW2, advskew=0))[0] == "forged" and "below fw2's configured 100" in verdict(pkt(FW2, advskew=0))[1]
    assert verdict(pkt(FW1, advbase=0))[1] == "advbase 0: fw1 sends advbase 1"
    assert verdict(pkt("192.168.1.66", password=b"wrong")) == ("bad", "badauth")  # CARP drops it: not forged
    assert verdict(pkt("192.168.1.66", vhid=77)) == ("ignored", None)
    assert verdict(pkt(FW2, advskew=100), lambda n, after: ("BACKUP", time.time())) == ("suspect", "fw2")
    assert verdict(pkt(FW2, advskew=100), lambda n, after: ("MASTER", time.time())) == ("ok", None)


def test_next_pass_is_authentic_too() -> None:
    exp = watch.Expect.from_config(CFG)
    exp.passes.append(b"next-pass")
    assert watch.judge(exp, cp.parse_ip(pkt("192.168.1.66", password=b"next-pass")), None)[0] == "forged"


def test_tally_is_bounded_and_logs_at_a_bounded_rate(tmp_path: Path) -> None:
    t = watch.Tally(tmp_path / watch.STATE_NAME)
    lines: list[str] = []
    exp = watch.Expect.from_config(CFG)
    for i in range(2000):
        rx = cp.parse_ip(pkt(f"10.9.{i // 250}.{i % 250 + 1}"))
        t.record(*watch.judge(exp, rx), rx, lines.append)
    assert t.forged == 2000 and len(t.sources) == watch.MAX_SOURCES + 1 and t.sources["other"] == 2000 - watch.MAX_SOURCES
    assert len(lines) <= watch.MAX_SOURCES + 1 and len(t.logged) <= 4 * watch.MAX_SOURCES + 1
    t.flush(force=True)
    d = json.loads(t.path.read_text())
    assert d["forged"] == 2000 and d["last_forged"]["src"] == "10.9.7.250"
    assert 'appliance_carp_adverts_total{verdict="forged"} 2000' in (tmp_path / watch.PROM_NAME).read_text()
    assert watch.summary(d).startswith("forged adverts: 2000, last from 10.9.7.250 at ")


def test_a_backup_answer_must_postdate_the_advert(tmp_path: Path) -> None:
    answers = {"fw2": ("BACKUP", time.time() - 5)}
    role = lambda n, after: answers.get(n)  # noqa: E731
    packets = iter([pkt(FW2, advskew=100), b"", b""])
    t = watch.Tally(tmp_path / watch.STATE_NAME)
    pending_seen = []

    def ticks():
        for p in packets:
            yield p
            pending_seen.append(1)
            if len(pending_seen) == 2:
                answers["fw2"] = ("BACKUP", time.time() + 1)  # asked again after the advert: still BACKUP
    watch.watch(watch.Expect.from_config(CFG), ticks(), t, lambda m: None, role)
    assert t.forged == 1 and "says over the sync link it is BACKUP" in t.last["why"]
    # a node that had just become MASTER: its next answer says so, and the advert is fine
    answers = {"fw2": ("BACKUP", time.time() - 5)}
    t2 = watch.Tally(tmp_path / "b.json")
    seq = iter([pkt(FW2, advskew=100), b""])

    def ticks2():
        for p in seq:
            yield p
            answers["fw2"] = ("MASTER", time.time() + 1)
    watch.watch(watch.Expect.from_config(CFG), ticks2(), t2, lambda m: None, lambda n, after: answers.get(n))
    assert t2.forged == 0 and t2.ok == 1


def test_pcap_stream() -> None:
    frame = b"\x01\x00\x5e\x00\x00\x12" + b"\x02" * 6 + b"\x08\x00" + pkt("192.168.1.66")
    vlan = b"\x01" * 12 + b"\x81\x00" + b"\x00" * 20
    head = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 128, 1)
    body = b"".join(struct.pack("<IIII", 0, 0, len(f), len(f)) + f for f in (vlan, frame))
    got = list(watch.pcap_packets(io.BytesIO(head + body), lambda: False))
    assert got == [pkt("192.168.1.66")]
