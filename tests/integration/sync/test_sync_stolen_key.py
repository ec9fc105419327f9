"""Issue 12, finding 2 through the real forced command: a stolen sync key pushes a hook and a pass change (refused,
nothing runs, one master, sync still works), walks the pass rotation on the backup alone, changes CARP settings
while the backup's CARP runs, points the lists outside the tree (all refused); the pass rotation end to end; a
revoked node's key is refused alone."""
from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from appliance.core.loader import load
from appliance.core.paths import Paths
from appliance.core.state import mark_carp_stopped, read_role
from appliance.ha import protocol as cp
from appliance.ha import role
from appliance.ha.guard import Guard
from appliance.ha.peers import Peer
from sync import keys as keymod
from sync import tree
from sync.errors import BAD_INPUT, SyncError
from sync.peer import ask, make_peers, rsync_to
from tests.support.sync_lab import SyncLab


def _edit(cfg: Path, fn) -> None:
    data = yaml.safe_load(cfg.read_text())
    fn(data)
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))


def _push(lab: SyncLab, tmp: Path, gen: int, edit, extra=None) -> tuple[bool, str]:
    """The live tree with `edit` applied to its appliance.yaml (and `extra` to the tree), rsynced with fw1's
    (stolen) key and received."""
    evil = tmp / f"push-{gen}"
    shutil.copytree(lab.master.tree, evil, symlinks=True, ignore=shutil.ignore_patterns("compiled", "node.yaml"))
    _edit(evil / "appliance.yaml", edit)
    if extra is not None:
        extra(evil)
    peer = make_peers(lab.cfg_obj(lab.master.tree), "fw1", lab.master.tree, lab.master.key)[0]
    rsync_to(peer, evil)
    try:
        ask(peer, f"receive {gen} {tree.tree_hash(evil)}", f"refused generation {gen}")
    except SyncError as e:
        return False, str(e)
    return True, ""


def _hear_master(lab: SyncLab, password: str) -> None:
    """The backup's speaker has just accepted an advert from fw1 signed with `password`: a real Guard admits a real
    advert, and its snapshot goes where the speaker writes its state (what the receiver reads)."""
    cfg = load(lab.backup.config)
    c, fw1, fw2 = cfg.cluster, str(cfg.nodes["fw1"].lan.ip), str(cfg.nodes["fw2"].lan.ip)
    g = Guard(password=password.encode(), vhid=c.vhid, vip=str(c.vip.ip), srcip=fw2, advbase=c.advbase,
              peers=[Peer(fw1, cfg.nodes["fw1"].advskew)])
    g.admit(cp.parse_ip(cp.build_packet(password.encode(), c.vhid, str(c.vip.ip), fw1, c.advbase,
                                        cfg.nodes["fw1"].advskew, 1000)), time.monotonic())
    Paths(lab.backup.state).engine_state(c.vhid).write_text(json.dumps({"state": "BACKUP", "peers": g.snapshot()}))


def test_a_stolen_key_cannot_walk_the_pass_rotation_on_the_backup_alone(lab: SyncLab, tmp_path: Path) -> None:
    # the review's H2: three pushes, each a valid rotation step against the backup's own live config, left the
    # backup on the attacker's pass only while the master still sent the old one (two masters)
    lab.master.start_sshd()                                         # the backup asks fw1 over the sync link
    code, r = lab.master.sync()
    assert code == 0, r
    old = load(lab.backup.config).cluster.password.get_secret_value()
    _hear_master(lab, old)                                          # fw1 is heard signing with the old pass
    # phase 1 would make the backup accept adverts signed with the attacker's pass (forgeable from the LAN), and
    # phase 2 sign with it: fw1 itself, asked over the sync link, says it accepts neither
    ok, err = _push(lab, tmp_path, 3, lambda d: d["cluster"].update(password_next="att4cker"))
    assert not ok and "fw1 (MASTER) does not accept the pass" in err, err
    ok, err = _push(lab, tmp_path / "p2", 3, lambda d: d["cluster"].update(password="att4cker", password_next=old))
    assert not ok and "without the rotation" in err, err           # phase 2 without phase 1: the pairwise check
    # during a real rotation (phase 1 synced by the master), the key holder jumps to the end on the backup alone:
    # the backup still hears fw1 signing with the old pass, so dropping it is refused
    _edit(lab.master.tree / "appliance.yaml", lambda d: d["cluster"].update(password_next="n3xt-pass"))
    code, r = lab.master.sync()
    assert code == 0, json.dumps(r)
    _hear_master(lab, old)                                          # the speaker rewrites its state every 10 s
    ok, err = _push(lab, tmp_path / "drop", 4, lambda d: (d["cluster"].update(password="n3xt-pass"),
                                                            d["cluster"].pop("password_next", None)))
    fw1 = str(load(lab.backup.config).nodes["fw1"].lan.ip)
    assert not ok and fw1 in err and "no longer accepts" in err and "carp-rotate" in err, err
    c = load(lab.backup.config).cluster
    assert c.password.get_secret_value() == old and c.password_next.get_secret_value() == "n3xt-pass"
    assert lab.backup.live() == 3


