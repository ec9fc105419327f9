"""The sync catch-up gate (appliance/ha/catchup.py) with a fake question: when it holds a node demoted and when not."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from appliance.core import loader
from appliance.core.paths import Paths
from appliance.ha import supervisor as carp
from appliance.ha.catchup import CatchUp
from tests.support.wait import wait_until


def _live(state: Path, gen: int) -> None:
    (state / "releases" / str(gen)).mkdir(parents=True, exist_ok=True)
    tmp = state / "current.tmp"
    os.symlink(f"releases/{gen}", tmp)
    os.replace(tmp, state / "current")


def _gate(state: Path, ask, pending_max: float = 5.0) -> tuple[CatchUp, list[str], list[int], threading.Event]:
    logs: list[str] = []
    changes: list[int] = []
    gate = CatchUp(ask, Paths(state), lambda: changes.append(1), logs.append, pending_max)
    stop = threading.Event()
    gate.start(stop, poll=0.05)
    return gate, logs, changes, stop


def test_nothing_ahead_opens_the_gate(tmp_path: Path) -> None:
    _live(tmp_path, 4)
    gate, logs, changes, stop = _gate(tmp_path, lambda log: None)
    try:
        assert gate.reason is not None or changes  # held while asking (unless already answered)
        wait_until(lambda: gate.reason is None, 5, "gate open")
        assert changes == [1] and logs == []
    finally:
        stop.set()


def test_a_master_ahead_holds_the_node_until_its_generation_is_live(tmp_path: Path) -> None:
    _live(tmp_path, 4)
    gate, logs, changes, stop = _gate(tmp_path, lambda log: ("fw2", 6))
    try:
        wait_until(lambda: gate.reason and "fw2 (MASTER) has generation 6, this node 4" in gate.reason, 5, "held")
        _live(tmp_path, 5)           # an older one does not open it
        time.sleep(0.3)
        assert gate.reason is not None
        _live(tmp_path, 6)           # the master's push arrived
        wait_until(lambda: gate.reason is None, 5, "gate open")
        assert any("generation 6 is live here (from fw2)" in m for m in logs), logs
        assert len(changes) == 2     # held, then released: the supervisor re-arms twice
    finally:
        stop.set()


def test_an_answer_not_above_ours_or_a_failing_question_opens_it(tmp_path: Path) -> None:
    _live(tmp_path, 6)
    gate, _, _, stop = _gate(tmp_path, lambda log: ("fw2", 6))
    wait_until(lambda: gate.reason is None, 5, "gate open (equal generation)")
    stop.set()

    def broken(log):
        raise OSError("no route to host")

    gate, logs, _, stop = _gate(tmp_path, broken)
    wait_until(lambda: gate.reason is None, 5, "gate open (question failed)")
    assert any("not asked (OSError: no route to host)" in m for m in logs), logs
    stop.set()


def test_no_answer_within_the_limit_opens_it_and_a_late_answer_closes_it_again(tmp_path: Path) -> None:
    _live(tmp_path, 1)
    answer = threading.Event()

    def slow(log):
        answer.wait(10)
        return "fw2", 2

    gate, logs, _, stop = _gate(tmp_path, slow, pending_max=0.3)
    try:
        wait_until(lambda: gate.reason is None, 5, "gate open at the deadline")
        assert any("no answer from the peers within 0.3 s" in m for m in logs), logs
        answer.set()
        wait_until(lambda: gate.reason is not None, 5, "held after the late answer")
    finally:
        answer.set()
        stop.set()


def test_the_supervisor_counts_the_gate_as_a_demotion(example_tree: Path, state_dir: Path) -> None:
    cfg = loader.load(example_tree)
    _live(state_dir, 2)
    sup = carp.CarpSupervisor(cfg, "fw1", example_tree, Paths(state_dir), use_watchdog=False, ahead=lambda log: ("fw2", 3))
    assert sup.catchup.pending_max == 2 * cfg.sync.timeout   # the SSH connection and the command each get it
    sup.catchup.start(sup.stop, poll=0.05)
    try:
        wait_until(lambda: sup.demoted()[0] and "fw2 (MASTER) has generation 3" in sup.demoted()[1], 5, "demoted")
        wait_until(sup.rearm.is_set, 5, "re-armed")  # the engines get the demoted advskew (set after the reason)
        _live(state_dir, 3)
        wait_until(lambda: sup.demoted() == (False, ""), 5, "promoted again")
    finally:
        sup.stop.set()
    assert carp.CarpSupervisor(cfg, "fw1", example_tree, Paths(state_dir)).catchup is None  # no question: no gate


def _key_and_hosts(paths: Paths, example_tree: Path) -> None:
    """This node's sync key and the tree's pinned host keys, as ahead() needs them to ask at all."""
    from sync import keys

    paths.sync_key.parent.mkdir(parents=True, exist_ok=True)
    paths.sync_key.write_text("key\n")
    keys.known_hosts(example_tree.parent).parent.mkdir(exist_ok=True)
    keys.known_hosts(example_tree.parent).write_text("hosts\n")


def test_ahead_waits_only_for_a_master_and_a_number_a_push_could_bring(example_tree: Path, state_dir: Path,
                                                                        monkeypatch) -> None:
    """sync.catchup.ahead with the peers' status answers faked: MASTER and above ours by at most MAX_STEP, or nothing."""
    from sync import catchup
    from sync.releases import MAX_STEP

    cfg = loader.load(example_tree)
    paths = Paths(state_dir)
    _live(state_dir, 5)
    _key_and_hosts(paths, example_tree)
    answers: dict = {}
    monkeypatch.setattr(catchup, "remote_status", lambda p: answers[p.name])
    for answer, want in (({"role": "MASTER", "generation": 6}, ("fw2", 6)),
                         ({"role": "MASTER", "generation": 5 + MAX_STEP}, ("fw2", 5 + MAX_STEP)),
                         ({"role": "MASTER", "generation": 6 + MAX_STEP}, None),   # receive would refuse it
                         ({"role": "MASTER", "generation": 5}, None),
                         ({"role": "BACKUP", "generation": 9}, None),
                         ({"role": "MASTER", "generation": "9"}, None)):
        answers["fw2"] = answer
        assert catchup.ahead(cfg, "fw1", example_tree, paths) == want, answer


