"""The CARP scripts' entry (appliance/ha/transition.py): the supervisor writes a plan and scripts that exec it; a role
change from the plan records the role, orders by fork time and runs hooks as `appliance role` does, without the
config's model; a bad plan, vhid or interface is one error naming it, exit 2, nothing recorded."""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.core import loader as cfgmod
from appliance.core import state
from appliance.core.paths import Paths
from appliance.ha import role, transition
from appliance.ha import supervisor as carp
from tests.support.wait import poll


@pytest.fixture
def plan(example_tree: Path, state_dir: Path) -> Path:
    return transition.write_plan(Paths(state_dir), cfgmod.load(example_tree), "fw2", example_tree)


@pytest.fixture
def no_vip(monkeypatch):
    """The unit tests never touch this host's addresses: the VIP move is recorded instead."""
    moves = []
    monkeypatch.setattr(role, "_move_vip", lambda paths, r, iface, vip, garp: moves.append((r, iface, str(vip), garp)))
    return moves


def test_plan_holds_what_a_role_change_needs_and_is_0600(plan: Path, example_tree: Path) -> None:
    data = json.loads(plan.read_text())
    assert data["node"] == "fw2" and data["interface"] == "em0" and data["config"] == str(example_tree)
    assert data["groups"][0] == {"vhid": 1, "vip": "192.168.1.50/24", "advskew": 100, "main": True}
    assert stat.S_IMODE(plan.stat().st_mode) == 0o600


def test_scripts_exec_the_entry_with_the_plan(example_tree: Path, state_dir: Path) -> None:
    cfg = cfgmod.load(example_tree)
    up, down = carp.write_scripts(example_tree, "fw2", Paths(state_dir), cfg, move_vip=False)
    for script, r in ((up, "master"), (down, "backup")):
        text = script.read_text()
        assert f"-I -m appliance.ha.transition --plan {transition.plan_path(Paths(state_dir))} {r} --vhid \"$3\"" in text
        assert " addr " not in text and subprocess.run(["sh", "-n", str(script)]).returncode == 0


def test_ucarp_scripts_exit_before_the_change_is_done(example_tree: Path, state_dir: Path, tmp_path: Path) -> None:
    """ucarp waits for its script (and sends no advert meanwhile): a detached script returns at once, its change
    (here a stand-in Python that takes 3 s) still runs to the end, in the background."""
    cfg = cfgmod.load(example_tree)
    up, _ = carp.write_scripts(example_tree, "fw2", Paths(state_dir), cfg, move_vip=False, detach=True)
    text = up.read_text()
    assert text.rstrip().endswith("</dev/null &") and " exec " not in text
    done = tmp_path / "done"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nsleep 3; echo \"$@\" > {done}\n")
    fake.chmod(0o755)
    stand_in = tmp_path / "up.sh"
    stand_in.write_text(text.replace(shlex.quote(sys.executable), str(fake)))
    subprocess.run(["sh", str(stand_in), "em0", "192.168.1.50", "1"], check=True, timeout=30)
    assert not done.exists()   # the script is back; its change is still running
    assert poll(done.exists, 20, step=0.1) and "master --vhid 1 --iface em0 --fork-seq" in done.read_text()


def test_a_change_from_the_plan_records_the_role_and_runs_hooks(plan: Path, state_dir: Path, no_vip) -> None:
    log = state_dir / "hook.log"
    d = state_dir / "hooks.d" / "master"
    d.mkdir(parents=True)
    (d / "10-log").write_text(f"#!/bin/sh\necho \"$APPLIANCE_ROLE $APPLIANCE_NODE $APPLIANCE_VIP\" >> {log}\n")
    (d / "10-log").chmod(0o755)
    got = transition.run(["master", "--plan", str(plan), "--vhid", "1", "--iface", "em0"])
    assert got["changed"] and state.read_role(Paths(state_dir))["role"] == "MASTER"
    assert no_vip == [("MASTER", "em0", "192.168.1.50/24", False)]   # the script sent the gratuitous ARP
    assert log.read_text().splitlines() == ["MASTER fw2 192.168.1.50/24"]
    assert not transition.run(["master", "--plan", str(plan)])["changed"]   # idempotent, hooks not run again
    assert len(log.read_text().splitlines()) == 1


def test_an_older_fork_does_not_undo_a_newer_one(plan: Path, state_dir: Path, no_vip, monkeypatch) -> None:
    seqs = iter([("boot-1", 20), ("boot-1", 10)])
    monkeypatch.setattr(transition.pids, "fork_order", lambda: next(seqs))
    transition.run(["backup", "--plan", str(plan), "--fork-seq"])
    stale = transition.run(["master", "--plan", str(plan), "--fork-seq"])
    assert stale.get("stale") and state.read_role(Paths(state_dir))["role"] == "BACKUP"


@pytest.mark.parametrize("args,says", [
    (["--vhid", "9"], "--vhid 9 is not in"),
    (["--iface", "eth7"], "--iface 'eth7': the plan"),
])
def test_a_vhid_or_interface_not_in_the_plan_is_refused(plan: Path, state_dir: Path, no_vip, capsys, args, says) -> None:
    assert transition.main(["master", "--plan", str(plan), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("appliance: error: ") and says in err and str(plan) in err
    assert state.read_role(Paths(state_dir)) is None and no_vip == []


@pytest.mark.parametrize("text", ["", "{", "[]", '{"node": "fw2"}', '{"node": "fw2", "config": "/x", "interface": "em0", '
                                  '"hook_timeout": 10, "groups": [{"vhid": 1, "vip": "not-an-ip", "advskew": 0, "main": true}]}'])
def test_a_bad_plan_is_named_and_nothing_applied(tmp_path: Path, state_dir: Path, no_vip, capsys, text) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text(text)
    assert transition.main(["backup", "--plan", str(bad)]) == 2
    assert f"{bad}: not a role plan" in capsys.readouterr().err and state.read_role(Paths(state_dir)) is None


def test_a_missing_plan_is_named(tmp_path: Path, capsys) -> None:
    assert transition.main(["backup", "--plan", str(tmp_path / "none.json")]) == 2
    assert "none.json: cannot read the role plan" in capsys.readouterr().err


def test_the_entry_imports_no_pydantic_and_no_cli() -> None:
    r = subprocess.run([sys.executable, "-I", "-c", "import sys, appliance.ha.transition; "
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'click', 'yaml') "
                        "or m in ('appliance.core.model', 'appliance.cli')))"],
                       capture_output=True, text=True, timeout=60, cwd="/", env={**os.environ})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
