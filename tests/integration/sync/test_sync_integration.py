"""Acceptance of `appliance sync` with a real sshd and real rsync on loopback: guards, crash safety, rollback."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from sync import tree
from sync.lock import held
from sync.releases import Releases
from tests.support.env import APPLIANCE
from tests.support.sync_lab import SyncLab
from tests.support.wait import poll


def add_domain(node, domain: str, category: str = "adult") -> None:
    f = node.tree / "lists" / category / "domains"
    f.write_text(f.read_text() + f"{domain}\n")


def domains(node, category: str = "adult") -> str:
    return (node.tree / "lists" / category / "domains").read_text()


def test_list_change_reaches_backup_and_old_release_is_pristine(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0  # generation 2 everywhere
    add_domain(lab.master, "newly-blocked.example")
    code, r = lab.master.sync()
    assert code == 0 and r["generation"] == 3, r
    p = r["peers"][0]
    # the list, and the compiled index built from it inside the tree
    assert "lists/adult/domains" in p["changed"] and set(p["changed"]) <= {"lists/adult/domains", "compiled/filter.idx"}, p
    assert p["added"] == [] and p["removed"] == [], p
    assert p["bytes_sent"] > 0
    assert "newly-blocked.example" in domains(lab.backup)
    # the master's generation 2 was edited in place; it was put back as it went live
    assert "newly-blocked.example" not in (lab.master.state / "releases" / "2" / "lists" / "adult" / "domains").read_text()
    listing = json.loads(lab.master.appliance("releases", "--json", check=True).stdout)["releases"]
    assert all(x["intact"] for x in listing), listing
    # a removed file is reported as removed
    os.unlink(lab.master.tree / "lists" / "social" / "urls") if (lab.master.tree / "lists" / "social" / "urls").exists() else None
    (lab.master.tree / "lists" / "social" / "extra").write_text("x\n")
    code, r = lab.master.sync()
    assert code == 0 and "lists/social/extra" in r["peers"][0]["added"], r
    assert (lab.backup.tree / "lists" / "social" / "extra").exists()


def test_invalid_config_on_master_is_refused_and_nothing_moves(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0
    cfg = lab.master.tree / "appliance.yaml"
    cfg.write_text(cfg.read_text().replace("vhid: 1", "vhid: 300"))
    code, r = lab.master.sync()
    assert code == 2 and "cluster.vhid" in r["error"], r
    assert lab.master.live() == 2 and lab.backup.live() == 2
    assert "vhid: 1\n" in (lab.backup.tree / "appliance.yaml").read_text()


def test_invalid_staged_tree_is_refused_by_the_peer_with_the_validators_message(lab: SyncLab, tmp_path: Path) -> None:
    from sync.peer import make_peers, rsync_to

    assert lab.master.sync()[0] == 0
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(lab.master.tree, bad, symlinks=True)
    shutil.rmtree(bad / "lists" / "malware")  # block: [.., malware, ..] now names a missing directory
    peer = make_peers(lab.cfg_obj(lab.master.tree), "fw1", lab.master.tree, lab.master.key)[0]
    rsync_to(peer, bad)
    code, out, err = peer.run(f"receive 9 {tree.tree_hash(bad)}")
    assert code == 2, (out, err)
    reply = json.loads(out)  # the peer answers in JSON; its stderr is for people
    assert reply["ok"] is False and reply["code"] == 2, reply
    assert "filter.block" in reply["error"] and "malware" in reply["error"], reply
    assert "filter.block" in err
    assert lab.backup.live() == 2 and (lab.backup.tree / "lists" / "malware").is_dir()
    # a hash that does not match what was staged (cut-off transfer) is refused too
    code, out, err = peer.run(f"receive 9 {'0' * 64}")
    assert code == 1 and "does not match" in err and lab.backup.live() == 2
    # and the next real sync puts the staging dir right and completes
    add_domain(lab.master, "after-bad.example")
    code, r = lab.master.sync()
    assert code == 0 and lab.backup.live() == 3 and "after-bad.example" in domains(lab.backup), r


def test_rsync_killed_mid_transfer_leaves_old_release_live_and_next_sync_completes(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0
    rnd = random.Random(7)
    big = lab.master.tree / "lists" / "malware" / "domains"
    content = "".join(f"h{i}-{rnd.getrandbits(64):016x}.example\n" for i in range(150_000))  # ~4.5 MB
    big.write_text(content)
    proc = subprocess.Popen([APPLIANCE, "sync", "--json", "--bwlimit", "300"], env=lab.master.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    staged = lab.backup.state / "sync" / "staging"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            partial = [p for p in staged.rglob(".*") if p.is_file() and p.name != ".release.json"] if staged.is_dir() else []
            if partial and max(p.stat().st_size for p in partial) > 50_000:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("the transfer never started")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert lab.backup.live() == 2
    assert "h0-" not in domains(lab.backup, "malware")
    assert tree.tree_hash(lab.backup.tree) == Releases(lab.backup.state).meta(2)["hash"]
    # the master already cut generation 3 before the transfer; the next sync completes it
    code, r = lab.master.sync()
    assert code == 0, r
    assert lab.backup.live() == lab.master.live() == 3
    assert domains(lab.backup, "malware") == content == domains(lab.master, "malware")


def test_stale_generation_is_refused_unless_forced(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0
    # while fw1 was away, fw2 served as master and cut generation 3
    b = Releases(lab.backup.state)
    (lab.backup.tree / "lists" / "adult" / "domains").write_text(domains(lab.backup) + "changed-on-fw2.example\n")
    b.install(lab.backup.tree, 3, tree.tree_hash(lab.backup.tree), "cut on fw2", carry_from=lab.backup.tree)
    b.activate(3)
    add_domain(lab.master, "old-master-change.example")
    code, r = lab.master.sync()
    assert code == 4 and "fw2 has generation 3, newer than ours (2)" in r["error"], r
    assert lab.backup.live() == 3 and "changed-on-fw2.example" in domains(lab.backup)
    assert lab.master.live() == 2  # nothing cut on the master either
    code, r = lab.master.sync("--force")
    assert code == 0 and r["generation"] == 4, r
    assert lab.backup.live() == 4 and "old-master-change.example" in domains(lab.backup)


def test_backup_does_not_push(lab: SyncLab) -> None:
    add_domain(lab.backup, "edited-on-backup.example")
    code, r = lab.backup.sync()
    assert code == 0 and "not MASTER" in r["skipped"], r
    assert lab.backup.live() == 1 and lab.master.live() == 1
    assert "not MASTER" in (lab.backup.state / "sync" / "sync.log").read_text()
    r = lab.backup.appliance("sync")
    assert r.returncode == 0 and "not MASTER" in r.stdout


def test_split_brain_is_refused(lab: SyncLab) -> None:
    lab.backup.role("MASTER")
    add_domain(lab.master, "split.example")
    code, r = lab.master.sync()
    assert code == 3 and "split brain" in r["error"] and "fw2" in r["error"], r
    assert lab.master.live() == 1 and lab.backup.live() == 1
    assert "split.example" not in domains(lab.backup)
    assert "split brain" in (lab.master.state / "sync" / "sync.log").read_text()


def test_rollback_on_backup_and_on_master(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0
    add_domain(lab.master, "gen3.example")
    assert lab.master.sync()[0] == 0
    assert lab.backup.live() == 3
    r = lab.backup.appliance("releases", "--rollback", "2", "--json", check=True)
    assert json.loads(r.stdout)["previous"] == 3
    assert lab.backup.live() == 2 and "gen3.example" not in domains(lab.backup)
    r = lab.backup.appliance("releases", "--rollback", "17")
    assert r.returncode == 2 and "no such release" in r.stderr and lab.backup.live() == 2
    # on the master a rollback goes out as a new generation with the old content
    lab.master.appliance("releases", "--rollback", "2", check=True)
    code, r = lab.master.sync()
    assert code == 0 and r["generation"] == 4 and r["cut"], r
    assert lab.backup.live() == 4 and "gen3.example" not in domains(lab.backup)
    assert tree.tree_hash(lab.backup.tree) == tree.tree_hash(lab.master.state / "releases" / "2")


def test_lock_refuses_a_concurrent_sync(lab: SyncLab) -> None:
    with held(lab.master.state / "run"):
        code, r = lab.master.sync()
    assert code == 5 and "another sync is running" in r["error"], r
    assert lab.backup.live() == 1


def test_wait_outlasts_a_running_sync_and_bad_wait_is_refused(lab: SyncLab) -> None:
    """`sync --wait N`: an admin's sync started while the timer's holds the lock waits for it instead of exit 5."""
    release = threading.Event()

    def hold() -> None:
        with held(lab.master.state / "run"):
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        time.sleep(0.3)
        threading.Timer(2.0, release.set).start()
        t0 = time.monotonic()
        code, r = lab.master.sync("--wait", "60")
        waited = time.monotonic() - t0
    finally:
        release.set()
        holder.join(10)
    assert code == 0 and r["ok"], r
    assert waited >= 1.5, f"sync did not wait for the lock ({waited:.1f} s)"
    r = lab.master.appliance("sync", "--wait", "-1")
    assert r.returncode == 2 and "--wait" in r.stderr


def test_three_nodes_one_failing_peer_does_not_stop_the_other(tmp_path: Path) -> None:
    lab3 = SyncLab(tmp_path, peers=2)
    try:
        lab3.nodes["fw2"].start_sshd()  # fw3 has no sshd: connection refused
        add_domain(lab3.master, "three.example")
        code, r = lab3.master.sync()
        assert code == 1 and r["failed"] == ["fw3"], r
        by = {p["peer"]: p for p in r["peers"]}
        assert by["fw2"]["action"] == "pushed" and by["fw3"]["action"] == "failed" and "fw3" in by["fw3"]["error"]
        assert lab3.nodes["fw2"].live() == 2 and "three.example" in domains(lab3.nodes["fw2"])
        lab3.nodes["fw3"].start_sshd()
        code, r = lab3.master.sync()
        assert code == 0, r
        by = {p["peer"]: p["action"] for p in r["peers"]}
        assert by == {"fw2": "up-to-date", "fw3": "pushed"} and lab3.nodes["fw3"].live() == 2
    finally:
        lab3.close()


def test_dry_run_changes_nothing(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0
    add_domain(lab.master, "dry.example")
    code, r = lab.master.sync("--dry-run")
    assert code == 0 and r["peers"][0]["action"] == "would-push" and "lists/adult/domains" in r["peers"][0]["changed"], r
    assert lab.master.live() == 2 and lab.backup.live() == 2 and "dry.example" not in domains(lab.backup)


def test_list_change_is_enforced_by_the_backups_proxy_without_restart(tmp_path: Path) -> None:
    """The acceptance path: master list edit -> `appliance sync` -> backup swaps + SIGHUPs its running proxy."""
    from tests.support.proxy import Proxy, fetch, start_origin

    lab2 = SyncLab(tmp_path, mutate=lambda d: d["proxy"].update(workers=1))
    srv, oport = start_origin()
    proxy = None
    try:
        lab2.backup.start_sshd()
        proxy = Proxy(lab2.backup.config, lab2.backup.state, clock=None).wait_ready()
        pid = proxy.proc.pid
        url = f"http://127.0.0.1:{oport}/synced"
        assert fetch(proxy.port, url)[0] == 200
        add_domain(lab2.master, "127.0.0.1")
        code, r = lab2.master.sync()
        assert code == 0 and r["peers"][0]["receive"]["proxy"].startswith("reloaded proxy pid"), r
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            status, body, _ = fetch(proxy.port, url, accept="text/plain")
            if status == 403:
                break
            time.sleep(0.2)
        assert status == 403, "the backup's proxy did not enforce the synced list"
        assert b"lists/adult/domains" in body
        assert proxy.proc.poll() is None and proxy.proc.pid == pid  # reloaded, not restarted
        # an invalid config pushed at the backup is refused and the proxy keeps serving the last good rules
        cfg = lab2.master.tree / "appliance.yaml"
        data = yaml.safe_load(cfg.read_text())
        data["filter"]["block"].append("nosuchcategory")
        cfg.write_text(yaml.safe_dump(data, sort_keys=False))
        code, r = lab2.master.sync()
        assert code == 2 and "nosuchcategory" in r["error"], r
        assert fetch(proxy.port, url)[0] == 403 and lab2.backup.live() == 2
    finally:
        if proxy:
            proxy.stop()
        srv.shutdown()
        lab2.close()


def _receiver_pids(state: Path) -> list[int]:
    """PIDs of the peer's `sync-serve` processes running a `receive` for this state dir (children of our sshd)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"APPLIANCE_STATE_DIR={state}".encode() in env and any(e.startswith(b"SSH_ORIGINAL_COMMAND=receive ") for e in env):
            out.append(int(p.name))
    return out


