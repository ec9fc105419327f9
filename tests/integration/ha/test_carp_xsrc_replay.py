"""Review 12, H3: a LAN host without the pass replays fw1's advert under fw2's source address (the CARP digest
does not cover the source). Before the fix fw1 recorded its own, higher, counter as fw2's latest (and kept it
in its state file), then dropped every real advert of fw2 as a replay: after fw1's demotion both held the VIP.
Now fw1 refuses a counter it sent itself without touching fw2's state, and after the demotion exactly one
node holds the VIP (fw2). Real speakers in namespaces (tests.support.carp_lan), removed at the end."""
from __future__ import annotations

import threading
import time

import pytest

from tests.integration.ha.test_carp_forgery import attack, diag, state
from tests.support.carp_lan import Lan
from tests.support.env import need_tool
from tests.support.wait import poll

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timing]


def _start(lan, node, skew, other, oskew):
    lan.start("speaker", node, advskew=skew, extra=[f"--peer={other.ip},advskew={oskew}", f"--state-file={node.state}"])


def test_cross_source_replay_of_own_advert_does_not_lock_the_peer_out(tmp_path):
    need_tool("ip")
    lan = Lan(3, tmp_path)
    try:
        lan.up()
        fw1, fw2, _att = lan.nodes
        for n in (fw1, fw2):
            n.state = tmp_path / f"{n.name}.json"
        _start(lan, fw2, 100, fw1, 0)
        time.sleep(1.5)
        _start(lan, fw1, 0, fw2, 100)                    # fw1 starts later: its counters are above fw2's
        assert poll(lambda: lan.holders() == [fw1.name], 15), (lan.holders(), diag(lan))
        time.sleep(1.0)
        before = state(fw1)["peers"][fw2.ip]["counter"]
        r = attack(lan, kind="replay", victim=fw1.ip, src=fw2.ip, advskew=100, count=1)   # the poisoning replay
        time.sleep(0.5)
        s1 = state(fw1)
        assert s1["counters"].get("bad_replay", 0) >= 1, s1
        assert s1["peers"][fw2.ip]["counter"] != r["captured_counter"], s1
        assert s1["peers"][fw2.ip]["counter"] >= before
        # fw1 demoted as the supervisor re-arms it: engine restarted with advskew 240, state file kept
        lan.stop(fw1)
        _start(lan, fw1, 240, fw2, 100)
        samples: list[tuple] = []
        stop = threading.Event()

        def sample():
            end = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < end:
                samples.append(tuple(lan.holders()))
                stop.wait(0.1)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        time.sleep(8)
        stop.set()
        t.join(10)
        tail = samples[-30:]
        assert tail and all(h == (fw2.name,) for h in tail), (tail, diag(lan))
        s1, s2 = state(fw1), state(fw2)
        assert (s1["state"], s2["state"]) == ("BACKUP", "MASTER"), (s1, s2)
    finally:
        lan.close()
