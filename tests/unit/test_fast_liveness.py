"""The fast liveness layer's pure parts: heartbeat wire format and replay check, the policy, the engine's verbs."""
from __future__ import annotations

import socket

import pytest

from appliance.ha import engine_ctl
from appliance.ha import heartbeat as hb
from appliance.ha.fastpolicy import Own, PeerView, Policy
from appliance.ha.fsm import BACKUP, MASTER, Core

K = [hb.key(b"s3cret")]
SOURCES = {("fw1", "sync"): "10.9.0.1", ("fw1", "lan"): "10.0.0.1"}


def beat(seq: int, path: str = "sync", epoch: int = 5, echo: int = 7, ack: int = 1, **kw) -> hb.Beat:
    return hb.Beat(node="fw1", path=path, epoch=epoch, seq=seq, echo=echo, ack=ack, vhids={1: ("MASTER", 0)}, **kw)


def replay(epoch: int = 7) -> hb.Replay:
    """A receiver that sent its heartbeat seq 1 at t=100."""
    r = hb.Replay(epoch=epoch, sources=SOURCES, max_age=0.6)
    r.note_sent(1, 100.0)
    return r


def test_round_trip_and_every_field() -> None:
    b = beat(3, proxy_ok=False, leaving=True, kind=hb.TAKEOVER, cause="proxy exited", ack=2**40, witness="lost")
    got = hb.unpack(hb.pack(b, K), K)
    assert got == b


def test_forged_truncated_and_foreign_datagrams_are_refused() -> None:
    data = hb.pack(beat(1), K)
    with pytest.raises(hb.BadHeartbeat) as e:
        hb.unpack(data, [hb.key(b"other pass")])
    assert e.value.reason == "mac"
    flipped = bytearray(data)
    flipped[30] ^= 1
    with pytest.raises(hb.BadHeartbeat, match="mac"):
        hb.unpack(bytes(flipped), K)
    for bad in (b"", data[:20], b"XXXX" + data[4:], data + b"x" * 2000):
        with pytest.raises(hb.BadHeartbeat) as e:
            hb.unpack(bad, K)
        assert e.value.reason in ("malformed", "mac")


def test_next_pass_is_accepted_during_a_rotation() -> None:
    nxt = [hb.key(b"next pass")]
    assert hb.unpack(hb.pack(beat(1), nxt), K + nxt).seq == 1


def test_replay_check_takes_each_heartbeat_once_per_path() -> None:
    r = replay()
    assert r.admit(beat(1), "10.9.0.1", 100.1).seq == 1
    with pytest.raises(hb.BadHeartbeat, match="replayed"):
        r.admit(beat(1), "10.9.0.1", 100.1)                       # the same again
    r.admit(beat(3), "10.9.0.1", 100.1)
    with pytest.raises(hb.BadHeartbeat, match="replayed"):
        r.admit(beat(2), "10.9.0.1", 100.1)                       # an older one, late
    with pytest.raises(hb.BadHeartbeat, match="unknown_source"):
        r.admit(beat(4), "10.9.0.66", 100.1)                      # right MAC, wrong sender address
    with pytest.raises(hb.BadHeartbeat, match="unknown_source"):
        r.admit(beat(4, path="lan"), "10.9.0.1", 100.1)           # a sync beat replayed onto the LAN path
    with pytest.raises(hb.BadHeartbeat, match="unknown_source"):
        r.admit(beat(4), "10.9.0.1", 100.1, path="lan")           # a sync beat arriving on the LAN socket
    assert r.admit(beat(4), "10.9.0.1", 100.1, path="sync").seq == 4   # and it was not used up by that
    assert r.admit(beat(2, path="lan"), "10.0.0.1", 100.1).seq == 2  # each path counts on its own


