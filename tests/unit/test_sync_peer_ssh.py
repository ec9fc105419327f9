"""The master's sync commands go through the OpenSSH client (sync/peer.py): the argv it runs, and how ssh's own
failures, a peer that does not answer, and a peer's refusal reach the caller (a fake `ssh` on PATH)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sync.errors import PEER_FAILED, SyncError
from sync.peer import Peer, remote_status

FAKE = """#!{py}
import json, os, sys, time
open(os.environ["FAKE_SSH_LOG"], "w").write(json.dumps(sys.argv[1:]))
mode = os.environ["FAKE_SSH_MODE"]
if mode == "hostkey":
    sys.stderr.write("Host key verification failed.\\n"); sys.exit(255)
if mode == "hang":
    time.sleep(30)
if mode == "refuse":
    print(json.dumps({{"ok": False, "code": 2, "error": "unknown sync command 'x'"}})); sys.exit(2)
if mode == "flood":
    sys.stdout.write("a" * 3000000); sys.exit(0)
if mode == "bigerr":
    sys.stderr.write("\\x1b[2J\\x1b[31m" + "e" * 3000000 + "\\n"); sys.exit(255)
if mode == "nasty-refusal":
    print(json.dumps({{"ok": False, "code": 2, "error": "first\\nsecond\\x1b[31m" + "x" * 500000}})); sys.exit(2)
print(json.dumps({{"ok": True, "role": "BACKUP", "generation": 3}}))
"""


@pytest.fixture
def peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Peer:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(FAKE.format(py=sys.executable))
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SSH_LOG", str(tmp_path / "argv.json"))
    (tmp_path / "key").write_text("a key\n")
    return Peer("fw2", "10.9.9.2", 2222, "appliance-sync", tmp_path / "key", tmp_path / "known_hosts", "10.9.9.1", 5)


def test_status_through_ssh_with_the_pinned_key_only(peer: Peer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_SSH_MODE", "ok")
    assert remote_status(peer) == {"ok": True, "role": "BACKUP", "generation": 3}
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[-2:] == ["appliance-sync@10.9.9.2", "status"] and "-T" in argv
    opts = {argv[i + 1] for i, a in enumerate(argv) if a == "-o"}
    assert {"StrictHostKeyChecking=yes", "BatchMode=yes", "IdentitiesOnly=yes", "GlobalKnownHostsFile=/dev/null",
            f"UserKnownHostsFile={tmp_path / 'known_hosts'}"} <= opts
    assert argv[argv.index("-F") + 1] == "/dev/null" and argv[argv.index("-b") + 1] == "10.9.9.1"
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-i") + 1] == str(tmp_path / "key")


def test_a_host_key_that_is_not_pinned_is_the_error(peer: Peer, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_SSH_MODE", "hostkey")
    with pytest.raises(SyncError) as e:
        remote_status(peer)
    assert e.value.exit_code == PEER_FAILED and str(e.value) == "fw2 (10.9.9.2:2222): ssh: Host key verification failed."


def test_a_peer_that_does_not_answer_is_bounded(peer: Peer, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_SSH_MODE", "hang")
    peer.timeout = 0.2  # the command gets 10 x sync.timeout
    with pytest.raises(SyncError) as e:
        peer.run("status")
    assert e.value.exit_code == PEER_FAILED and "no answer to 'status' within 2.0 s" in str(e.value)


def test_the_peers_refusal_keeps_its_code(peer: Peer, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_SSH_MODE", "refuse")
    with pytest.raises(SyncError) as e:
        remote_status(peer)
    assert e.value.exit_code == 2 and "unknown sync command" in str(e.value)


def test_a_missing_key_is_refused_before_ssh_runs(peer: Peer, tmp_path: Path, monkeypatch) -> None:
    """ssh drops an -i file it cannot read and offers root's own ~/.ssh keys instead: never get that far."""
    monkeypatch.setenv("FAKE_SSH_MODE", "ok")
    (tmp_path / "key").unlink()
    with pytest.raises(SyncError) as e:
        remote_status(peer)
    assert e.value.exit_code == PEER_FAILED and "key: missing" in str(e.value)
    assert not (tmp_path / "argv.json").exists()


@pytest.mark.parametrize("mode", ["flood", "bigerr"])
def test_a_peer_that_says_too_much_is_cut_off(peer: Peer, monkeypatch, mode: str) -> None:
    monkeypatch.setenv("FAKE_SSH_MODE", mode)
    with pytest.raises(SyncError) as e:
        remote_status(peer)
    assert "is over 1048576 bytes: not read" in str(e.value) and len(str(e.value)) < 300


def test_the_peers_words_are_one_bounded_line(peer: Peer, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_SSH_MODE", "nasty-refusal")
    with pytest.raises(SyncError) as e:
        remote_status(peer)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg and "\x1b" not in msg and len(msg) < 400, msg[:500]
    assert msg.startswith("fw2: status failed: first second")


def test_a_cancelled_receive_whose_pipes_another_process_holds_is_bounded() -> None:
    """On a shared connection the ssh master holds the other end of a session's pipes: a receive that does not end
    on end of file is killed and its pipes closed, not read to an end of file that never comes (review, F1)."""
    import os
    import signal
    import subprocess
    import time

    from sync.peer import cancel_receive

    started = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; exec sleep 60"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    holder = int(started.stdout.readline())  # the stand-in for the master: it keeps stdout and stderr open
    try:
        t0 = time.monotonic()
        cancel_receive(started, timeout=0.5)
        assert time.monotonic() - t0 < 10
        assert started.returncode is not None and started.stdout.closed and started.stderr.closed
    finally:
        os.kill(holder, signal.SIGKILL)


def test_control_sockets_only_in_a_directory_that_is_ours_alone(tmp_path: Path, monkeypatch) -> None:
    """The mux directory has a predictable name under /tmp: one that is a symlink, open to others or someone else's
    is never used (no sharing then, the push still works)."""
    import shutil
    import tempfile

    import sync.peer as peermod

    root = Path(tempfile.mkdtemp(prefix="m", dir="/tmp"))  # short, as /tmp is: a socket path has a length limit
    monkeypatch.setattr(peermod, "MUX_ROOT", root)
    try:
        _check_mux_dir(peermod, root, tmp_path)
    finally:
        shutil.rmtree(root)


def _check_mux_dir(peermod, root: Path, tmp_path: Path) -> None:
    import os

    d = peermod.mux_dir()
    assert d == root / f"carpguard-sync-{os.geteuid()}" and (d.stat().st_mode & 0o777) == 0o700
    d.chmod(0o755)
    assert peermod.mux_dir() is None
    d.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    d.symlink_to(tmp_path / "elsewhere")
    assert peermod.mux_dir() is None
    p = Peer("fw2", "127.0.0.1", 22, "root", tmp_path / "key", tmp_path / "kh", None, 5)
    with peermod.shared_connections([p], "/state"):
        assert p.control is None and "ControlPath" not in " ".join(p.ssh_argv())
    d.unlink()
    with peermod.shared_connections([p], "/state"):
        assert p.control is not None and p.control.parent == d and f"ControlPath={p.control}" in p.ssh_argv()
    assert p.control is None
