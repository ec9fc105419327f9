"""The speaker's admission checks (appliance.ha.guard): the fields outside the CARP digest, counters, bad-advert log."""
from __future__ import annotations

import logging

import pytest

from appliance.core.rotation import pass_fingerprint
from appliance.ha import guard
from appliance.ha import peers as peerspec
from appliance.ha import protocol as cp

PW, VHID, VIP = b"s3cret-pass", 1, "10.0.0.100"
FW1, FW2, SELF = "10.0.0.1", "10.0.0.2", "10.0.0.3"


def pkt(src=FW1, advbase=1, advskew=0, counter=1000, pw=PW) -> cp.Received:
    return cp.parse_ip(cp.build_packet(pw, VHID, VIP, src, advbase, advskew, counter))


def make(peers=(peerspec.Peer(FW1, 0), peerspec.Peer(FW2, 100)), **kw) -> guard.Guard:
    d = dict(password=PW, vhid=VHID, vip=VIP, srcip=SELF, advbase=1, peers=peers)
    d.update(kw)
    return guard.Guard(**d)


def reason(g: guard.Guard, rx: cp.Received, now: float = 0.0) -> str:
    with pytest.raises(cp.BadPacket) as e:
        g.admit(rx, now)
    return e.value.reason


def test_a_peers_advert_is_accepted():
    g = make()
    assert g.admit(pkt(), 0.0).counter == 1000
    assert g.admit(pkt(src=FW2, advskew=100, counter=5), 0.1).advskew == 100
    snap = g.snapshot(now=0.1)
    assert {ip: (d["counter"], d["accepted"]) for ip, d in snap.items()} == {FW1: (1000, 1), FW2: (5, 1)}
    assert snap[FW1]["signed"] == snap[FW2]["signed"] == pass_fingerprint(PW)
    assert snap[FW2]["at"] - snap[FW1]["at"] == pytest.approx(0.1, abs=0.01)


def test_the_review_replay_advbase0_from_a_stranger_is_refused():
    # the issue's attack: fw1's advert, advbase/advskew rewritten to 0 (outside the digest), another source
    g = make()
    assert reason(g, pkt(src="10.0.0.77", advbase=0, advskew=0)) == "badsrc"
    assert reason(g, pkt(advbase=0, advskew=0, counter=2000)) == "badadvbase"      # even from fw1's address
    assert g.sources == {}                                                            # nothing learnt


@pytest.mark.parametrize("advbase,advskew,why", [
    (0, 0, "badadvbase"),
    (2, 0, "badadvbase"),             # not the configured advbase
    (254, 0, "badadvbase"),
    (255, 0, "badadvbase"),           # advbase 255 only as the leave pair
    (1, 255, "badadvskew"),           # advskew 255 only as the leave pair
])
def test_timing_fields_outside_the_digest_are_bounded(advbase, advskew, why):
    assert reason(make(), pkt(advbase=advbase, advskew=advskew)) == why


def test_advskew_below_the_peers_configured_one_is_refused():
    g = make()
    assert reason(g, pkt(src=FW2, advskew=0)) == "badadvskew"          # fw2 pretending to be preferred
    assert reason(g, pkt(src=FW2, advskew=99)) == "badadvskew"
    assert g.admit(pkt(src=FW2, advskew=240, counter=7), 0.0)          # demoted: higher is fine


def test_leave_only_from_a_peer_and_only_with_a_fresh_counter():
    g = make()
    assert reason(g, pkt(src="10.0.0.77", advbase=255, advskew=255)) == "badsrc"
    g.admit(pkt(counter=50), 0.0)
    assert reason(g, pkt(advbase=255, advskew=255, counter=50), 1.0) == "replay"   # captured, rewritten to leave
    assert reason(g, pkt(advbase=255, advskew=255, counter=49), 1.0) == "replay"
    assert g.admit(pkt(advbase=255, advskew=255, counter=51), 1.0).is_leave


def test_counters_only_go_forward_per_source():
    g = make()
    g.admit(pkt(counter=10), 0.0)
    g.admit(pkt(counter=11), 1.0)
    assert reason(g, pkt(counter=11), 1.5) == "replay"
    assert reason(g, pkt(counter=3), 1.5) == "replay"
    assert g.admit(pkt(src=FW2, advskew=100, counter=3), 1.5)            # per source: fw2 has its own
    assert reason(g, pkt(counter=5), 1000.0) == "replay"                   # silence alone does not reset it
    g2 = make(resync=5.0)
    g2.admit(pkt(counter=10), 0.0)
    assert reason(g2, pkt(counter=3), 4.0) == "replay"                    # opt-in: only after the silence
    assert g2.admit(pkt(counter=3), 9.5) and g2.counter_resets == 1