def test_a_held_back_heartbeat_is_refused_once_its_ack_is_old() -> None:
    """A LAN host that captures the master's heartbeats and releases them later (the master dead meanwhile) must
    not keep the backup holding: each acks one of the backup's heartbeats from when it was captured."""
    r = replay()
    r.note_sent(2, 100.1)
    assert r.admit(beat(10, ack=2), "10.9.0.1", 100.3).seq == 10
    with pytest.raises(hb.BadHeartbeat, match="stale"):
        r.admit(beat(11, ack=2), "10.9.0.1", 100.8)               # released 0.7 s after the ack'd one was sent
    with pytest.raises(hb.BadHeartbeat, match="stale"):
        r.admit(beat(12, ack=999), "10.9.0.1", 100.3)             # acks nothing we sent


def test_a_restarted_receiver_takes_nothing_recorded_before_it_started() -> None:
    before = beat(50, echo=7)                              # captured while the receiver ran with epoch 7
    r = replay(epoch=8)                                    # the receiver restarted: epoch 8
    with pytest.raises(hb.BadHeartbeat, match="stale"):
        r.admit(before, "10.9.0.1", 100.1)
    assert r.echo_for("fw1") == 5 and r.ack_for("fw1") == 50   # but it now echoes the sender's epoch and seq
    assert r.admit(beat(51, echo=8), "10.9.0.1", 100.1).seq == 51
    with pytest.raises(hb.BadHeartbeat, match="replayed"):
        r.admit(beat(49, echo=8), "10.9.0.1", 100.1)


def test_a_restarted_sender_is_taken_at_its_new_epoch_and_its_old_one_refused() -> None:
    r = replay()
    r.admit(beat(900, epoch=5), "10.9.0.1", 100.1)
    assert r.admit(beat(1, epoch=6), "10.9.0.1", 100.1).seq == 1
    with pytest.raises(hb.BadHeartbeat, match="replayed"):
        r.admit(beat(901, epoch=5), "10.9.0.1", 100.1)


# ------------------------------------------------------------------ policy

def own(role: str, **kw) -> Own:
    d = dict(name="fw2", lan_ip="10.0.0.2", roles={1: role}, advskew={1: 100}, proxy_ok=True, link_ok=True)
    d.update(kw)
    return Own(**d)


def master_peer(heard_at: float, **kw) -> PeerView:
    p = PeerView("fw1", "10.0.0.1", heard={"sync": heard_at, "lan": heard_at})
    p.beat = hb.Beat(node="fw1", path="sync", epoch=1, seq=1, echo=1, vhids={1: ("MASTER", 0)}, **kw)
    return p


def test_backup_holds_while_the_master_is_heard_on_one_path() -> None:
    pol = Policy(0.1, 3)
    p = master_peer(10.0)
    p.heard.pop("lan")                                     # the LAN path is gone: the sync link alone carries it
    assert pol.tick(own(BACKUP), [p], 10.25, "") == [("hold", 1)]


def test_backup_takes_over_once_when_the_master_is_silent_on_both_paths() -> None:
    pol = Policy(0.1, 3)
    p = master_peer(10.0)
    assert pol.tick(own(BACKUP), [p], 10.29, "") == [("hold", 1)]
    acts = pol.tick(own(BACKUP), [p], 10.31, "")
    assert acts[0][:2] == ("master", 1) and "silent on both paths" in acts[0][2]
    assert pol.tick(own(BACKUP), [p], 10.35, "") == []     # asked once, not every tick
    # CARP undid it (the master still advertises): not forced again while the master stays silent here
    assert pol.tick(own(BACKUP), [p], 11.5, "") == []
    p.heard["sync"] = 11.6                                  # heard again: the next silence may be acted on
    assert pol.tick(own(BACKUP), [p], 11.61, "") == [("hold", 1)]
    assert pol.tick(own(BACKUP), [p], 12.0, "")[0][0] == "master"


def test_no_takeover_from_a_peer_never_heard_or_by_an_unhealthy_backup() -> None:
    pol = Policy(0.1, 3)
    quiet = PeerView("fw1", "10.0.0.1")
    assert pol.tick(own(BACKUP), [quiet], 99.0, "") == []  # an older node that sends no heartbeats: CARP alone
    assert pol.tick(own(BACKUP, proxy_ok=False), [master_peer(10.0)], 11.0, "") == []
    assert pol.tick(own(BACKUP, demoted=True), [master_peer(10.0)], 11.0, "") == []


