"""The sync harness end to end: first sync, pinned host keys, the forced command's refusals."""
from __future__ import annotations

import json
import subprocess

from sync import keys as keymod
from tests.support.sync_lab import SyncLab


def test_first_sync_cuts_generation_and_both_sides_agree(lab: SyncLab) -> None:
    code, r = lab.master.sync()
    assert code == 0, r
    assert r["cut"] and r["generation"] == 2 and r["peers"][0]["action"] == "pushed", r
    assert lab.master.live() == 2 and lab.backup.live() == 2
    st = json.loads(lab.backup.appliance("releases", "--json", check=True).stdout)
    mt = json.loads(lab.master.appliance("releases", "--json", check=True).stdout)
    assert [x["hash"] for x in st["releases"] if x["live"]] == [x["hash"] for x in mt["releases"] if x["live"]]
    # node-local files are carried, never synced
    assert not (lab.backup.tree / "node.yaml").exists()
    code, r = lab.master.sync()
    assert code == 0 and not r["cut"] and r["peers"][0]["action"] == "up-to-date", r


def test_unpinned_host_key_is_refused(lab: SyncLab) -> None:
    kh = keymod.known_hosts(lab.master.tree)
    other = lab.root / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    cfg = lab.cfg_obj(lab.master.tree)
    kh.write_text("\n".join(keymod.known_hosts_lines(cfg, {"fw2": other.with_suffix(".pub").read_text()})) + "\n")
    code, r = lab.master.sync()
    assert code == 1 and not r["ok"] and r["failed"] == ["fw2"], r
    assert "fw2" in r["peers"][0]["error"] and "Host key verification failed" in r["peers"][0]["error"], r
    assert lab.backup.live() == 1


def test_forced_command_refuses_shell_and_foreign_rsync(lab: SyncLab) -> None:
    from sync.peer import make_peers

    peer = make_peers(lab.cfg_obj(lab.master.tree), "fw1", lab.master.tree, lab.master.key)[0]
    base = peer.ssh_argv() + [f"root@{peer.address}"]
    r = subprocess.run(base + ["cat /etc/shadow"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown sync command 'cat'" in r.stderr
    r = subprocess.run(base + ["rsync --server --sender -logDtpre.iLsfxCIvu . /etc/"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--sender is not allowed" in r.stderr
    r = subprocess.run(base + ["rsync --server -logDtpre.iLsfxCIvu --delete . staging/../../"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "'..'" in r.stderr
    r = subprocess.run(base + ["receive 0 " + "a" * 64], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "not a generation number" in r.stderr
    assert lab.backup.live() == 1