def test_digest_is_checked_before_the_counter_moves():
    g = make()
    g.admit(pkt(counter=10), 0.0)
    assert reason(g, pkt(counter=2 ** 63, pw=b"wrong")) == "badauth"      # a forged huge counter...
    assert g.admit(pkt(counter=11), 1.0)                                  # ...does not lock fw1 out
    assert reason(g, pkt(src=SELF)) == "ownsrc"


def test_random_counter_peers_and_open_mode_drop_exact_replays():
    g = make(peers=(peerspec.Peer(FW1, 0, "any"),))
    g.admit(pkt(counter=900), 0.0)
    g.admit(pkt(counter=100), 1.0)                                       # ucarp: random each time
    assert reason(g, pkt(counter=900), 2.0) == "replay"
    open_ = make(peers=())
    open_.admit(pkt(src="10.0.0.9", counter=5), 0.0)
    assert reason(open_, pkt(src="10.0.0.9", counter=5), 0.1) == "replay"
    for i in range(guard.SEEN_MAX + 10):                                   # bounded
        open_._count("10.0.0.9", 10_000 + i, 0.2, "any")
    assert len(open_.seen) == guard.SEEN_MAX


def test_per_source_state_is_bounded_without_peers():
    g = make(peers=(), max_sources=8)
    for i in range(50):
        g.admit(pkt(src=f"10.0.1.{i}", counter=i + 1), float(i))
    assert len(g.sources) == 8 and list(g.sources)[-1] == "10.0.1.49"


def test_restore_keeps_replays_out_after_a_restart():
    g = make()
    assert g.restore({FW1: {"counter": 500}, "10.0.0.77": {"counter": 1}, FW2: "junk"}, 0.0) == 1
    assert reason(g, pkt(counter=500)) == "replay"
    assert g.admit(pkt(counter=501), 0.0)


def test_peer_spec():
    assert peerspec.parse_peer("10.0.0.2") == peerspec.Peer("10.0.0.2", 0, "forward")
    assert peerspec.parse_peer("10.0.0.2/24,advskew=100,counter=any") == peerspec.Peer("10.0.0.2", 100, "any")
    for bad in ("nope", "10.0.0.2,advskew=255", "10.0.0.2,mac=x", "10.0.0.2,counter=up"):
        with pytest.raises(ValueError):
            peerspec.parse_peer(bad)


def test_initial_counter_goes_up_across_restarts():
    a = guard.initial_counter(now_ns=1_700_000_000_000_000_000)
    b = guard.initial_counter(now_ns=1_700_000_000_001_000_000)          # 1 ms later
    assert b - a > (1 << 20) - (1 << 16)                                   # ~a million adverts of room per ms
    assert guard.initial_counter(saved=b + 5, now_ns=0) > b + 5            # clock gone back: the saved one wins