def test_only_the_best_backup_takes_over() -> None:
    pol = Policy(0.1, 3)
    better = PeerView("fw3", "10.0.0.3", heard={"sync": 10.9})
    better.beat = hb.Beat(node="fw3", path="sync", epoch=1, seq=1, echo=1, vhids={1: ("BACKUP", 50)})
    assert pol.tick(own(BACKUP), [master_peer(10.0), better], 11.0, "") == []
    better.beat.proxy_ok = False                            # it cannot serve: we are next
    assert pol.tick(own(BACKUP), [master_peer(10.0), better], 11.0, "")[0][0] == "master"


def test_a_hand_over_or_a_failing_master_is_acted_on_at_once() -> None:
    pol = Policy(0.1, 3)
    p = master_peer(10.0, proxy_ok=False)
    acts = pol.tick(own(BACKUP), [p], 10.05, "")
    assert acts[0][:2] == ("master", 1) and "proxy is down or hung" in acts[0][2]
    pol = Policy(0.1, 3)
    p = master_peer(10.0)
    p.beat.vhids = {1: ("BACKUP", 240)}                     # it stepped down already
    p.takeover = hb.Beat(node="fw1", path="sync", epoch=1, seq=2, echo=1, kind=hb.TAKEOVER,
                         vhids={1: ("MASTER", 0)}, cause="LAN link down")
    p.takeover_at = 10.0
    acts = pol.tick(own(BACKUP), [p], 10.05, "")
    assert acts[0][:2] == ("master", 1) and "handed over: LAN link down" in acts[0][2]


def test_the_lan_witness_tells_which_node_is_cut_off() -> None:
    pol = Policy(0.1, 3)
    p = master_peer(10.0)
    p.heard["lan"] = 9.0                                    # the master is heard on the sync link only
    p.beat.witness = "ok"
    assert pol.tick(own(BACKUP, witness="lost"), [p], 10.05, "") == [("hold", 1)]   # we are the one cut off
    assert pol.tick(own(BACKUP, witness="ok"), [p], 10.05, "") == [("hold", 1)]     # a path between us: nothing
    assert pol.tick(own(BACKUP), [p], 10.05, "") == [("hold", 1)]                   # no witness: nothing moves
    p.beat.witness = "lost"
    acts = pol.tick(own(BACKUP, witness="ok"), [p], 10.05, "")
    assert acts[0][:2] == ("master", 1) and "cut off from the LAN" in acts[0][2]


def test_master_hands_over_once_per_failure_even_if_the_engine_stopped_first() -> None:
    pol = Policy(0.1, 3)
    assert pol.tick(own(MASTER), [], 10.0, "") == []
    assert pol.tick(own(MASTER), [], 10.1, "proxy exited") == [("handover", 1, "proxy exited")]
    assert pol.tick(own(MASTER), [], 10.2, "proxy exited") == []
    pol = Policy(0.1, 3)
    pol.tick(own(MASTER), [], 10.0, "")
    # the supervisor stopped the engine on link down before this tick: the role reads "" already
    assert pol.tick(own(""), [], 10.1, "LAN link down") == [("handover", 1, "LAN link down")]


# ------------------------------------------------------------------ the engine's side

def core() -> Core:
    c = Core(vhid=1, advbase=1, advskew=100, srcip="10.0.0.2", deadratio=2, preempt=True)
    c.start(0.0)
    return c


def test_engine_verbs() -> None:
    c = core()
    assert engine_ctl.command(c, b"hold", 2.0) == [] and c.md_deadline == pytest.approx(2.0 + 2 + 100 / 256)
    acts = engine_ctl.command(c, b"master fw1 silent", 2.1)
    assert c.state == MASTER and [a[0] for a in acts] == ["send", "up", "garp"]
    assert "fast liveness: fw1 silent" in c.last_reason
    acts = engine_ctl.command(c, b"leave proxy hung", 2.2)
    assert c.state == BACKUP and acts[0] == ("leave",) and c.md_deadline >= 2.2 + 3
    assert engine_ctl.command(c, b"rm -rf /", 2.3) is None
    c.link_down(3.0)
    assert engine_ctl.command(c, b"master x", 3.1) == [] and c.state == BACKUP   # not taking part: no


