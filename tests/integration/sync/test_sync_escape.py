"""Issue 12, findings 3-5, through the real forced command over the lab's sshd: nothing a push carries leaves the
state dir (symlinks, hard links, specials, setuid bits, oversized files, rsync options), and a forged generation
neither lands nor locks the master out. Each attack fails with nothing left behind."""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sync import tree
from sync.peer import make_peers
from sync.releases import Releases
from tests.support.sync_lab import SyncLab

SECRET = "TOPSECRET-first-line-of-a-root-only-file"


def _peer(lab: SyncLab):
    return make_peers(lab.cfg_obj(lab.master.tree), "fw1", lab.master.tree, lab.master.key)[0]


def forced(lab: SyncLab, command: str) -> subprocess.CompletedProcess:
    """One command through the backup's forced command (what a holder of the sync key can send)."""
    p = _peer(lab)
    return subprocess.run(p.ssh_argv() + [f"root@{p.address}", command], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def hand_rsync(lab: SyncLab, src: Path, *opts: str, ssh: list[str] | None = None) -> subprocess.CompletedProcess:
    """A push with rsync options of the attacker's choosing (not the master's -rtp)."""
    p = _peer(lab)
    cmd = ["rsync", *opts, "-e", shlex.join(ssh or p.ssh_argv()), f"{src}/", f"root@{p.address}:staging"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def staging(lab: SyncLab) -> Path:
    return lab.backup.state / "sync" / "staging"


def outside(lab: SyncLab) -> Path:
    """A root-only directory outside every state dir, holding a root-only file."""
    d = lab.root / "outside"
    if not d.exists():
        d.mkdir(0o700)
        fd = os.open(d / "secret", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, f"{SECRET}\nsecond line\n".encode())
        os.close(fd)
    return d


def assert_nothing_left(lab: SyncLab, live: int, r: subprocess.CompletedProcess | None = None) -> None:
    """Staging empty, the live release as it was, no half-installed release, nothing new outside, no secret told."""
    assert list(staging(lab).iterdir()) == [], sorted(p.name for p in staging(lab).iterdir())
    assert lab.backup.live() == live
    rel = Releases(lab.backup.state)
    assert tree.tree_hash(rel.path(live)) == rel.meta(live)["hash"]
    assert not [p for p in rel.dir.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in outside(lab).iterdir()) == ["secret"]
    assert (outside(lab) / "secret").read_text().startswith(SECRET) and (outside(lab) / "secret").stat().st_nlink == 1
    if r is not None:
        assert SECRET not in r.stdout + r.stderr
    assert SECRET not in (lab.backup.state / "sync" / "sync.log").read_text()


def bump(lab: SyncLab, name: str) -> int:
    """A real list change synced to the backup; returns the new generation (staging then holds its tree)."""
    f = lab.master.tree / "lists" / "adult" / "domains"
    f.write_text(f.read_text() + f"{name}.example\n")
    code, r = lab.master.sync()
    assert code == 0 and lab.backup.live() == r["generation"], r
    return r["generation"]


def receive_staged(lab: SyncLab, gen: int = 3) -> subprocess.CompletedProcess:
    return forced(lab, f"receive {gen} {tree.tree_hash(staging(lab))}")


def test_state_dirs_are_private_and_staging_holds_only_the_pushed_tree(lab: SyncLab) -> None:
    code, r = lab.master.sync()
    assert code == 0, r
    for node in (lab.master, lab.backup):
        assert stat.S_IMODE((node.state / "sync").stat().st_mode) == 0o700
        # staging takes the pushed root's mode (rsync -p), never wider than 0755; only root can reach it through sync/
        assert stat.S_IMODE((node.state / "sync" / "staging").stat().st_mode) & 0o7022 == 0
        assert stat.S_IMODE(node.state.stat().st_mode) & 0o077 == 0o011
    assert not (staging(lab) / "compiled").exists() and not (staging(lab) / tree.META_FILE).exists()
    assert (lab.backup.tree / "compiled" / "filter.idx").is_file()  # the backup built its own index


def test_list_symlinked_to_a_root_only_file_is_refused_without_its_content(lab: SyncLab, tmp_path: Path) -> None:
    assert lab.master.sync()[0] == 0
    secret = outside(lab) / "secret"
    # the review's push (rsync -a: symlinks kept) is refused by the peer's rsync server before anything is written
    evil = tmp_path / "evil"
    subprocess.run(["cp", "-a", f"{lab.master.tree}/.", str(evil)], check=True)
    (evil / "lists" / "adult" / "domains").unlink()
    os.symlink(secret, evil / "lists" / "adult" / "domains")
    r = hand_rsync(lab, evil, "-a", "--delete")
    assert r.returncode != 0 and "option -D -g -l -o is not allowed" in r.stderr, r.stderr
    assert not (staging(lab) / "lists" / "adult" / "domains").is_symlink()
    # a symlink already in staging (however it got there) is refused by receive, naming the path, not the content
    target = staging(lab) / "lists" / "adult" / "domains"
    target.unlink()
    os.symlink(secret, target)
    r = receive_staged(lab)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "lists/adult/domains: a symlink" in json.loads(r.stdout)["error"]
    assert_nothing_left(lab, 2, r)


def test_compiled_symlink_to_an_outside_dir_writes_nothing_there(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0
    os.symlink(outside(lab), staging(lab) / "compiled")
    r = receive_staged(lab)
    assert r.returncode == 2 and "compiled: a symlink" in r.stderr, (r.stdout, r.stderr)
    assert_nothing_left(lab, 2, r)
    # and a real compiled/ that a push left in staging is never taken: the release gets the index it built itself
    (staging(lab) / "compiled").mkdir(0o755)
    (staging(lab) / "compiled" / "filter.idx").write_bytes(b"not an index")
    assert bump(lab, "own-index") == 3
    assert (lab.backup.tree / "compiled" / "filter.idx").read_bytes() != b"not an index"
    assert sorted(p.name for p in outside(lab).iterdir()) == ["secret"]


@pytest.mark.parametrize("name", ["node.yaml", "keys/hosts", ".rsync-partial", "lists/.rsync-partial-x", ".release.json"])
def test_node_local_and_transient_named_symlinks_are_refused(lab: SyncLab, name: str) -> None:
    assert lab.master.sync()[0] == 0
    link = staging(lab) / name
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside(lab) / "secret" if "/hosts" not in name else outside(lab), link)
    r = receive_staged(lab)
    assert r.returncode == 2 and f"{name}: a symlink" in r.stderr, (r.stdout, r.stderr)
    assert_nothing_left(lab, 2, r)
    assert (lab.backup.state / "node.yaml").read_text() == "node: fw2\n"


def test_hardlink_to_an_outside_file_is_refused(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0
    os.link(outside(lab) / "secret", staging(lab) / "lists" / "adult" / "extra")
    assert (outside(lab) / "secret").stat().st_nlink == 2
    r = receive_staged(lab)
    assert r.returncode == 2 and "lists/adult/extra: a hard link" in r.stderr, (r.stdout, r.stderr)
    assert_nothing_left(lab, 2, r)
    # rsync -H (hard links in the push) is not accepted by the peer's server either
    r = hand_rsync(lab, lab.master.tree, "-rtpH", "--delete")
    assert r.returncode != 0 and "option -H is not allowed" in r.stderr, r.stderr


def _special_tree(lab: SyncLab, root: Path) -> Path:
    subprocess.run(["cp", "-a", f"{lab.master.tree}/.", str(root)], check=True)
    os.mkfifo(root / "fifo")
    if os.geteuid() == 0:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "suid").write_text("#!/bin/sh\nid\n")
    os.chmod(root / "suid", 0o4755)
    (root / "world").write_text("x\n")
    os.chmod(root / "world", 0o666)
    (root / "sgid").mkdir()
    os.chmod(root / "sgid", 0o2777)
    return root


def _rewriting_ssh(lab: SyncLab, tmp_path: Path) -> list[str]:
    """A remote shell that rewrites the rsync server command to look harmless (-rtp) while the client runs -rtpDogl:
    the server must not trust the client's flags to describe what it sends."""
    script = tmp_path / "rewrite-ssh"
    script.write_text(
        f"#!{sys.executable}\nimport os, re, sys\nargs = sys.argv[1:]\ni = args.index('rsync')\n"
        "args[i:] = [re.sub(r'^-[a-zA-Z]*?(e\\.)', r'-tpr\\1', a) if a.startswith('-') and not a.startswith('--') else a"
        " for a in args[i:]]\n"
        f"os.execvp('ssh', ['ssh', *{_peer(lab).ssh_argv()[1:]!r}, *args])\n")
    script.chmod(0o755)
    return [str(script)]


def test_fifo_device_setuid_pushes_leave_no_special_file_or_bit(lab: SyncLab, tmp_path: Path) -> None:
    assert lab.master.sync()[0] == 0
    src = _special_tree(lab, tmp_path / "special")
    # the flags the review used: refused by the server, with one clear line, nothing written
    for opts in (["-rtpDog", "--delete"], ["-a", "--delete"], ["-rtp", "--devices", "--specials", "--delete"]):
        r = hand_rsync(lab, src, *opts)
        assert r.returncode != 0 and "is not allowed" in r.stderr, (opts, r.stderr)
        assert not any((staging(lab) / n).exists() for n in ("fifo", "null", "suid", "world", "sgid")), opts
    # a client lying about its flags: the server runs its own (-rtp), the streams disagree, rsync stops
    r = hand_rsync(lab, src, "-rtpDogl", "--delete", ssh=_rewriting_ssh(lab, tmp_path))
    assert r.returncode != 0, r.stderr
    # plain -rtp of the same tree: the server strips the bits; no FIFO or device reaches staging
    r = hand_rsync(lab, src, "-rtp", "--delete")
    assert r.returncode in (0, 23), r.stderr
    for p in [staging(lab), *staging(lab).rglob("*")]:
        st = p.lstat()
        assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), p
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022), (p, oct(st.st_mode))
    assert stat.S_IMODE((staging(lab) / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((staging(lab) / "world").stat().st_mode) == 0o644
    # what the attacker hashed (with its bits) is not what was staged: refused, staging emptied
    r = forced(lab, f"receive 3 {tree.tree_hash(src)}")
    assert r.returncode != 0 and lab.backup.live() == 2, r.stderr
    assert_nothing_left(lab, 2, r)
    # the staged files planted with their bits anyway are refused by the check
    assert bump(lab, "after-special") == 3
    (staging(lab) / "suid").write_text("x")
    os.chmod(staging(lab) / "suid", 0o4755)
    os.mkfifo(staging(lab) / "fifo")
    r = receive_staged(lab, 4)
    assert r.returncode == 2 and "suid: mode 4755 has setuid" in r.stderr and "fifo: a FIFO" in r.stderr, r.stderr
    assert_nothing_left(lab, 3, r)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    # the default cap (a live config cannot lower a peer's cap below it: a stolen push setting max_file_mb: 1 made
    # rsync skip every larger list for good); the oversized files are sparse, so they cost no disk or time
    lab = SyncLab(tmp_path)
    lab.backup.start_sshd()
    over = tree.MAX_FILE_BYTES + 1

    def sparse(path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(over)
    try:
        assert lab.master.sync()[0] == 0
        big = tmp_path / "big-tree"
        subprocess.run(["cp", "-a", f"{lab.master.tree}/.", str(big)], check=True)
        sparse(big / "lists" / "adult" / "big")
        # the peer's rsync server does not take it (--max-size), so the attacker's hash cannot match
        r = hand_rsync(lab, big, "-rtp", "--delete")
        assert not (staging(lab) / "lists" / "adult" / "big").exists(), r.stderr
        r = forced(lab, f"receive 3 {tree.tree_hash(big)}")
        assert r.returncode == 1 and "does not match" in r.stderr, r.stderr
        assert_nothing_left(lab, 2, r)
        # placed in staging some other way: the check refuses it by size
        assert bump(lab, "after-big") == 3
        sparse(staging(lab) / "big")
        r = receive_staged(lab, 4)
        assert r.returncode == 2 and f"big: {over} bytes, over the cap of {tree.MAX_FILE_BYTES}" in r.stderr, r.stderr
        assert_nothing_left(lab, 3, r)
        # and the master refuses to cut it in the first place
        sparse(lab.master.tree / "lists" / "adult" / "big")
        code, out = lab.master.sync()
        assert code == 2 and "over the cap" in out["error"], out
        assert lab.backup.live() == 3
    finally:
        lab.close()


def test_forged_generation_is_refused_and_a_forced_sync_recovers(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0
    digest = Releases(lab.backup.state).meta(2)["hash"]
    r = forced(lab, f"receive 999999999 {digest}")
    assert r.returncode == 4 and "more than 1000 above the live generation 2" in r.stderr, r.stderr
    assert_nothing_left(lab, 2, r)
    # with --force the key holder can still set it; the master is not locked out by it
    assert hand_rsync(lab, lab.master.tree, "-rtp", "--delete").returncode == 0
    r = forced(lab, f"receive 999999999 {digest} --force")
    assert r.returncode == 0 and lab.backup.live() == 999999999, r.stderr
    assert "WARNING receive --force from 127.0.0.1: generation 999999999" in (lab.backup.state / "sync" / "sync.log").read_text()
    code, out = lab.master.sync()
    assert code == 4 and "fw2 has generation 999999999" in out["error"], out
    code, out = lab.master.sync("--force")
    assert code == 0 and out["generation"] == 3 and "out of range" in " ".join(out["reasons"]), out
    assert lab.backup.live() == lab.master.live() == 3
    assert 999999999 not in Releases(lab.backup.state).generations()
    assert "WARNING sync --force on fw1" in (lab.master.state / "sync" / "sync.log").read_text()
    assert "WARNING receive --force from 127.0.0.1: generation 3" in (lab.backup.state / "sync" / "sync.log").read_text()
    code, out = lab.master.sync()
    assert code == 0 and out["peers"][0]["action"] == "up-to-date", out
