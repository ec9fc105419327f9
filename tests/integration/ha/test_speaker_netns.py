"""The CARP speaker in network namespaces: failover timing, leave advert, simultaneous start, interop with real ucarp."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.carp_lan import Lan
from tests.support.wait import poll
from tests.support.env import need_tool

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timing]

SKEW_B = 100
DEAD_B = 3 + SKEW_B / 256          # the protocol's takeover time for the backup (advbase 1, deadratio 3)


@pytest.fixture
def lan_factory(tmp_path):
    need_tool("ip", "ucarp")
    made: list[Lan] = []

    def make(n: int) -> Lan:
        d = tmp_path / f"lan{len(made)}"
        d.mkdir()
        lan = Lan(n, d)
        made.append(lan)
        return lan.up()

    yield make
    for lan in made:
        lan.close()


def state(path: Path, proc) -> dict:
    """Fresh state-file contents: SIGUSR1 makes the speaker rewrite it."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    proc.send_signal(signal.SIGUSR1)
    poll(lambda: path.exists() and path.stat().st_mtime_ns != before, 5)
    return json.loads(path.read_text())


def wait_master(obs, lan: Lan, node, timeout=8.0) -> None:
    """Until `node` holds the VIP and adverts come from it alone."""
    assert poll(lambda: lan.holders() == [node.name], timeout), (lan.holders(), diag(lan))
    assert obs.wait_for(lambda a: a["src"] == node.ip, time.monotonic(), 3), diag(lan)


def diag(lan: Lan) -> str:
    return "\n".join(f"--- {n.name} events {n.events()}\n{n.stderr.read_text()[-1500:] if n.stderr.exists() else ''}"
                     for n in lan.nodes)


def test_speaker_failover_timing_and_auth(lan_factory):
    lan = lan_factory(3)
    a, b, intruder = lan.nodes
    obs = lan.observe()
    sa = lan.workdir / "a.json"
    lan.start("speaker", a, advskew=0, extra=[f"--state-file={sa}"])
    lan.start("speaker", b, advskew=SKEW_B)
    # a node with the right vhid but another pass: its adverts must be dropped and counted, not obeyed
    bad = lan.workdir / "badpass"
    bad.write_text("other-pass\n")
    bad.chmod(0o600)
    argv = lan.engine_argv("speaker", intruder, advskew=0)
    argv = [x if not x.startswith("--passfile=") else f"--passfile={bad}" for x in argv]
    argv = [x if not x.startswith("--addr=") else f"--addr={lan.vip(101)}" for x in argv]
    intruder.proc = subprocess.Popen(["ip", "netns", "exec", intruder.netns, *argv],
                                                   stderr=open(intruder.stderr, "ab"), cwd=lan.workdir)
    lan.procs.append(intruder.proc)
    wait_master(obs, lan, a)
    time.sleep(3)
    st = state(sa, a.proc)
    assert st["state"] == "MASTER" and st["counters"].get("bad_badauth", 0) >= 2, st
    assert b"other-pass" not in a.stderr.read_bytes() and b"s3cret" not in a.stderr.read_bytes()
    # advert regularity from the master
    ts = [x["t"] for x in obs.adverts if x["src"] == a.ip][-4:]
    gaps = [y - x for x, y in zip(ts, ts[1:])]
    assert all(abs(g - 1.0) < 0.15 for g in gaps), gaps
    last = max(x["t"] for x in obs.adverts if x["src"] == a.ip)
    t_kill = time.monotonic()
    os.kill(a.proc.pid, signal.SIGKILL)
    first_b = obs.wait_for(lambda x: x["src"] == b.ip, t_kill, 8)
    assert first_b, diag(lan)
    takeover = first_b["t"] - last
    # protocol: 3 x advbase + 100/256 after the last advert; ucarp needs ~1 s more
    assert DEAD_B - 0.05 <= takeover <= DEAD_B + 0.4, takeover
    assert poll(lambda: b.has_vip(lan.vip()), 3)


def test_sigterm_leave_advert_fast_takeover(lan_factory):
    lan = lan_factory(2)
    a, b = lan.nodes
    obs = lan.observe()
    lan.start("speaker", a, advskew=0)
    lan.start("speaker", b, advskew=SKEW_B)
    wait_master(obs, lan, a)
    time.sleep(1.5)
    t_term = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    leave = obs.wait_for(lambda x: x["src"] == a.ip and x["advbase"] == 255 and x["advskew"] == 255, t_term, 5)
    first_b = obs.wait_for(lambda x: x["src"] == b.ip, t_term, 5)
    assert leave and first_b, diag(lan)
    assert first_b["t"] - t_term < 0.5, first_b["t"] - t_term
    assert a.proc.wait(timeout=10) == 0
    assert poll(lambda: lan.holders() == [b.name], 3), (lan.holders(), diag(lan))
    assert "up" in b.events()[-1] and a.events()[-1].startswith("down")   # --shutdown ran the down script


