"""Review 12, H3: the digest does not cover the source. A counter this node sent, or one accepted from another
source, is a replay and leaves the claimed source's state alone; one bad high-water mark does not lock a
speaker peer out for good (resync after RECOVER_ADVERTS x advbase of consecutive fresh counters)."""
from __future__ import annotations

from appliance.ha import guard
from tests.unit.test_speaker_guard import FW1, FW2, make, pkt, reason


def test_our_own_counter_under_a_peers_address_is_a_replay_and_changes_nothing():
    g = make()          # this node is the speaker at its own srcip; FW2 is a peer
    g.admit(pkt(src=FW2, advskew=100, counter=5000), 0.0)
    for c in range(9000, 9005):
        g.note_sent(c)
    assert reason(g, pkt(src=FW2, advskew=100, counter=9003), 1.0) == "replay"
    assert g.snapshot()[FW2]["counter"] == 5000
    g.admit(pkt(src=FW2, advskew=100, counter=5001), 2.0)       # the real peer is still heard
    assert g.own == [[9000, 9004]]


def test_own_ranges_are_kept_across_a_restart_and_bounded():
    g = make()
    g.restore_own([[100, 200], "junk", [5, 1], [300, "x"]])
    g.note_sent(1000)
    assert g.own == [[100, 200], [1000, 1000]]
    assert reason(g, pkt(src=FW2, advskew=100, counter=150)) == "replay"
    for i in range(40):
        g.note_sent(10_000 + 10 * i)
    assert len(g.own) == guard.OWN_RANGES_MAX


def test_a_counter_seen_from_another_source_is_a_replay():
    g = make()
    g.admit(pkt(src=FW1, counter=7000), 0.0)
    assert reason(g, pkt(src=FW2, advskew=100, counter=7000), 1.0) == "replay"
    assert FW2 not in g.snapshot()


def test_a_poisoned_high_water_mark_resyncs_after_n_advbase_of_fresh_counters():
    g = make()
    for i in range(5):
        g.admit(pkt(src=FW2, advskew=100, counter=4990 + i), float(i))
    g.admit(pkt(src=FW2, advskew=100, counter=10**12), 5.0)          # a leap: a forged counter (the pass's holder)
    base = 5000
    for i in range(guard.RECOVER_ADVERTS):
        assert reason(g, pkt(src=FW2, advskew=100, counter=base + i), 6.0 + i) == "replay"
    g.admit(pkt(src=FW2, advskew=100, counter=base + guard.RECOVER_ADVERTS), 6.0 + guard.RECOVER_ADVERTS)
    assert g.snapshot()[FW2]["counter"] == base + guard.RECOVER_ADVERTS and g.counter_resets == 1


def test_missed_adverts_replayed_after_the_peer_died_never_resync():
    # second review, finding 5: adverts this node never accepted (lost, or sent while it restarted) are still
    # below the mark it reached in small steps; replayed in order once the real peer is silent, they used to
    # resync and keep a dead master "alive"
    g = make()
    for i in range(50):
        g.admit(pkt(src=FW2, advskew=100, counter=100 + i), float(i))        # 100..149
    for i in range(10):
        g.admit(pkt(src=FW2, advskew=100, counter=180 + i), 80.0 + i)        # 150..179 missed; fw2 dies after 189
    for i in range(30):
        assert reason(g, pkt(src=FW2, advskew=100, counter=150 + i), 100.0 + i) == "replay"
    assert g.counter_resets == 0 and g.snapshot()[FW2]["counter"] == 189
    h = make()                                                               # the same after this node's restart
    h.restore(g.snapshot(), 0.0)
    for i in range(30):
        assert reason(h, pkt(src=FW2, advskew=100, counter=150 + i), 1.0 + i) == "replay"
    assert h.counter_resets == 0


def test_replays_of_accepted_adverts_never_resync():
    g = make()
    for i in range(50):
        g.admit(pkt(src=FW2, advskew=100, counter=100 + i), float(i))
    for i in range(40):                               # the attacker replays the run fw2 already sent, in order
        assert reason(g, pkt(src=FW2, advskew=100, counter=100 + i), 60.0 + i) == "replay"
    assert g.snapshot()[FW2]["counter"] == 149 and g.counter_resets == 0


def test_a_gap_in_the_refused_sequence_starts_over():
    g = make()
    g.restore({FW2: {"counter": 10**12}}, 0.0)
    for i in range(30):
        assert reason(g, pkt(src=FW2, advskew=100, counter=5000 + 2 * i), float(i)) == "replay"
    assert g.counter_resets == 0


def test_another_nodes_adverts_replayed_under_a_peers_address_lock_it_out_for_a_bounded_time_only():
    # third review, finding 1 (clusters of 3+ nodes: fw2's adverts, replayed as fw1's to a third node once the
    # cross-source memory has forgotten them): two of them, 2 apart, used to lock fw1 out for good
    g = make()
    for i in range(5):
        g.admit(pkt(src=FW1, counter=1000 + i), float(i))
    far = 1000 + (7 << 30)                                      # another node's counters: started at another ms
    g.by_counter.clear()                                      # forgotten (a restart of this speaker, or 8192 adverts)
    g.admit(pkt(src=FW1, counter=far), 5.0)
    g.admit(pkt(src=FW1, counter=far + 2), 6.0)
    refused = 0
    for i in range(3 * guard.RECOVER_ADVERTS):
        try:
            g.admit(pkt(src=FW1, counter=1005 + i), 7.0 + i)   # the real fw1 goes on
            break
        except Exception:
            refused += 1
    assert g.counter_resets == 1 and refused == guard.RECOVER_ADVERTS, refused
