"""`appliance role`: idempotence, state file, hooks.d order/timeout/failure, stale script ordering, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from appliance.core import loader as cfgmod
from appliance.core import pids, state
from appliance.core.paths import Paths
from appliance.ha import role
from tests.support.env import APPLIANCE, make_config


def hook(d: Path, name: str, body: str, executable: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755 if executable else 0o644)
    return p


def test_role_is_idempotent_and_records_state(example_tree: Path, state_dir: Path) -> None:
    cfg = cfgmod.load(example_tree)
    log = state_dir / "hook.log"
    hook(state_dir / "hooks.d" / "master", "10-count", f'echo "$APPLIANCE_ROLE $APPLIANCE_VHID $APPLIANCE_PREVIOUS_ROLE" >> {log}')
    first = role.apply(Paths(state_dir), cfg, "fw1", "master", config_path=example_tree, manage_vip=False)
    assert first["changed"] and first["role"] == "MASTER" and first["vhid"] == 1 and first["iface"] == "em0"
    since = first["since"]
    time.sleep(0.02)
    again = role.apply(Paths(state_dir), cfg, "fw1", "master", config_path=example_tree, manage_vip=False)
    assert not again["changed"]
    assert again["since"] == since  # a re-run does not move `since`
    assert log.read_text().splitlines() == ["MASTER 1 INIT"]  # hooks ran once
    on_disk = state.read_role(Paths(state_dir))
    assert on_disk["role"] == "MASTER" and on_disk["since"] == since and on_disk["vip"] == "192.168.1.50/24"
    back = role.apply(Paths(state_dir), cfg, "fw1", "backup", config_path=example_tree, manage_vip=False)
    assert back["changed"] and state.read_role(Paths(state_dir))["role"] == "BACKUP" and state.read_role(Paths(state_dir))["since"] >= since
    # one log line per transition, none for the idempotent re-run
    lines = [l for l in (state_dir / "ha.log").read_text().splitlines() if "->" in l]
    assert len(lines) == 2 and "INIT -> MASTER" in lines[0] and "MASTER -> BACKUP" in lines[1]


def test_hooks_run_in_name_order_from_the_node_local_dir_only(example_tree: Path, state_dir: Path) -> None:
    cfg = cfgmod.load(example_tree)
    out = state_dir / "order.log"
    local = state_dir / "hooks.d"
    hook(local / "backup", "20-b", f"echo 20-b >> {out}")
    hook(local / "backup", "05-a", f"echo 05-a >> {out}")
    hook(local / "backup", "10-local", f"echo 10-local >> {out}")
    hook(local / "backup", "00-not-exec", f"echo nope >> {out}", executable=False)
    hook(local / "master", "01-master-only", f"echo master >> {out}")
    synced = hook(example_tree.parent / "hooks.d" / "backup", "00-synced", f"echo synced >> {out}")  # the old place
    role.apply(Paths(state_dir), cfg, "fw2", "backup", config_path=example_tree, manage_vip=False)
    assert out.read_text().split() == ["05-a", "10-local", "20-b"]
    log = (state_dir / "ha.log").read_text()
    assert "00-not-exec is not executable" in log
    assert f"{synced.parent.parent} is inside the synced config tree and is ignored" in log


def test_hooks_others_could_write_are_refused_and_logged(example_tree: Path, state_dir: Path) -> None:
    cfg = cfgmod.load(example_tree)
    out = state_dir / "ran.log"
    local = state_dir / "hooks.d"
    hook(local / "master", "10-wide", f"echo wide >> {out}").chmod(0o777)
    hook(local / "master", "20-ok", f"echo ok >> {out}")
    role.apply(Paths(state_dir), cfg, "fw1", "master", config_path=example_tree, manage_vip=False)
    assert out.read_text().split() == ["ok"]
    assert "10-wide refused, not run: group/world-writable (mode 777)" in (state_dir / "ha.log").read_text()
    (local / "backup").mkdir()
    hook(local / "backup", "10-b", f"echo b >> {out}")
    (local / "backup").chmod(0o775)
    role.apply(Paths(state_dir), cfg, "fw1", "backup", config_path=example_tree, manage_vip=False)
    assert out.read_text().split() == ["ok"]
    assert "none run: " in (state_dir / "ha.log").read_text() and "mode 775" in (state_dir / "ha.log").read_text()
    if os.geteuid() == 0:  # a hook owned by another user is refused even with safe modes
        (local / "backup").chmod(0o755)
        os.chown(local / "backup" / "10-b", 65534, 65534)
        role.apply(Paths(state_dir), cfg, "fw1", "master", config_path=example_tree, manage_vip=False)
        role.apply(Paths(state_dir), cfg, "fw1", "backup", config_path=example_tree, manage_vip=False)
        assert "b" not in out.read_text().split() and "owned by uid 65534, not root" in (state_dir / "ha.log").read_text()


def test_failing_and_hanging_hooks_do_not_block(tmp_path: Path, example_tree: Path, state_dir: Path) -> None:
    cfg = cfgmod.load(make_config(example_tree, ha={"hook_timeout": 1}))
    out = state_dir / "ran.log"
    d = state_dir / "hooks.d" / "master"
    hook(d, "10-fails", "echo boom-message; exit 3")
    hook(d, "20-hangs", "sleep 30")
    hook(d, "30-runs", f"echo ran >> {out}")
    t0 = time.monotonic()
    res = role.apply(Paths(state_dir), cfg, "fw1", "master", config_path=example_tree, manage_vip=False)
    took = time.monotonic() - t0
    assert took < 10, f"a hanging hook held the transition for {took:.1f} s"
    assert [h["rc"] for h in res["hooks"]] == [3, None, 0]
    assert out.read_text().strip() == "ran"
    assert state.read_role(Paths(state_dir))["role"] == "MASTER"
    log = (state_dir / "ha.log").read_text()
    assert "10-fails exited 3: boom-message" in log and "20-hangs killed after 1 s timeout" in log


def test_older_script_never_undoes_a_newer_one(example_tree: Path, state_dir: Path) -> None:
    cfg = cfgmod.load(example_tree)
    role.apply(Paths(state_dir), cfg, "fw1", "master", config_path=example_tree, manage_vip=False, seq=2000)
    stale = role.apply(Paths(state_dir), cfg, "fw1", "backup", config_path=example_tree, manage_vip=False, seq=1000)
    assert stale.get("stale") and state.read_role(Paths(state_dir))["role"] == "MASTER"
    role.apply(Paths(state_dir), cfg, "fw1", "backup", config_path=example_tree, manage_vip=False, seq=3000)
    assert state.read_role(Paths(state_dir))["role"] == "BACKUP"


def test_scripts_are_ordered_by_fork_not_by_when_their_shell_runs(example_tree: Path, state_dir: Path) -> None:
    """ucarp forks its up and down scripts without waiting; under load the later one can start its Python first. The
    up script forked first but run last (a 1.5 s stall before its exec) must not undo the down script forked after it."""
    base = [APPLIANCE, "-c", str(example_tree), "--node", "fw1", "role"]
    env = {**os.environ, "APPLIANCE_STATE_DIR": str(state_dir)}
    up = subprocess.Popen(["sh", "-c", 'sleep 1.5; exec "$0" "$@"', *base, "master", "--fork-seq", "--no-vip"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    down = subprocess.run([*base, "backup", "--fork-seq", "--no-vip"], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert state.read_role(Paths(state_dir))["role"] == "BACKUP"
    _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    rec = state.read_role(Paths(state_dir))
    assert rec["role"] == "BACKUP", "the up script forked first undid the later down script"
    assert rec["boot"] == pids.fork_order()[0] and rec["seq"] > pids.fork_order()[1]  # forked after this process
    # a script forked now (a new transition) still applies
    r = run_cli("-c", str(example_tree), "--node", "fw1", "role", "master", "--fork-seq", "--no-vip", env=env)
    assert r.returncode == 0, r.stderr
    assert state.read_role(Paths(state_dir))["role"] == "MASTER"
    r = run_cli("-c", str(example_tree), "--node", "fw1", "role", "backup", "--fork-seq", "--seq", "5", "--no-vip", env=env)
    assert r.returncode == 2 and "--seq and --fork-seq" in r.stderr


def test_a_seq_from_another_boot_is_not_compared(example_tree: Path, state_dir: Path) -> None:
    """Fork ticks restart at boot: a high one recorded before a reboot must not make every later script stale."""
    cfg = cfgmod.load(example_tree)
    role.apply(Paths(state_dir), cfg, "fw1", "master", config_path=example_tree, manage_vip=False, seq=10**15, boot="old")
    role.apply(Paths(state_dir), cfg, "fw1", "backup", config_path=example_tree, manage_vip=False, seq=5, boot="new")
    assert state.read_role(Paths(state_dir))["role"] == "BACKUP"
    stale = role.apply(Paths(state_dir), cfg, "fw1", "master", config_path=example_tree, manage_vip=False, seq=4, boot="new")
    assert stale.get("stale") and state.read_role(Paths(state_dir))["role"] == "BACKUP"


def test_fork_order_follows_fork_order() -> None:
    procs = [subprocess.Popen(["sleep", "5"]) for _ in range(3)]
    try:
        keys = [pids.fork_order(p.pid) for p in procs]
        assert all(k is not None and k[0] == keys[0][0] for k in keys)
        assert [k[1] for k in keys] == sorted(k[1] for k in keys) and len({k[1] for k in keys}) == 3
        assert pids.fork_order(procs[0].pid)[1] > pids.fork_order()[1]  # forked after this test process
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert pids.fork_order(procs[0].pid) is None  # gone: no key


def test_extra_vhid_has_its_own_state_file(example_tree: Path, state_dir: Path) -> None:
    cfg = cfgmod.load(make_config(example_tree, cluster={"extra_vhids": [{"vhid": 2, "vip": "192.168.1.51/24", "advskew": {"fw1": 100, "fw2": 0}}]}))
    assert [(g.vhid, g.advskew) for g in role.groups(cfg, "fw1")] == [(1, 0), (2, 100)]
    assert [(g.vhid, g.advskew) for g in role.groups(cfg, "fw2")] == [(1, 100), (2, 0)]
    role.apply(Paths(state_dir), cfg, "fw2", "master", vhid=2, config_path=example_tree, manage_vip=False)
    assert state.read_role(Paths(state_dir), 2)["role"] == "MASTER" and state.read_role(Paths(state_dir), 2)["vip"] == "192.168.1.51/24"
    assert state.read_role(Paths(state_dir)) is None  # the main vhid's file is untouched


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([APPLIANCE, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_cli_role_and_bad_input(example_tree: Path, state_dir: Path) -> None:
    r = run_cli("-c", str(example_tree), "--node", "fw2", "role", "backup", "--no-vip")
    assert r.returncode == 0, r.stderr
    assert json.loads((state_dir / "role.json").read_text())["role"] == "BACKUP"
    r = run_cli("-c", str(example_tree), "--node", "fw2", "role", "master", "--vhid", "9", "--no-vip")
    assert r.returncode == 2 and "--vhid 9 is not a vhid of this cluster" in r.stderr
    r = run_cli("-c", str(example_tree), "--node", "fw2", "role", "boss", "--no-vip")
    assert r.returncode == 2 and "boss" in r.stderr
    r = run_cli("-c", str(example_tree), "--node", "fw9", "role", "master", "--no-vip")
    assert r.returncode == 2 and "fw9" in r.stderr
    r = run_cli("-c", str(example_tree), "--node", "fw2", "role", "master", "--iface", "bad iface!", "--no-vip")
    assert r.returncode == 2 and "--iface" in r.stderr
    assert json.loads((state_dir / "role.json").read_text())["role"] == "BACKUP"  # nothing applied


def test_ha_state_and_generation(state_dir: Path) -> None:
    assert state.read_ha(Paths(state_dir)) == {"demoted": False, "health_demoted": False}
    state.write_ha(Paths(state_dir), demoted=True, reason="test")
    assert state.read_ha(Paths(state_dir))["demoted"] is True and state.read_ha(Paths(state_dir))["health_demoted"] is False
    assert state.sync_generation(Paths(state_dir)) is None
    (state_dir / "releases" / "7").mkdir(parents=True)
    os.symlink("releases/7", state_dir / "current")
    assert state.sync_generation(Paths(state_dir)) == 7


@pytest.mark.root
def test_role_moves_the_vip_in_a_namespace(example_tree: Path, state_dir: Path) -> None:
    """Real path: `appliance role` adds/removes the VIP with ip addr inside a namespace we create."""
    from tests.support.env import need_tool
    need_tool("ip", "arping")
    from appliance.ha import ip as netns
    ns = f"cgrole{os.getpid() % 100000}"
    netns.netns_add(ns)
    try:
        netns.ip("link", "add", "em0", "type", "veth", "peer", "name", "em0p", netns=ns)
        netns.ip("link", "set", "em0p", "up", netns=ns)
        netns.ip("link", "set", "em0", "up", netns=ns)
        netns.ip("addr", "add", "192.168.1.2/24", "dev", "em0", netns=ns)
        argv = ["ip", "netns", "exec", ns, APPLIANCE, "-c", str(example_tree), "--node", "fw1", "role"]
        for _ in range(2):  # twice: idempotent
            r = subprocess.run(argv + ["master"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert [str(a) for a in netns.addresses("em0", ns)].count("192.168.1.50/24") == 1
        r = subprocess.run(argv + ["backup"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "192.168.1.50/24" not in [str(a) for a in netns.addresses("em0", ns)]
        assert "192.168.1.2/24" in [str(a) for a in netns.addresses("em0", ns)]
    finally:
        netns.netns_del(ns)