def test_simultaneous_start_one_master(lan_factory):
    lan = lan_factory(3)
    obs = lan.observe()
    for i, n in enumerate(lan.nodes):
        lan.start("speaker", n, advskew=50 * i)
    seen_two = []
    end = time.monotonic() + 6.0
    while time.monotonic() < end:               # bounded sampling of the VIP holders
        h = lan.holders()
        if len(h) > 1:
            seen_two.append(h)
        time.sleep(0.05)
    assert not seen_two, seen_two
    assert lan.holders() == ["n0"], diag(lan)
    srcs = {x["src"] for x in obs.adverts}
    assert srcs == {lan.nodes[0].ip}, srcs     # the others never advertised: no double master at all


def test_ucarp_master_speaker_backup(lan_factory):
    lan = lan_factory(2)
    u, s = lan.nodes
    obs = lan.observe()
    sf = lan.workdir / "s.json"
    lan.start("ucarp", u, advskew=0)
    lan.start("speaker", s, advskew=SKEW_B, extra=[f"--state-file={sf}"])
    wait_master(obs, lan, u, timeout=10)
    time.sleep(3)
    st = state(sf, s.proc)
    assert st["state"] == "BACKUP", (st, diag(lan))
    assert st["counters"]["received"] >= 3 and not any(k.startswith("bad_") for k in st["counters"]), st
    assert {x["src"] for x in obs.adverts} == {u.ip}
    last = max(x["t"] for x in obs.adverts if x["src"] == u.ip)
    t_kill = time.monotonic()
    os.kill(u.proc.pid, signal.SIGKILL)          # ucarp crash (it leaves its VIP behind: the supervisor's job)
    first = obs.wait_for(lambda x: x["src"] == s.ip, t_kill, 8)
    assert first, diag(lan)
    assert DEAD_B - 0.05 <= first["t"] - last <= DEAD_B + 0.4, first["t"] - last
    assert poll(lambda: s.has_vip(lan.vip()), 3)


def test_speaker_preempts_ucarp_and_ucarp_obeys_leave(lan_factory):
    lan = lan_factory(2)
    s, u = lan.nodes
    obs = lan.observe()
    lan.start("ucarp", u, advskew=SKEW_B)
    wait_master(obs, lan, u, timeout=10)         # ucarp alone: master
    t_start = time.monotonic()
    lan.start("speaker", s, advskew=0)           # better and --preempt: must take over on ucarp's first valid advert
    assert obs.wait_for(lambda x: x["src"] == s.ip, t_start, 5), diag(lan)
    assert poll(lambda: lan.holders() == [s.name], 5), (lan.holders(), diag(lan))
    t_quiet = time.monotonic() + 0.5
    time.sleep(3)
    assert not [x for x in obs.since(t_quiet) if x["src"] == u.ip], "ucarp kept advertising: it did not accept ours"
    assert u.events()[-1].startswith("down")
    t_term = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    first = obs.wait_for(lambda x: x["src"] == u.ip, t_term, 5)
    assert first, diag(lan)
    # ucarp reacts to the leave advert when libpcap hands the packet over (up to its 1 s buffer timeout),
    # well before its 3.4 s dead timer
    assert first["t"] - t_term < 1.6, first["t"] - t_term
    assert poll(lambda: lan.holders() == [u.name], 3), (lan.holders(), diag(lan))


def test_link_down_means_backup_not_exit(lan_factory):
    lan = lan_factory(2)
    a, b = lan.nodes
    obs = lan.observe()
    lan.start("speaker", a, advskew=0)
    lan.start("speaker", b, advskew=SKEW_B)
    wait_master(obs, lan, a)
    t_down = time.monotonic()
    subprocess.run(["ip", "-n", a.netns, "link", "set", "eth0", "down"], check=True, timeout=10)
    # a drops the VIP (down script) and keeps running; b takes over after the dead interval
    assert poll(lambda: not a.has_vip(lan.vip()), 3), diag(lan)
    assert obs.wait_for(lambda x: x["src"] == b.ip, t_down, 6), diag(lan)
    assert a.proc.poll() is None, "the speaker exited on link down"
    assert poll(lambda: lan.holders() == [b.name], 3), (lan.holders(), diag(lan))
    subprocess.run(["ip", "-n", a.netns, "link", "set", "eth0", "up"], check=True, timeout=10)
    # back up: it listens, hears b's worse adverts and preempts
    assert poll(lambda: lan.holders() == [a.name], 8), (lan.holders(), diag(lan))