def _moved(iface: str) -> str:
    """Another host address on the same subnet (config text only: nothing is sent to it); not the top one, which
    the example names as its gateway (ha.lan_witness)."""
    ip = ipaddress.IPv4Interface(iface)
    return f"{ip.network.broadcast_address - 2}/{ip.network.prefixlen}"


def test_a_stolen_key_cannot_change_carp_settings_while_the_backups_carp_runs(lab: SyncLab, tmp_path: Path) -> None:
    # the review's H1: a pushed advskew/advbase/LAN/VIP/node-list change applied on the backup alone made it refuse
    # the master's adverts (or stop hearing them): both held the VIP
    code, r = lab.master.sync()
    assert code == 0, r
    sleeper = subprocess.Popen(["sleep", "120"])                    # stands in for the backup's CARP supervisor
    pidfile = Paths(lab.backup.state).carp_pid
    try:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{sleeper.pid}\n")
        edits = {"nodes.fw1.advskew": lambda d: d["nodes"]["fw1"].update(advskew=200),
                 "cluster.advbase": lambda d: d["cluster"].update(advbase=2),
                 "nodes.fw1.lan": lambda d: d["nodes"]["fw1"].update(lan=_moved(d["nodes"]["fw1"]["lan"])),
                 "cluster.vip": lambda d: d["cluster"].update(vip=_moved(d["cluster"]["vip"])),
                 "cluster.interface": lambda d: d["cluster"].update(interface="em9"),
                 # the sync link: where this node would ask its peers before it takes a new pass (review finding 1)
                 "nodes.fw1.sync": lambda d: d["nodes"]["fw1"].update(sync="127.0.0.6/29"),
                 "sync.ssh_port": lambda d: d["sync"].update(ssh_port=2222)}
        for n, (field, edit) in enumerate(edits.items(), 3):
            ok, err = _push(lab, tmp_path / field, n, edit)
            assert not ok and field in err and "Stop `appliance carp` on each backup" in err, (field, err)
            assert lab.backup.live() == 2
        ok, err = _push(lab, tmp_path / "kh", 3, lambda d: None, extra=lambda t: (t / "keys" / "known_hosts").write_text(
            "[127.0.0.6]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake\n"))
        assert not ok and "keys/known_hosts" in err and "stop `appliance carp` on each backup" in err, err
        outside = str(lab.backup.tree.resolve() / "lists")         # a dir on the peer that has every category
        ok, err = _push(lab, tmp_path / "lists", 3, lambda d: d["filter"].update(lists=outside))
        assert not ok and "outside the config tree" in err, err
    finally:
        sleeper.kill()
        sleeper.wait()
    # the supervisor died (a crash: the service manager restarts it a second later): still refused, or the
    # restarted supervisor would start with the pushed settings (second review, finding 4)
    ok, err = _push(lab, tmp_path / "window", 3, lambda d: d["nodes"]["fw1"].update(advskew=200))
    assert not ok and "nodes.fw1.advskew" in err, err
    # stopped on purpose in this boot (what `appliance carp` records on SIGTERM): the same change is a plain sync
    mark_carp_stopped(Paths(lab.backup.state))
    ok, err = _push(lab, tmp_path / "stopped", 3, lambda d: d["nodes"]["fw1"].update(advskew=200))
    assert ok, err
    assert load(lab.backup.config).nodes["fw1"].advskew == 200