def test_receiver_killed_mid_check_leaves_old_release_live_and_next_sync_completes(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0
    rnd = random.Random(11)
    content = "".join(f"r{i}-{rnd.getrandbits(48):012x}.example\n" for i in range(300_000))
    (lab.master.tree / "lists" / "malware" / "domains").write_text(content)
    proc = subprocess.Popen([APPLIANCE, "sync", "--json"], env=lab.master.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed and proc.poll() is None:
            for pid in _receiver_pids(lab.backup.state):
                os.kill(pid, signal.SIGKILL)  # the receiver (it checks, then swaps): cut off mid-way
                killed.append(pid)
            time.sleep(0.01)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert killed, "never saw the receiver running"
    r = json.loads(out)
    assert proc.returncode == 1 and r["failed"] == ["fw2"], r
    assert lab.backup.live() == 2 and "r0-" not in domains(lab.backup, "malware")
    assert tree.tree_hash(lab.backup.tree) == Releases(lab.backup.state).meta(2)["hash"]
    time.sleep(0.5)  # let the orphaned list compiler of the killed receiver finish or die
    code, r = lab.master.sync()
    assert code == 0 and r["peers"][0]["action"] == "pushed", r
    assert lab.backup.live() == 3 and domains(lab.backup, "malware") == content


def test_peer_not_backup_is_not_pushed_and_human_output(lab: SyncLab) -> None:
    lab.backup.role("INIT")
    code, r = lab.master.sync()
    assert code == 1 and "fw2 says INIT, not BACKUP" in r["peers"][0]["error"] and lab.backup.live() == 1, r
    lab.backup.role("BACKUP")
    # the table an admin sees, through a pseudo-terminal (rich progress bar on a TTY)
    res = subprocess.run(["script", "-qec", f"{APPLIANCE} sync", "/dev/null"], env=lab.master.env(), capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fw2" in res.stdout and "pushed" in res.stdout and "OK in" in res.stdout
    assert lab.backup.live() == 2


def test_list_parse_error_under_reject_is_refused_with_file_and_line(lab: SyncLab) -> None:
    """The list compiler (`check --compile`) is part of the check: its file:line message comes back."""
    assert lab.master.sync()[0] == 0
    cfg = lab.master.tree / "appliance.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["filter"]["bad_lines"] = "reject"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    add_domain(lab.master, "bad domain!!")
    code, r = lab.master.sync()
    assert code == 2 and "lists/adult/domains:" in r["error"] and "bad domain!!" in r["error"], r
    assert lab.master.live() == 2 and lab.backup.live() == 2 and "bad domain" not in domains(lab.backup)


def test_after_failover_the_new_master_pushes_back_and_both_agree(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0
    fw1, fw2 = lab.master, lab.backup
    fw1.role("BACKUP")
    fw2.role("MASTER")
    fw1.start_sshd()  # fw2 connects from its own sync address 127.0.0.2 (fw1's key line only allows that)
    add_domain(fw2, "changed-while-fw2-served.example")
    assert fw1.sync()[0] == 0 and fw1.live() == 2  # fw1 is BACKUP now: no-op
    code, r = fw2.sync()
    assert code == 0 and r["generation"] == 3 and r["peers"][0]["peer"] == "fw1", r
    assert fw1.live() == 3 and "changed-while-fw2-served.example" in domains(fw1)
    # fw1 takes over again (preempt): nothing changed since, so nothing is cut and fw2 is up to date
    fw1.role("MASTER")
    fw2.role("BACKUP")
    code, r = fw1.sync()
    assert code == 0 and not r["cut"] and r["peers"][0]["action"] == "up-to-date", r


def test_one_push_is_one_ssh_connection_closed_at_the_end(lab: SyncLab) -> None:
    """status, rsync and receive share one connection (each is still a session the forced command dispatches), and
    the push ends it: no background ssh master outlives `appliance sync`."""
    log = lab.backup.state.parent / "sshd-fw2" / "sshd.log"
    before = len(log.read_text(errors="replace"))
    since = lambda: log.read_text(errors="replace")[before:]  # noqa: E731 - what sshd logged during this push
    add_domain(lab.master, "one-connection.example")
    code, r = lab.master.sync()
    assert code == 0 and r["peers"][0]["action"] == "pushed", r
    assert since().count("Accepted publickey") == 1, since()
    assert "one-connection.example" in domains(lab.backup)
    poll(lambda: "Disconnected from" in since(), 10, step=0.1)
    assert "Disconnected from" in since(), since()