def test_ahead_says_why_a_peer_was_not_asked(example_tree: Path, state_dir: Path, monkeypatch) -> None:
    """A gate that opens because the question failed says so in the log (a broken sync link is not silent)."""
    from sync import catchup
    from sync.errors import PEER_FAILED, SyncError

    cfg = loader.load(example_tree)
    paths = Paths(state_dir)
    logs: list[str] = []
    assert catchup.ahead(cfg, "fw1", example_tree, paths, logs.append) is None
    assert logs and "is missing; the peers are not asked" in logs[0] and str(paths.sync_key) in logs[0], logs
    _key_and_hosts(paths, example_tree)

    def refused(p):
        raise SyncError(f"{p.name} (addr:22): cannot ask its status: PermissionError: denied", PEER_FAILED)

    monkeypatch.setattr(catchup, "remote_status", refused)
    logs.clear()
    assert catchup.ahead(cfg, "fw1", example_tree, paths, logs.append) is None
    assert logs == ["sync catch-up: fw2 (addr:22): cannot ask its status: PermissionError: denied"], logs
    monkeypatch.setattr(catchup, "remote_status", lambda p: {"role": "BACKUP", "generation": 9})
    logs.clear()
    assert catchup.ahead(cfg, "fw1", example_tree, paths, logs.append) is None   # an answer not waited for says so
    assert logs == ["sync catch-up: fw2 (BACKUP) has generation 9, this node 0: not waited for"], logs