def _push_evil(lab: SyncLab, tmp: Path, gen: int, *, hook: Path | None, password: str | None) -> SyncError:
    """What the review did: the live tree, plus a hook and/or another pass, rsynced with fw1's key and received."""
    evil = tmp / f"evil-{gen}-{hook is not None}-{password is not None}"
    shutil.copytree(lab.master.tree, evil, symlinks=True, ignore=shutil.ignore_patterns("compiled", "node.yaml"))
    if hook is not None:
        (evil / "hooks.d" / "master").mkdir(parents=True)
        h = evil / "hooks.d" / "master" / "00-x"
        h.write_text(f"#!/bin/sh\ntouch {hook}\n")
        h.chmod(0o755)
    if password is not None:
        _edit(evil / "appliance.yaml", lambda d: d["cluster"].update(password=password))
    peer = make_peers(lab.cfg_obj(lab.master.tree), "fw1", lab.master.tree, lab.master.key)[0]  # the stolen key
    rsync_to(peer, evil)
    with pytest.raises(SyncError) as e:
        ask(peer, f"receive {gen} {tree.tree_hash(evil)}", f"refused generation {gen}")
    return e.value


def test_a_stolen_key_pushing_a_hook_and_a_pass_change_runs_nothing_and_sync_still_works(lab: SyncLab, tmp_path: Path) -> None:
    code, r = lab.master.sync()
    assert code == 0 and lab.backup.live() == 2, r
    marker = tmp_path / "pwned"
    before = load(lab.backup.config).cluster.password.get_secret_value()
    # the hook and the pass together, then each on its own: every push is refused by the peer, nothing applied
    e = _push_evil(lab, tmp_path, 3, hook=marker, password="hijacked")
    assert e.exit_code == BAD_INPUT and "hooks.d" in str(e) and "sync never carries code" in str(e), e
    e = _push_evil(lab, tmp_path, 3, hook=marker, password=None)
    assert e.exit_code == BAD_INPUT and "hooks.d" in str(e)
    e = _push_evil(lab, tmp_path, 3, hook=None, password="hijacked")
    assert e.exit_code == BAD_INPUT and "appliance carp-rotate" in str(e), e
    assert lab.backup.live() == 2
    assert load(lab.backup.config).cluster.password.get_secret_value() == before   # the backup keeps the old pass
    assert not (lab.backup.tree / "hooks.d").exists() and not list(lab.backup.state.glob("releases/*/hooks.d"))
    # one master: the backup still says BACKUP; a role transition there runs no pushed hook
    assert read_role(Paths(lab.backup.state))["role"] == "BACKUP"
    p = Paths(lab.backup.state, hooks_root=tmp_path / "node-hooks")
    cfg = load(lab.backup.config)
    for r_ in ("master", "backup"):
        role.apply(p, cfg, "fw2", r_, config_path=lab.backup.config, manage_vip=False)
    assert not marker.exists()
    assert read_role(Paths(lab.backup.state))["role"] == "BACKUP"
    # a normal sync afterwards still works (no split brain, no stuck generation)
    (lab.master.tree / "lists" / "adult" / "domains").write_text("after-attack.example\n")
    code, r = lab.master.sync()
    assert code == 0, r
    assert lab.backup.live() == lab.master.live() and "after-attack.example" in (lab.backup.tree / "lists" / "adult" / "domains").read_text()