def test_bad_log_is_rate_limited_and_bounded(caplog):
    lg = logging.getLogger("test-badlog")
    bl = guard.BadLog(lg, burst=5, per=60.0)
    with caplog.at_level(logging.WARNING, logger="test-badlog"):
        for i in range(20000):
            bl.record("badauth" if i % 2 else "badsrc", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", i * 1e-4)
        bl.flush(2.0)
        lines = len(caplog.records)
        bl.flush(30.0)                                                     # 28 s later: tokens for one summary
    assert lines == 5
    assert len(caplog.records) == 6 and "19995 more dropped" in caplog.records[-1].getMessage()
    assert bl.counts == {"badauth": 10000, "badsrc": 10000} and bl.suppressed == 19995
    assert len(bl.sources) == guard.MAX_BAD_SOURCES
    snap = bl.snapshot()
    assert snap["by_reason"]["badauth"] == 10000 and len(snap["recent_sources"]) == guard.MAX_BAD_SOURCES


def test_bad_log_keeps_other_vhids_quiet(caplog):
    lg = logging.getLogger("test-badlog2")
    lg.setLevel(logging.INFO)
    bl = guard.BadLog(lg)
    with caplog.at_level(logging.WARNING, logger="test-badlog2"):
        bl.record("badvhid", "10.0.0.5", 0.0)
    assert bl.counts == {"badvhid": 1} and not caplog.records


# --------------------------------------------------------------------------- live peer changes (--peers-file)

def test_set_peers_keeps_the_state_of_peers_that_stay_and_drops_the_rest():
    g = make()
    g.admit(pkt(counter=10), 0.0)
    g.admit(pkt(src=FW2, advskew=100, counter=20), 0.1)
    g.set_peers([peerspec.Peer(FW1, 0), peerspec.Peer(FW2, 110), peerspec.Peer("10.0.0.4", 50)])
    assert reason(g, pkt(counter=10), 1.0) == "replay"                         # fw1's high-water mark kept
    assert reason(g, pkt(src=FW2, advskew=100, counter=21), 1.0) == "badadvskew"   # the new advskew applies
    assert g.admit(pkt(src=FW2, advskew=110, counter=21), 1.0)
    assert g.admit(pkt(src="10.0.0.4", advskew=50, counter=1), 1.0)             # the new peer is heard
    assert g.max_sources == 3
    g.set_peers([peerspec.Peer(FW2, 110)])                                         # fw1 removed
    assert reason(g, pkt(counter=11), 2.0) == "badsrc"
    assert set(g.sources) == {FW2} and g.max_sources == 1
    assert reason(g, pkt(src=FW2, advskew=110, counter=21), 2.0) == "replay"   # still kept


def test_set_peers_drops_the_state_of_a_peer_whose_counter_mode_changed():
    g = make(peers=(peerspec.Peer(FW1, 0, "any"),))
    g.admit(pkt(counter=2 ** 60), 0.0)                                         # ucarp: a random counter
    g.set_peers([peerspec.Peer(FW1, 0)])                                          # now a speaker: forward only
    assert g.sources == {} and g.seen == {}
    assert g.admit(pkt(counter=5), 1.0)                                        # not locked out by the random one
    g.set_peers([])                                                            # open mode: nothing dropped
    assert set(g.sources) == {FW1} and g.max_sources == guard.MAX_SOURCES


def test_parse_peers_skips_comments_and_names_the_bad_line():
    text = "# written by appliance carp\n10.0.0.1,advskew=0\n\n  10.0.0.2,advskew=100  # fw2\n10.0.0.9,counter=any\n"
    assert peerspec.parse_peers(text) == [peerspec.Peer(FW1, 0), peerspec.Peer(FW2, 100), peerspec.Peer("10.0.0.9", 0, "any")]
    with pytest.raises(ValueError, match=r"f:2: .*not an IPv4"):
        peerspec.parse_peers("10.0.0.1\nfw2.example\n", "f")
    with pytest.raises(ValueError, match=r"f:1: .*advskew=300"):
        peerspec.parse_peers("10.0.0.1,advskew=300\n", "f")


def _replace(path, text: str) -> None:
    """As the supervisor writes it: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_peers_file_is_reread_when_it_changes_at_most_once_a_second(tmp_path, caplog):
    path = tmp_path / "carp-1.peers"
    path.write_text("10.0.0.1,advskew=0\n")
    pf = peerspec.PeersFile(str(path), logging.getLogger("t"), every=1.0)
    assert pf.read() == [peerspec.Peer(FW1, 0)]
    assert pf.poll(0.0) is None                                     # unchanged
    _replace(path, "10.0.0.1,advskew=0\n10.0.0.2,advskew=110\n")
    assert pf.poll(0.5) is None                                     # not looked at before a second has passed
    assert pf.poll(1.0) == [peerspec.Peer(FW1, 0), peerspec.Peer(FW2, 110)]
    assert pf.poll(2.0) is None
    caplog.set_level(logging.WARNING)
    _replace(path, "10.0.0.1,advskew=0\nnot-an-address\n")          # bad input: logged once, nothing returned
    assert pf.poll(3.0) is None and pf.poll(4.0) is None
    assert [r.getMessage() for r in caplog.records if "not-an-address" in r.getMessage()] != []
    assert len([r for r in caplog.records if "previous peer list stays" in r.getMessage()]) == 1
    path.unlink()
    assert pf.poll(5.0) is None and pf.poll(6.0) is None
    assert len([r for r in caplog.records if "No such file" in r.getMessage()]) == 1
    path.write_text("10.0.0.2,advskew=120\n")
    assert pf.poll(7.0) == [peerspec.Peer(FW2, 120)]
    path.write_bytes(b"#" * (peerspec.PEERS_FILE_MAX + 1))             # bounded read
    assert pf.poll(8.0) is None


def test_the_speaker_applies_a_peers_file_change_without_a_restart(tmp_path, caplog):
    from appliance.ha.speaker import Speaker, parser
    path = tmp_path / "carp-1.peers"
    path.write_text("10.0.0.1,advskew=0\n10.0.0.2,advskew=100\n")
    args = parser().parse_args(["--interface=lo", f"--srcip={SELF}", "--vhid=1", f"--addr={VIP}", "--pass=x",
                                f"--peers-file={path}", "--peer=10.0.0.5", f"--state-file={tmp_path / 'st.json'}"])
    sp = Speaker(args, PW)
    assert set(sp.guard.peers) == {FW1, FW2, "10.0.0.5"}
    sp.guard.admit(pkt(counter=10), 0.0)
    caplog.set_level(logging.WARNING)
    _replace(path, "10.0.0.1,advskew=0\n10.0.0.2,advskew=110\n")
    sp.reload_peers(10.0)
    assert sp.guard.peers[FW2].min_advskew == 110 and FW1 in sp.guard.sources
    assert any("peers updated" in r.getMessage() and "advskew>=110" in r.getMessage() for r in caplog.records)
    assert '"peers_configured": ["10.0.0.1", "10.0.0.2", "10.0.0.5"]' in (tmp_path / "st.json").read_text()
    _replace(path, "10.0.0.1,advskew=0\n10.0.0.2,advskew=oops\n")        # bad: the previous list stays
    sp.reload_peers(20.0)
    assert sp.guard.peers[FW2].min_advskew == 110
    _replace(path, "")                                                  # --peer still listed: the file may empty
    sp.reload_peers(30.0)
    assert set(sp.guard.peers) == {"10.0.0.5"}


def test_a_peers_file_that_would_empty_the_list_is_refused(tmp_path, caplog):
    from appliance.ha.speaker import Speaker, main, parser
    path = tmp_path / "carp-1.peers"
    base = ["--interface=lo", f"--srcip={SELF}", "--vhid=1", f"--addr={VIP}", "--pass=x"]
    path.write_text("10.0.0.1,advskew=0\n")
    sp = Speaker(parser().parse_args([*base, f"--peers-file={path}"]), PW)
    caplog.set_level(logging.WARNING)
    _replace(path, "# no peers\n")
    sp.reload_peers(1.0)
    assert set(sp.guard.peers) == {FW1} and any("lists no peer" in r.getMessage() for r in caplog.records)
    path.write_text("bogus\n")                                          # at start: a bad file is a bad option
    assert main([*base, f"--peers-file={path}"]) == 2
    assert main([*base, f"--peers-file={tmp_path / 'missing'}"]) == 2


NEW_PW = b"n3xt-pass"


def test_rotation_window_accepts_the_next_pass_and_only_while_it_is_set(tmp_path):
    # issue 12, finding 2: a pass change arrives in two phases; during the window both passes are heard
    g = make()
    log = logging.getLogger("test.nextpass")
    assert reason(g, pkt(pw=NEW_PW, counter=10)) == "badauth"          # no rotation: the next pass is a stranger
    f = tmp_path / "carp.pass.next"
    np = peerspec.NextPass(str(f), log)
    np.apply(g, 0.0)                                                  # missing file: no rotation
    assert g.next_pw is None
    f.write_bytes(NEW_PW + b"\n")
    np.apply(g, 0.5)                                                  # looked at once a second at most
    assert g.next_pw is None
    np.apply(g, 1.0)
    assert g.next_pw == NEW_PW
    assert g.admit(pkt(pw=NEW_PW, counter=11), 1.0).counter == 11     # a peer already on the new pass
    assert g.snapshot()[FW1]["signed"] == pass_fingerprint(NEW_PW)    # recorded: a sync may not drop it now
    assert g.admit(pkt(pw=PW, counter=12), 1.1).counter == 12         # a peer still on the old one
    assert g.snapshot()[FW1]["signed"] == pass_fingerprint(PW) != pass_fingerprint(NEW_PW)
    assert reason(g, pkt(pw=b"third-pass", counter=13)) == "badauth"  # anything else still refused
    assert reason(g, pkt(pw=NEW_PW, counter=11)) == "replay"          # the counter rules hold for both passes
    f.unlink()                                                        # the rotation finished: back to one pass
    np.apply(g, 2.0)
    assert g.next_pw is None
    assert reason(g, pkt(pw=NEW_PW, counter=20)) == "badauth"


def test_a_bad_next_pass_file_is_ignored(tmp_path, caplog):
    g = make()
    f = tmp_path / "carp.pass.next"
    f.write_bytes(b"x" * 40 + b"\n")                                  # longer than carp(4) allows
    with caplog.at_level(logging.WARNING):
        peerspec.NextPass(str(f), logging.getLogger("test.nextpass")).apply(g, 0.0)
    assert g.next_pw is None and "not used" in caplog.text
