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
