"""The speaker's state machine on a fake clock, and its command line (bad input exits 2, the pass never in the log)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.ha import protocol as cp
from appliance.ha.speaker import BACKUP, MASTER, Core, main, parser, read_pass


def core(**kw) -> Core:
    d = dict(vhid=1, advbase=1, advskew=0, srcip="10.0.0.1", deadratio=3, preempt=True)
    d.update(kw)
    return Core(**d)


def adv(advbase=1, advskew=0) -> cp.Advert:
    return cp.Advert(vhid=1, advbase=advbase, advskew=advskew)


def kinds(actions):
    return [a[0] for a in actions]


def test_start_waits_one_dead_interval_then_claims_master():
    c = core(advskew=64)
    assert kinds(c.start(100.0)) == ["down"] and c.state == BACKUP
    assert c.next_deadline() == pytest.approx(103.25)
    assert c.on_timer(103.2) == []
    acts = c.on_timer(103.25)
    assert c.state == MASTER and kinds(acts) == ["send", "up", "garp"]
    assert c.next_deadline() == pytest.approx(103.25 + 1.25)


def test_master_adverts_are_drift_free_and_never_burst():
    c = core()
    c.start(0.0)
    c.on_timer(3.0)
    sent = []
    t = 3.0
    for _ in range(5):
        t = c.next_deadline() + 0.003            # the loop wakes a little late each time
        if kinds(c.on_timer(t)) == ["send"]:
            sent.append(t)
    assert [round(x - 3.0, 3) for x in sent] == [1.003, 2.003, 3.003, 4.003, 5.003]
    t = c.next_deadline() + 10                   # stopped for 10 s: one advert, not ten
    assert kinds(c.on_timer(t)) == ["send"] and c.on_timer(t) == []
    assert c.next_deadline() == pytest.approx(t + 1)


def test_backup_hearing_better_master_resets_dead_timer():
    c = core(advskew=100)
    c.start(0.0)
    assert c.on_advert(2.0, "10.0.0.2", adv(advskew=0)) == []
    assert c.state == BACKUP and c.next_deadline() == pytest.approx(2.0 + 3 + 100 / 256)
    assert c.on_timer(5.2) == []
    assert c.on_timer(5.4)[0] == ("send",)


def test_preempt_only_when_enabled():
    c = core(advskew=0, preempt=True)
    c.start(0.0)
    assert kinds(c.on_advert(1.0, "10.0.0.2", adv(advskew=100))) == ["send", "up", "garp"]
    c2 = core(advskew=0, preempt=False)
    c2.start(0.0)
    assert c2.on_advert(1.0, "10.0.0.2", adv(advskew=100)) == [] and c2.state == BACKUP


def test_leave_advert_means_take_over_now_even_without_preempt():
    c = core(advskew=100, preempt=False)
    c.start(0.0)
    c.on_advert(1.0, "10.0.0.2", adv(advskew=0))
    acts = c.on_advert(1.5, "10.0.0.2", adv(255, 255))
    assert c.state == MASTER and kinds(acts) == ["send", "up", "garp"]
    assert "leave" in c.last_reason


def test_master_steps_down_silently_for_better_master():
    c = core(advskew=100)
    c.start(0.0)
    c.on_timer(4.0)
    acts = c.on_advert(5.0, "10.0.0.2", adv(advskew=0))
    assert c.state == BACKUP and acts == [("down", c.last_reason)]   # no advert, no ARP


def test_master_answers_lesser_master_rate_limited():
    c = core(advskew=0)
    c.start(0.0)
    c.on_timer(3.0)
    assert kinds(c.on_advert(3.5, "10.0.0.2", adv(advskew=100))) == ["send", "garp"]
    assert c.on_advert(3.6, "10.0.0.2", adv(advskew=100)) == []
    assert c.on_advert(3.7, "10.0.0.2", adv(255, 255)) == []           # a leaving node is ignored
    assert c.state == MASTER


def test_equal_interval_tie_break_like_ucarp():
    c = core(srcip="10.0.0.3")
    c.start(0.0)
    c.on_timer(3.0)
    c.on_advert(3.5, "10.0.0.2", adv())
    assert c.state == BACKUP                      # .2 is "less" in ucarp's byte order: it wins
    d = core(srcip="10.0.0.2")
    d.start(0.0)
    d.on_timer(3.0)
    d.on_advert(3.5, "10.0.0.3", adv())
    assert d.state == MASTER


def test_shutdown_and_link_and_demote():
    c = core()
    c.start(0.0)
    c.on_timer(3.0)
    assert c.leave(4.0) == [("leave",)]
    c = core()
    c.start(0.0)
    c.on_timer(3.0)
    assert kinds(c.link_down(4.0)) == ["down"] and c.next_deadline() is None
    assert c.on_advert(4.5, "10.0.0.2", adv(255, 255)) == []          # not participating while down
    c.link_up(10.0)
    assert c.next_deadline() == pytest.approx(13.0)
    c.on_timer(13.0)
    acts = c.demote(14.0)
    assert kinds(acts) == ["leave", "down"] and c.state == BACKUP and c.next_deadline() == pytest.approx(17.0)


def test_slow_master_treated_as_dead():
    c = core(advbase=1, deadratio=3, preempt=False)
    c.start(0.0)
    c.on_advert(1.0, "10.0.0.2", adv(advbase=5))
    assert c.state == MASTER


# --------------------------------------------------------------------------- command line

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.ha.speaker", *args], capture_output=True, text=True, timeout=30)


BASE = ["--interface=lo", "--srcip=127.0.0.1", "--vhid=1", "--addr=127.0.0.50"]


@pytest.mark.parametrize("extra,needle", [
    (["--vhid=0"], "--vhid must be 1-255"),
    (["--advskew=255"], "--advskew must be 0-254"),
    (["--srcip=10.0.0.300"], "not an IPv4 address"),
    (["--pass=" + "x" * 20], "at most 19"),
    (["--pass=a", "--neutral"], "--neutral is not supported"),
    (["--pass=a", "--upscript=/nonexistent/up"], "not an executable file"),
    ([], "a pass is required"),
])
def test_bad_arguments_exit_2(extra, needle):
    r = run_cli(*BASE, *extra)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr


def test_passfile_rules(tmp_path):
    pf = tmp_path / "pass"
    pf.write_bytes(b"hunter2\r\nignored\n")
    assert read_pass(parser().parse_args([*BASE, f"--passfile={pf}"])) == b"hunter2"
    pf.write_bytes(b"y" * 25 + b"\n")
    r = run_cli(*BASE, f"--passfile={pf}")
    assert r.returncode == 2 and str(pf) in r.stderr and "at most 19" in r.stderr
    assert "y" * 25 not in r.stderr                       # the pass itself is never echoed
    r = run_cli(*BASE, f"--passfile={tmp_path / 'missing'}")
    assert r.returncode == 2 and "missing" in r.stderr
    with pytest.raises(ValueError):
        read_pass(parser().parse_args([*BASE, f"--passfile={pf}", "--pass=x"]))


def test_missing_interface_exits_1(monkeypatch):
    import os
    if os.geteuid() != 0:
        pytest.skip("needs root (raw sockets)")
    assert main([*BASE[1:], "--interface=nosuchif0", "--pass=a"]) == 1