def test_start_master_advertises_at_once_without_the_up_script() -> None:
    c = Core(vhid=1, advbase=1, advskew=0, srcip="10.0.0.1")
    assert [a[0] for a in c.start_master(5.0)] == ["send", "garp"] and c.state == MASTER


def test_control_socket_is_private(tmp_path) -> None:
    path = str(tmp_path / "carp-1.ctl")
    s = engine_ctl.open_control(path)
    try:
        assert (tmp_path / "carp-1.ctl").stat().st_mode & 0o777 == 0o600
        assert engine_ctl.Sender().send(tmp_path / "carp-1.ctl", "hold")
        assert s.recv(64) == b"hold"
        assert not engine_ctl.Sender().send(tmp_path / "gone.ctl", "hold")
        with pytest.raises(ValueError):
            engine_ctl.Sender().send(tmp_path / "carp-1.ctl", "reboot")
    finally:
        s.close()
    assert isinstance(s, socket.socket)


def test_a_reload_restarts_the_layer_only_when_its_settings_changed(monkeypatch) -> None:
    from types import SimpleNamespace

    from appliance.core.loader import load
    from appliance.ha import fastlink
    from tests.support.env import EXAMPLES

    cfg = load(EXAMPLES / "appliance.yaml")
    sup = SimpleNamespace(cfg=cfg, target=("127.0.0.1", 3128), fast=None)
    calls = []
    monkeypatch.setattr(fastlink, "stop", lambda s: calls.append("stop"))
    monkeypatch.setattr(fastlink, "start", lambda s: calls.append("start") or "new layer")
    before = fastlink.settings(sup)
    fastlink.restart_if_changed(sup, before)
    assert calls == []
    sup.cfg = cfg.model_copy(update={"ha": cfg.ha.model_copy(update={"fast_misses": 5})})
    fastlink.restart_if_changed(sup, before)
    assert calls == ["stop", "start"] and sup.fast == "new layer"


def test_a_master_that_hears_another_master_announces_itself_once_a_second() -> None:
    pol = Policy(0.1, 3)
    other = master_peer(10.0)                               # e.g. the backup that took over while we were cut off
    assert pol.tick(own(MASTER), [other], 10.05, "") == [("announce", 1)]
    assert pol.tick(own(MASTER), [other], 10.5, "") == []
    other.heard = {"sync": 11.1}
    assert pol.tick(own(MASTER), [other], 11.1, "") == [("announce", 1)]
    c = core()
    engine_ctl.command(c, b"master x", 1.0)
    assert engine_ctl.command(c, b"announce", 1.1) == [("send",), ("garp",)]


def test_a_master_announces_again_when_a_rival_master_comes_back_on_the_lan() -> None:
    """fw1 was cut off from the LAN (carrier up) and fw2 took over; the cut ends and fw2 steps down at fw1's first
    advert: the clients' ARP entries still name fw2, so fw1 announces at once, not a second later."""
    pol = Policy(0.1, 3)
    other = master_peer(10.0)
    other.heard = {"sync": 10.0}                            # fw2's LAN beats do not reach us
    assert pol.tick(own(MASTER), [other], 10.05, "") == [("announce", 1)]
    other.beat.vhids = {1: ("BACKUP", 100)}                 # it stepped down
    other.heard = {"sync": 10.3, "lan": 10.3}               # and the LAN is back
    assert pol.tick(own(MASTER), [other], 10.35, "") == [("announce", 1)]
    assert pol.tick(own(MASTER), [other], 10.45, "") == []