def test_master_refuses_to_cut_a_direct_pass_change_or_a_tree_with_code(lab: SyncLab) -> None:
    code, r = lab.master.sync()
    assert code == 0, r
    cfg = lab.master.tree / "appliance.yaml"
    good = cfg.read_text()
    _edit(cfg, lambda d: d["cluster"].update(password="direct-change"))
    code, r = lab.master.sync()
    assert code == 2 and "appliance carp-rotate" in r.get("error", str(r)), r
    assert lab.master.live() == 2 and lab.backup.live() == 2                   # nothing cut, nothing pushed
    cfg.write_text(good)
    (lab.master.tree / "run-me.sh").write_text("#!/bin/sh\n")
    (lab.master.tree / "run-me.sh").chmod(0o755)
    code, r = lab.master.sync()
    assert code == 2 and "executable" in r.get("error", str(r)), r
    (lab.master.tree / "run-me.sh").unlink()


@pytest.fixture(params=[1, 2], ids=["2-nodes", "3-nodes"])
def rotation_lab(request, tmp_path: Path):
    # three nodes: each backup confirms phase 1 with the master only, so the backups never wait for each other
    lab = SyncLab(tmp_path, peers=request.param)
    try:
        for node in lab.nodes.values():
            node.start_sshd()
        yield lab
    finally:
        lab.close()


def test_the_pass_rotation_end_to_end(rotation_lab: SyncLab) -> None:
    lab = rotation_lab
    backups = [n for name, n in lab.nodes.items() if name != "fw1"]
    cfg = lab.master.tree / "appliance.yaml"
    old = load(cfg).cluster.password.get_secret_value()
    # phase 1: the next pass, synced
    _edit(cfg, lambda d: d["cluster"].update(password_next="n3xt-pass"))
    code, r = lab.master.sync()
    assert code == 0, json.dumps(r)
    for c in (load(b.config).cluster for b in backups):
        assert c.password.get_secret_value() == old and c.password_next.get_secret_value() == "n3xt-pass"
    # phase 2: carp-rotate swaps them on the master (comments kept), synced
    r2 = lab.master.appliance("carp-rotate")
    assert r2.returncode == 0 and "phase 2" in r2.stdout, r2.stderr
    assert load(lab.master.config).cluster.password.get_secret_value() == "n3xt-pass"
    code, r = lab.master.sync()
    assert code == 0, json.dumps(r)
    for c in (load(b.config).cluster for b in backups):
        assert c.password.get_secret_value() == "n3xt-pass" and c.password_next.get_secret_value() == old
    # phase 3: the old pass dropped, synced
    assert lab.master.appliance("carp-rotate", "--finish").returncode == 0
    code, r = lab.master.sync()
    assert code == 0, json.dumps(r)
    for c in (load(b.config).cluster for b in backups):
        assert c.password.get_secret_value() == "n3xt-pass" and c.password_next is None
    assert lab.master.appliance("carp-rotate").returncode == 2                 # no rotation under way: says phase 1


def test_a_revoked_nodes_key_is_refused_while_the_other_nodes_key_works(tmp_path: Path) -> None:
    lab = SyncLab(tmp_path, peers=2)          # fw1 (master), fw2, fw3
    try:
        for n in lab.nodes.values():
            if n.name != "fw1":
                n.start_sshd()
        fw3 = lab.nodes["fw3"]
        ak = fw3.state.parent / "sshd-fw3" / "authorized_keys"
        r = fw3.appliance("keys", "revoke", "fw2", "--authorized-keys", str(ak))
        assert r.returncode == 0 and "1 line(s) of fw2's key removed" in r.stdout, r.stderr
        cfg = lab.cfg_obj(lab.master.tree)
        as_fw2 = [p for p in make_peers(cfg, "fw2", lab.master.tree, lab.nodes["fw2"].key) if p.name == "fw3"][0]
        as_fw1 = [p for p in make_peers(cfg, "fw1", lab.master.tree, lab.master.key) if p.name == "fw3"][0]
        base = as_fw2.ssh_argv() + [f"root@{as_fw2.address}", "status"]
        got = subprocess.run(base, capture_output=True, text=True, timeout=30)
        assert got.returncode == 255 and "Permission denied" in got.stderr, got   # fw2's key: refused by fw3
        assert ask(as_fw1, "status", "status")["role"] == "BACKUP"              # fw1's key: still works
        code, r = lab.master.sync()
        assert code == 0 and fw3.live() == 2, r
    finally:
        lab.close()