def test_a_missed_check_is_hung_at_once_only_when_the_proxy_used_no_cpu(tmp_path, monkeypatch) -> None:
    import os

    from appliance.core.paths import Paths
    from appliance.ha import proxywatch
    from appliance.ha.proxywatch import ProxyWatch, cpu_ticks

    assert cpu_ticks(os.getpid()) is not None and cpu_ticks(None) is None
    ticks = iter(range(1000, 2000, 7))                      # busy: the CPU ticks move between samples
    monkeypatch.setattr(proxywatch, "cpu_ticks", lambda pid: next(ticks))
    w = ProxyWatch(Paths(tmp_path), ("127.0.0.1", 1), interval=0.1, timeout=0.35)
    w.pid, w.answered, w.last_ok = 4242, True, 100.0
    for t in (100.1, 100.2, 100.3, 100.4):
        assert w.failure(t) == ""
    assert w.failure(100.5) == ""                           # a missed check, but busy (a big reload, GC)
    assert "busy" in w.failure(101.5)                       # three times as long: hung all the same
    monkeypatch.setattr(proxywatch, "cpu_ticks", lambda pid: 5000)   # no CPU used: stopped or deadlocked
    w = ProxyWatch(Paths(tmp_path), ("127.0.0.1", 1), interval=0.1, timeout=0.35)
    w.pid, w.answered, w.last_ok = 4242, True, 100.0
    for t in (100.1, 100.2, 100.3, 100.4):
        assert w.failure(t) == ""
    assert "no CPU used" in w.failure(100.5)


def test_a_proxy_exit_stays_seen_when_the_proxy_is_reaped_before_the_next_tick(tmp_path) -> None:
    """Seen in make test (test_lab_fast[proxy-kill], 1.15 s by the watchdog instead of at once): the pidfd said the
    proxy exited, but before the tick its parent had reaped it, so the pid file named no live process and refresh()
    forgot the exit. systemd reaps a killed proxy at once, so on an appliance this order is likely."""
    import select
    import subprocess

    from appliance.core.paths import Paths
    from appliance.ha.proxywatch import ProxyWatch

    paths = Paths(tmp_path)
    paths.run.mkdir(parents=True)
    proxy = subprocess.Popen(["sleep", "60"])
    paths.proxy_pid.write_text(f"{proxy.pid}\n")
    w = ProxyWatch(paths, ("127.0.0.1", 1), interval=0.1, timeout=0.35)
    w.last_ok = 0.0                                         # this test's clock: the last answer long before 100.0
    w.refresh()
    assert w.pid == proxy.pid and w.failure(100.0) == ""
    proxy.kill()
    proxy.wait()                                            # reaped: the pid file now names no live process
    assert select.select([w], [], [], 5)[0] == [w]          # what the liveness loop waits on
    w.on_exit()
    w.refresh()                                             # the next tick
    assert w.failure(100.1) == "proxy exited"
    w.refresh()
    assert w.failure(100.2) == "proxy exited"               # and it stays so until another proxy answers
    other = subprocess.Popen(["sleep", "60"])
    try:
        paths.proxy_pid.write_text(f"{other.pid}\n")
        w.refresh()
        assert w.pid == other.pid and w.failure(100.3) == "proxy exited"   # restarted, not answering yet
        w.last_ok = 100.4
        assert w.failure(100.5) == ""
    finally:
        other.kill()
        other.wait()
        w.close()


def test_an_advert_in_flight_from_the_master_that_handed_over_does_not_bounce_the_vip() -> None:
    """Seen in make test: fw2 forced master on fw1's hand-over, then fw1's periodic advert sent a few ms before its
    leave made fw2 step down, the leave made it preempt again: up, down, up scripts, the VIP gone meanwhile."""
    from appliance.ha import protocol as cp

    c = core()
    engine_ctl.command(c, b"master fw1 handed over", 5.0)
    assert c.on_advert(5.005, "10.0.0.1", cp.Advert(vhid=1, advbase=1, advskew=0)) == [] and c.state == MASTER
    acts = c.on_advert(5.5, "10.0.0.1", cp.Advert(vhid=1, advbase=1, advskew=0))   # it really is still master
    assert c.state == BACKUP and acts[0][0] == "down"
