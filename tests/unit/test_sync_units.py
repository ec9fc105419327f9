"""Unit tests of sync payload validation, tree hashing, releases and the receive checks (no SSH)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from appliance.core.paths import Paths
from appliance.core.state import write_role
from sync import tree
from sync.errors import BAD_INPUT, BUSY, SPLIT_BRAIN, STALE, SyncError, failure_reply, from_reply
from sync.lock import held
from sync.peer import parse_rsync_output
from sync.push import plan_cut, stale_peers
from sync.receive import receive, rollback, status
from sync.releases import Releases, mirror, parse_generation, parse_hash
from sync.serve import dispatch, parse_receive, rsync_server_argv
from tests.support.env import APPLIANCE, config_tree

STAGING = Path("/var/lib/appliance/sync/staging")
GOOD = ["rsync", "--server", "-tpre.iLsfxCIvu", "--log-format=%i", "--timeout=30", "--delete", "--stats", "--partial", ".", "staging"]


@pytest.fixture(autouse=True)
def _no_compile(monkeypatch):
    monkeypatch.setenv("APPLIANCE_SYNC_NO_COMPILE", "1")  # the config validator only; the compile path runs in the integration tests


# ---------------------------------------------------------------- rsync server args


def test_rsync_args_ok_and_target_rewritten() -> None:
    argv = rsync_server_argv(GOOD, STAGING, 5 << 20)
    # the peer's own options, whatever the client sent: its capability string kept, -n passed on
    assert argv[1:] == ["--server", "-rtpe.iLsfxCIvu", "--log-format=%i", "--timeout=30", "--no-l", "--no-D", "--no-o",
                        "--no-g", "--delete", "--partial", "--chmod=go-w,ug-s,-t", f"--max-size={5 << 20}", ".", f"{STAGING}/"]
    assert rsync_server_argv(GOOD[:-1] + [f"{STAGING}/"], STAGING)[-1] == f"{STAGING}/"
    dry = ["rsync", "--server", "-ntpre.iLsfxCIvu", "--delete-during", ".", "staging"]
    assert rsync_server_argv(dry, STAGING)[2] == "-nrtpe.iLsfxCIvu"


@pytest.mark.parametrize("argv,needle", [
    (["rsync", "--server", "--sender", "-logDtpre.iLsfxCIvu", ".", "staging"], "--sender is not allowed"),
    (["rsync", "--server", "-logDtpre.iLsfxCIvu", ".", "staging/../../etc"], "'..'"),
    (["rsync", "--server", "-logDtpre.iLsfxCIvu", ".", "/etc/"], "is not the staging dir"),
    (["rsync", "--server", "-logDtpre.iLsfxCIvu", ".", "staging", "/etc"], "exactly one target"),
    (["rsync", "--server", "-tpre.iLsfxCIvu", "--delete", "--temp-dir=/etc", ".", "staging"], "not allowed"),
    (["rsync", "--server", "-tpre.iLsfxCIvu", "--delete", "--log-file=/etc/passwd", ".", "staging"], "not allowed"),
    (["rsync", "--server", "-tpre.iLsfxCIvu", "--delete", "--partial-dir=../../x", ".", "staging"], "not allowed"),
    (["rsync", "--server", "-T/tmp", ".", "staging"], "not allowed"),
    (["rsync", "--server", "-logDtpre.iLsfxCIvu", "--delete", ".", "staging"], "option -D -g -l -o is not allowed"),
    (["rsync", "--server", "-tpre.iLsfxCIvu", "--delete", "--devices", ".", "staging"], "option '--devices' is not allowed"),
    (["rsync", "--server", "-Htpre.iLsfxCIvu", "--delete", ".", "staging"], "option -H is not allowed"),
    (["rsync", "--server", "-ltpre.iLsfxCIvu", "--delete", ".", "staging"], "option -l is not allowed"),
    (["rsync", "--server", "-tpre.iLsfxCIvu", "--delete", "--max-size=9G", ".", "staging"], "not allowed"),
    (["rsync", "--server", "-tpre.iLsfxCIvu", "--delete", "--chmod=u+s", ".", "staging"], "not allowed"),
    (["rsync", "--server", "-tpe.iLsfxCIvu", "--delete", ".", "staging"], "-r --delete"),
    (["rsync", "--server", "-tpre.iLsfxCIvu", ".", "staging"], "-r --delete"),
    (["rsync", "--server", "-logDtpre.iLsfxCIvu", "staging"], "missing the `.`"),
    (["rsync", "-logDtpre.iLsfxCIvu", ".", "staging"], "expected `rsync --server"),
    (["rsync", "--server", "-tpre.iLsfxCIvu", "--delete", "--timeout=abc", ".", "staging"], "bad value for --timeout"),
])
def test_rsync_args_refused(argv, needle) -> None:
    with pytest.raises(SyncError) as e:
        rsync_server_argv(argv, STAGING)
    assert needle in str(e.value) and e.value.exit_code == BAD_INPUT


# ---------------------------------------------------------------- generations, hashes, receive args


@pytest.mark.parametrize("text", ["0", "-1", "01", "1.5", "1e3", "", " 3", "9999999999", "abc", "3;rm -rf /"])
def test_bad_generation_numbers(text) -> None:
    with pytest.raises(SyncError, match="not a generation number") as e:
        parse_generation(text)
    assert e.value.exit_code == BAD_INPUT


def test_good_generation_and_hash() -> None:
    assert parse_generation("42") == 42
    assert parse_hash("ab" * 32) == "ab" * 32
    for bad in ("AB" * 32, "ab" * 31, "zz" * 32, "../" * 20):
        with pytest.raises(SyncError, match="not a SHA-256"):
            parse_hash(bad)


def test_receive_args() -> None:
    assert parse_receive(["receive", "3", "a" * 64, "--force"]) == (3, "a" * 64, True)
    assert parse_receive(["receive", "3", "a" * 64]) == (3, "a" * 64, False)
    for bad in (["receive"], ["receive", "3"], ["receive", "3", "a" * 64, "--yes"], ["receive", "3", "a" * 64, "x", "y"]):
        with pytest.raises(SyncError) as e:
            parse_receive(bad)
        assert e.value.exit_code == BAD_INPUT


def test_dispatch_refuses_shells_and_unknown_commands(tmp_path) -> None:
    paths = Paths(tmp_path)
    for command, needle in ((None, "no shell"), ("sh -c 'id'", "unknown sync command 'sh'"),
                            ("status 'unterminated", "cannot parse"), ("receive 1 ../../../etc", "not a SHA-256"),
                            ("sync-receive 0 " + "a" * 64, "not a generation number")):
        with pytest.raises(SyncError, match=needle) as e:
            dispatch(command, paths)
        assert e.value.exit_code == BAD_INPUT
        assert failure_reply(e.value) == {"ok": False, "code": BAD_INPUT, "error": str(e.value)}
    assert "refused sync command \"sh -c 'id'\"" in (tmp_path / "sync" / "sync.log").read_text()
    st = dispatch("status", paths)
    assert st == {"ok": True, "role": "UNKNOWN", "generation": None, "hash": None, "meta": False, "generations": [],
                  "carp_running": True, "pass_accepts": []}


def test_peer_replies_are_read_as_json_not_as_error_text() -> None:
    assert from_reply({"ok": True, "role": "BACKUP"}, 0, "x") == {"ok": True, "role": "BACKUP"}
    with pytest.raises(SyncError, match="^staged tree is bad$") as e:
        from_reply({"ok": False, "code": STALE, "error": "staged tree is bad"}, STALE, "exit 4")
    assert e.value.exit_code == STALE
    with pytest.raises(SyncError, match="^exit 9: boom$") as e:  # no reply: the exit status and what it said
        from_reply(None, 9, "exit 9: boom")
    assert e.value.exit_code == 1


# ---------------------------------------------------------------- tree content


def make_tree(root: Path) -> Path:
    """A config tree as on a node: the example's cluster file and lists only (examples/ also holds debian.yaml, and
    `make image` / `make run` leave keys/ and compiled/ there: issue 9, make targets in any order on one clone)."""
    return config_tree(root)


def test_hash_ignores_node_local_and_metadata(tmp_path) -> None:
    t = make_tree(tmp_path / "t")
    (t / "keys").mkdir()
    h = tree.tree_hash(t)
    (t / "node.yaml").write_text("node: fw1\n")
    (t / "keys" / "hosts" / "fw1").mkdir(parents=True)
    (t / "keys" / "hosts" / "fw1" / "ssh_host_ed25519_key").write_text("secret")
    (t / tree.META_FILE).write_text("{}")
    assert tree.tree_hash(t) == h
    (t / "lists" / "adult" / "domains").write_text("x.example\n")
    assert tree.tree_hash(t) != h
    os.chmod(t / "lists" / "adult" / "domains", 0o600)
    h2 = tree.tree_hash(t)
    os.chmod(t / "lists" / "adult" / "domains", 0o644)
    assert tree.tree_hash(t) != h2  # modes are content too (keys must stay 0600)


def test_diff_reports_added_changed_removed(tmp_path) -> None:
    a = tree.manifest(make_tree(tmp_path / "a"))
    b_root = make_tree(tmp_path / "b")
    (b_root / "lists" / "adult" / "domains").write_text("changed.example\n")
    (b_root / "lists" / "adult" / "urls").unlink(missing_ok=True)
    (b_root / "lists" / "new").mkdir()
    (b_root / "lists" / "new" / "domains").write_text("n.example\n")
    d = tree.diff(a, tree.manifest(b_root))
    assert d["added"] == ["lists/new/domains"] and d["changed"] == ["lists/adult/domains"]
    assert d["removed"] == (["lists/adult/urls"] if (tmp_path / "a" / "lists" / "adult" / "urls").exists() else [])


def test_symlink_out_of_the_tree_and_special_files_refused(tmp_path) -> None:
    t = make_tree(tmp_path / "t")
    tree.check_safe(t)
    os.symlink("domains", t / "lists" / "adult" / "alias")  # even inside the tree: no symlink is synced
    with pytest.raises(SyncError, match=r"lists/adult/alias: a symlink \(refused"):
        tree.check_safe(t)
    os.unlink(t / "lists" / "adult" / "alias")
    os.symlink("/etc/passwd", t / "abs")
    with pytest.raises(SyncError, match="abs: a symlink"):
        tree.check_safe(t)
    os.unlink(t / "abs")
    os.mkfifo(t / "fifo")
    with pytest.raises(SyncError, match="fifo: a FIFO"):
        tree.check_safe(t)


def _tree_without_problems(tmp_path: Path) -> Path:
    t = make_tree(tmp_path / "t")
    for p in [t, *t.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert tree.check_staged(t) == []
    return t


def test_check_staged_has_no_skip_list(tmp_path) -> None:
    t = _tree_without_problems(tmp_path)
    (t / "keys").mkdir(0o755)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("root-only first line\n")
    for rel in ("compiled", "node.yaml", "keys/hosts", ".rsync-partial", "lists/.rsync-partial-x", ".release.json"):
        os.symlink(outside if rel in ("compiled", "keys/hosts") else outside / "secret", t / rel)
    problems = tree.check_staged(t)
    assert sorted(p.split(":")[0] for p in problems) == sorted(
        ["compiled", "node.yaml", "keys/hosts", ".rsync-partial", "lists/.rsync-partial-x", ".release.json"]), problems
    assert all("a symlink" in p for p in problems)
    with pytest.raises(SyncError) as e:
        tree.check_safe(t)
    assert "root-only" not in str(e.value) and e.value.exit_code == BAD_INPUT


def test_check_staged_refuses_links_specials_modes_size_count(tmp_path) -> None:
    t = _tree_without_problems(tmp_path)
    outside = tmp_path / "outside-file"
    outside.write_text("x\n")
    os.link(outside, t / "lists" / "adult" / "hard")
    os.mkfifo(t / "fifo", 0o644)
    sock = __import__("socket").socket(__import__("socket").AF_UNIX)
    sock.bind(str(t / "sock"))
    (t / "suid").write_text("x")
    os.chmod(t / "suid", 0o4644)
    (t / "sgid-dir").mkdir()
    os.chmod(t / "sgid-dir", 0o2755)
    (t / "sticky").write_text("x")
    os.chmod(t / "sticky", 0o1644)
    (t / "gw").write_text("x")
    os.chmod(t / "gw", 0o664)
    (t / "ww-dir").mkdir()
    os.chmod(t / "ww-dir", 0o757)
    (t / "big").write_bytes(b"x" * 4096)
    got: dict[str, str] = {}
    for p in tree.check_staged(t, max_file_bytes=4000):  # all of a path's problems, whatever other rules add
        got[p.split(":")[0]] = got.get(p.split(":")[0], "") + p
    sock.close()
    assert "hard link" in got["lists/adult/hard"] and "FIFO" in got["fifo"] and "socket" in got["sock"]
    assert "setuid/setgid/sticky" in got["suid"] and "setuid/setgid/sticky" in got["sgid-dir"]
    assert "setuid/setgid/sticky" in got["sticky"]
    assert "group/world-writable" in got["gw"] and "group/world-writable" in got["ww-dir"]
    assert "4096 bytes, over the cap of 4000" in got["big"]
    assert set(got) == {"lists/adult/hard", "fifo", "sock", "suid", "sgid-dir", "sticky", "gw", "ww-dir", "big"}
    assert tree.check_staged(t, max_files=5)[-1] == "more than 5 files and directories (refused)"
    if os.geteuid() == 0:
        os.mknod(t / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        assert any(p.startswith("null: a device") for p in tree.check_staged(t))


def test_check_staged_rules_are_extensible_and_names_are_escaped(tmp_path) -> None:
    t = _tree_without_problems(tmp_path)
    (t / "bad\nname").write_text("x")
    extra = lambda rel, st: "an example rule" if rel.endswith("domains") else None  # noqa: E731
    problems = tree.check_staged(t, rules=[*tree.RULES, extra])
    assert any(p.startswith("lists/adult/domains: an example rule") for p in problems)
    assert tree.check_staged(t) == []  # the name alone is no problem; shown escaped when it is one
    assert tree.show("bad\nname") == "bad\\nname"


def test_rsync_itemize_and_stats_parsing() -> None:
    out = """>f+++++++++ lists/new/domains
>f.st...... lists/adult/domains
.d..t...... lists/
cd+++++++++ lists/new/
*deleting   lists/old/domains
*deleting   lists/old/

Number of files: 10
Total bytes sent: 1,234
Total bytes received: 56
"""
    r = parse_rsync_output(out)
    assert r == {"added": ["lists/new/domains"], "changed": ["lists/adult/domains"], "removed": ["lists/old/domains"],
                 "bytes_sent": 1234, "bytes_received": 56}


# ---------------------------------------------------------------- releases and receive (local)


def node_state(tmp_path: Path, name: str = "state") -> tuple[Path, Releases]:
    state = tmp_path / name
    rel = Releases(state)
    make_tree(rel.path(1))
    os.symlink("releases/1", state / "current")
    return state, rel


def stage(rel: Releases, src: Path) -> str:
    mirror(src, rel.staging)
    return tree.tree_hash(rel.staging)


def test_image_release_without_metadata_is_valid(tmp_path) -> None:
    state, rel = node_state(tmp_path)
    assert rel.live() == 1 and rel.generations() == [1]
    m = rel.meta(1)
    assert not m["meta"] and m["hash"] == tree.tree_hash(rel.path(1))
    assert status(Paths(state))["generation"] == 1


def test_receive_swaps_prunes_and_carries_node_local(tmp_path) -> None:
    state, rel = node_state(tmp_path)
    (rel.path(1) / "node.yaml").write_text("node: fw2\n")
    src = make_tree(tmp_path / "src")
    (src / "appliance.yaml").write_text((src / "appliance.yaml").read_text().replace("keep_releases: 5", "keep_releases: 2"))
    for gen in (2, 3, 4):
        (src / "lists" / "adult" / "domains").write_text(f"gen{gen}.example\n")
        r = receive(Paths(state), gen, stage(rel, src), reload=False)
        assert r["action"] == "swapped" and r["previous"] == gen - 1
    assert rel.live() == 4 and rel.generations() == [3, 4]
    assert (rel.path(4) / "node.yaml").read_text() == "node: fw2\n"
    assert rel.meta(4)["hash"] == tree.tree_hash(rel.path(4))
    assert receive(Paths(state), 4, rel.meta(4)["hash"], reload=False)["action"] == "up-to-date"


def test_receive_refuses_and_leaves_live_untouched(tmp_path) -> None:
    state, rel = node_state(tmp_path)
    before = tree.tree_hash(rel.path(1))
    src = make_tree(tmp_path / "src")
    (src / "appliance.yaml").write_text((src / "appliance.yaml").read_text().replace("vhid: 1", "vhid: 0"))
    digest = stage(rel, src)
    with pytest.raises(SyncError, match=r"appliance.yaml:\d+: cluster.vhid") as e:
        receive(Paths(state), 2, digest, reload=False)
    assert e.value.exit_code == BAD_INPUT
    with pytest.raises(SyncError, match="does not match the master's") as e:
        receive(Paths(state), 2, "0" * 64, reload=False)
    with pytest.raises(SyncError, match="older than the live generation") as e:
        good = make_tree(tmp_path / "good")
        receive(Paths(state), 3, stage(rel, good), reload=False)
        receive(Paths(state), 2, stage(rel, good), reload=False)
    assert e.value.exit_code == STALE
    assert rel.live() == 3
    write_role(Paths(state), "MASTER", 1, "lo")
    with pytest.raises(SyncError, match="split brain") as e:
        receive(Paths(state), 4, stage(rel, good), reload=False)
    assert e.value.exit_code == SPLIT_BRAIN and rel.live() == 3
    assert tree.tree_hash(rel.path(1)) == before


def test_interrupted_install_is_cleaned_and_redone(tmp_path) -> None:
    state, rel = node_state(tmp_path)
    src = make_tree(tmp_path / "src")
    (src / "lists" / "adult" / "domains").write_text("two.example\n")
    digest = stage(rel, src)
    # a receiver killed after copying (half a temp dir) and one killed after the rename but before the swap
    (rel.dir / ".incoming-2" / "lists").mkdir(parents=True)
    rel.install(rel.staging, 2, digest, "test")
    shutil.rmtree(rel.path(2) / "lists")
    assert rel.live() == 1
    r = receive(Paths(state), 2, digest, reload=False)
    assert r["action"] == "swapped" and rel.live() == 2
    assert (rel.path(2) / "lists" / "adult" / "domains").read_text() == "two.example\n"
    assert not list(rel.dir.glob(".incoming-*"))


def test_rollback_and_unknown_generation(tmp_path) -> None:
    state, rel = node_state(tmp_path)
    src = make_tree(tmp_path / "src")
    receive(Paths(state), 2, stage(rel, src), reload=False)
    assert rollback(Paths(state), 1, reload=False)["previous"] == 2 and rel.live() == 1
    with pytest.raises(SyncError, match="no such release") as e:
        rollback(Paths(state), 7, reload=False)
    assert e.value.exit_code == BAD_INPUT and rel.live() == 1


def test_lock_is_exclusive(tmp_path) -> None:
    with held(tmp_path):
        with pytest.raises(SyncError, match=f"another sync is running \\(pid {os.getpid()}") as e:
            with held(tmp_path):
                pass
        assert e.value.exit_code == BUSY
    with held(tmp_path):  # released
        pass


def test_plan_cut_and_stale_peers(tmp_path) -> None:
    state, rel = node_state(tmp_path)
    work = rel.path(1)
    p = plan_cut(rel, work)
    assert p.cut and p.generation == 2 and "no sync metadata" in p.reasons[0]
    rel.install(work, 2, tree.tree_hash(work), "t")
    rel.activate(2)
    assert not plan_cut(rel, rel.path(2)).cut
    (rel.path(2) / "lists" / "adult" / "domains").write_text("edit.example\n")
    p = plan_cut(rel, rel.path(2))
    assert p.cut and p.generation == 3 and "changed" in p.reasons[0]
    assert plan_cut(rel, rel.path(2), above=9).generation == 10
    ours = rel.meta(2)
    assert stale_peers(2, ours, {"fw2": {"generation": 5}}) == ["fw2 has generation 5, newer than ours (2)"]
    assert "differs" in stale_peers(2, ours, {"fw2": {"generation": 2, "meta": True, "hash": "f" * 64}})[0]
    assert stale_peers(2, ours, {"fw2": {"generation": 1}, "fw3": {"generation": None}}) == []


# ---------------------------------------------------------------- CLI: keys, cron, releases


def cli(tmp_path: Path, *args: str, cfg: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "APPLIANCE_STATE_DIR": str(tmp_path / "state"), "APPLIANCE_NODE": "fw1"}
    return subprocess.run([APPLIANCE, "-c", str(cfg), *args], capture_output=True, text=True, env=env, timeout=60)


def test_keys_init_and_cron(tmp_path) -> None:
    t = make_tree(tmp_path / "etc")
    r = cli(tmp_path, "keys", "init", "--elevate", "none", cfg=t / "appliance.yaml")
    assert r.returncode == 0, r.stderr
    # this node's OWN key, node-local (never in the synced tree), 0600 in a 0700 dir
    key = tmp_path / "state" / "keys" / "sync_ed25519"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and "PRIVATE KEY" in key.read_text()
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    pub = key.with_name("sync_ed25519.pub").read_text().split()
    lines = [l for l in r.stdout.splitlines() if not l.startswith("#")]
    assert lines == [f'command="/usr/local/bin/appliance sync-serve",from="192.168.200.1",restrict {pub[0]} {pub[1]} '
                     "appliance-sync@fw1"]  # what fw2 authorises: fw1's key, from fw1's sync address only
    assert "PRIVATE" not in r.stdout + r.stderr
    r2 = cli(tmp_path, "keys", "init", "--for", "fw2", "--elevate", "none", cfg=t / "appliance.yaml")
    assert r2.stdout.strip() == lines[0] and key.read_text()  # kept, not regenerated
    assert cli(tmp_path, "keys", "init", "--for", "fw9", cfg=t / "appliance.yaml").returncode == 2
    assert cli(tmp_path, "keys", "init", "--for", "fw1", cfg=t / "appliance.yaml").returncode == 2  # itself
    r = cli(tmp_path, "cron", cfg=t / "appliance.yaml")
    assert r.returncode == 0 and r.stdout.startswith("*/5 * * * * root ") and f"-c {t / 'appliance.yaml'} sync --json" in r.stdout
    target = tmp_path / "cron.d" / "appliance-sync"
    r = cli(tmp_path, "cron", "--install", "--file", str(target), cfg=t / "appliance.yaml")
    assert r.returncode == 0 and target.read_text().splitlines()[-1].startswith("*/5 * * * * root ")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_releases_cli_lists_and_rejects_bad_rollback(tmp_path) -> None:
    state, rel = node_state(tmp_path)
    cfg = state / "current" / "appliance.yaml"
    r = cli(tmp_path, "releases", "--json", cfg=cfg)
    rows = json.loads(r.stdout)["releases"]
    assert rows[0]["generation"] == 1 and rows[0]["live"] and rows[0]["source"] == "image" and rows[0]["intact"]
    r = cli(tmp_path, "releases", "--rollback", "x1", cfg=cfg)
    assert r.returncode == 2 and "--rollback: 'x1' is not a generation number" in r.stderr
    r = cli(tmp_path, "sync-receive", "0", "a" * 64, cfg=cfg)
    assert r.returncode == 2 and "not a generation number" in r.stderr
    r = cli(tmp_path, "sync", "--json", cfg=cfg)  # no role recorded: a logged no-op
    assert r.returncode == 0 and "not MASTER" in json.loads(r.stdout)["skipped"]


def test_keys_authorize_and_revoke_one_node(tmp_path) -> None:
    """Per-node keys (issue 12, finding 2): a node's line is added and removed alone; shared-key lines are named."""
    from sync import keys

    t = make_tree(tmp_path / "etc")
    ak = tmp_path / "authorized_keys"
    other = tmp_path / "fw2.pub"
    keys.keygen(tmp_path / "fw2", "appliance-sync@fw2")
    r = cli(tmp_path, "keys", "authorize", "fw2", str(other.with_name("fw2.pub")), "--authorized-keys", str(ak),
            "--elevate", "none", cfg=t / "appliance.yaml")
    assert r.returncode == 0, r.stderr
    pub = other.read_text().split()
    line = f'command="/usr/local/bin/appliance sync-serve",from="192.168.200.2",restrict {pub[0]} {pub[1]} appliance-sync@fw2'
    ak.write_text("ssh-ed25519 AAAAshared appliance-sync\n" + ak.read_text())
    assert ak.read_text().splitlines()[1] == line
    r = cli(tmp_path, "keys", "authorize", "fw2", str(other), "--authorized-keys", str(ak), cfg=t / "appliance.yaml")
    assert r.returncode == 0 and ak.read_text().count("appliance-sync@fw2") == 1      # replaced, not doubled
    assert cli(tmp_path, "keys", "authorize", "fw1", str(other), "--authorized-keys", str(ak), cfg=t / "appliance.yaml").returncode == 2
    r = cli(tmp_path, "keys", "revoke", "fw2", "--authorized-keys", str(ak), cfg=t / "appliance.yaml")
    assert r.returncode == 0 and "1 line(s) of fw2's key removed" in r.stdout and "old SHARED key remain" in r.stderr
    assert ak.read_text() == "ssh-ed25519 AAAAshared appliance-sync\n"
    r = cli(tmp_path, "keys", "revoke", "fw2", "--authorized-keys", str(ak), cfg=t / "appliance.yaml")
    assert r.returncode == 1 and "no line of fw2's own key" in r.stderr


def test_keys_known_hosts_pins_given_keys(tmp_path) -> None:
    t = make_tree(tmp_path / "etc")
    hk = tmp_path / "hk"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)], check=True)
    r = cli(tmp_path, "keys", "known-hosts", f"fw2={hk}.pub", cfg=t / "appliance.yaml")
    assert r.returncode == 0, r.stderr
    pub = (tmp_path / "hk.pub").read_text().split()
    assert (t / "keys" / "known_hosts").read_text() == f"192.168.200.2 {pub[0]} {pub[1]}\n"
    r = cli(tmp_path, "keys", "known-hosts", f"fw2={hk}", cfg=t / "appliance.yaml")  # the private key: refused
    assert r.returncode == 2 and "not an OpenSSH public key" in r.stderr
    r = cli(tmp_path, "keys", "known-hosts", cfg=t / "appliance.yaml")  # no keys/hosts/<node>/ in this tree
    assert r.returncode == 2 and "cannot read the host key of fw1" in r.stderr


@pytest.mark.root
def test_sync_serve_as_unprivileged_user_gives_a_clear_error(tmp_path) -> None:
    from tests.support.env import need_tool

    need_tool("setpriv")
    state, rel = node_state(tmp_path)
    os.chmod(tmp_path, 0o755)
    env = {**os.environ, "APPLIANCE_STATE_DIR": str(state), "SSH_ORIGINAL_COMMAND": f"receive 2 {'a' * 64}"}
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", APPLIANCE, "sync-serve"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot write" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert rel.live() == 1


def test_keys_init_elevation_lines(tmp_path) -> None:
    """An unprivileged sync.user gets `sudo -n` (Linux default) or `doas -n` in its forced command, plus the one rule."""
    from sync import keys

    t = make_tree(tmp_path / "etc")
    r = cli(tmp_path, "keys", "init", cfg=t / "appliance.yaml")  # auto on Linux, sync.user appliance-sync: sudo
    assert r.returncode == 0, r.stderr
    pub = (tmp_path / "state" / "keys" / "sync_ed25519.pub").read_text().split()
    lines = [l for l in r.stdout.splitlines() if not l.startswith("#")]
    assert lines[0] == (f'command="/usr/bin/sudo -n /usr/local/bin/appliance sync-serve",from="192.168.200.1",restrict '
                        f"{pub[0]} {pub[1]} appliance-sync@fw1")
    assert "#   appliance-sync ALL=(root) NOPASSWD: /usr/local/bin/appliance sync-serve" in r.stdout
    assert '#   Defaults:appliance-sync env_keep += "SSH_ORIGINAL_COMMAND SSH_CLIENT", !requiretty' in r.stdout
    assert "/etc/sudoers.d/appliance-sync" in r.stdout
    r = cli(tmp_path, "keys", "init", "--elevate", "doas", cfg=t / "appliance.yaml")
    assert "#   " + keys.doas_rule("appliance-sync") in r.stdout and "/usr/local/etc/doas.conf" in r.stdout
    assert 'command="/usr/local/bin/doas -n /usr/local/bin/appliance sync-serve"' in r.stdout
    r = cli(tmp_path, "keys", "init", "--elevate", "doas", "--appliance-bin", "/usr/bin/env X=1 /x/appliance", cfg=t / "appliance.yaml")
    assert r.returncode == 2 and "must be one absolute path" in r.stderr
    assert keys.default_elevate("root", "linux") == "none" and keys.default_elevate("appliance-sync", "freebsd14") == "doas"
    # the default keeps today's line for every other caller
    assert keys.serve_command() == "/usr/local/bin/appliance sync-serve"
    with pytest.raises(ValueError):
        keys.serve_command(elevate="su")


def _serve(env: dict, timeout: int = 60, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, APPLIANCE, "sync-serve"], env=env, capture_output=True, text=True, timeout=timeout)


def test_sync_serve_under_a_reset_environment(tmp_path) -> None:
    """What doas/sudo hand over: a reset environment with USER=root, DOAS_USER/SUDO_USER and only the kept variables.

    The whitelist is the same; a rule that drops SSH_ORIGINAL_COMMAND gets a clear exit 2 naming the fix."""
    state, rel = node_state(tmp_path)
    base = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "USER": "root", "LOGNAME": "root",
            "APPLIANCE_STATE_DIR": str(state)}
    for via in ({"DOAS_USER": "appliance-sync"}, {"SUDO_USER": "appliance-sync", "SUDO_COMMAND": "/x sync-serve"}):
        r = _serve({**base, **via})
        assert r.returncode == 2 and "SSH_ORIGINAL_COMMAND is not set" in r.stderr, r.stderr
        assert "setenv { SSH_ORIGINAL_COMMAND }" in r.stderr and "env_keep += SSH_ORIGINAL_COMMAND" in r.stderr
        r = _serve({**base, **via, "SSH_ORIGINAL_COMMAND": "status", "SSH_CLIENT": "192.0.2.9 5555 22"})
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["generation"] == 1
        r = _serve({**base, **via, "SSH_ORIGINAL_COMMAND": "/bin/sh -c id", "SSH_CLIENT": "192.0.2.9 5555 22"})
        assert r.returncode == 2 and "unknown sync command '/bin/sh'" in r.stderr
        r = _serve({**base, **via, "SSH_ORIGINAL_COMMAND": "rsync --server --sender -vlogDtpre.iLsfxCIvu . staging"})
        assert r.returncode == 2 and "--sender is not allowed" in r.stderr
    log = (state / "sync" / "sync.log").read_text()
    assert "from 192.0.2.9 as " in log and "via doas" in log and "via sudo" in log
    assert rel.live() == 1


@pytest.mark.root
def test_sync_serve_unprivileged_error_names_doas(tmp_path) -> None:
    from tests.support.env import need_tool

    need_tool("setpriv")
    state, rel = node_state(tmp_path)
    os.chmod(tmp_path, 0o755)
    env = {**os.environ, "USER": "root", "APPLIANCE_STATE_DIR": str(state), "SSH_ORIGINAL_COMMAND": f"receive 2 {'a' * 64}"}
    r = _serve(env, prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
    # named by the effective uid (not $USER, which says root here) and pointing at the doas/sudo rule
    assert r.returncode == 1 and "runs as nobody" in r.stderr and "doas -n" in r.stderr, r.stderr
    assert rel.live() == 1


def test_a_lowered_size_cap_never_goes_below_the_default(tmp_path: Path) -> None:
    # review finding 3: a stolen push set sync.max_file_mb: 1; rsync then skipped every larger list for good
    import yaml as _yaml
    from appliance.core.paths import Paths as _Paths
    from sync.receive import max_file_bytes
    rel = make_tree(tmp_path / "releases" / "1")
    data = _yaml.safe_load((rel / "appliance.yaml").read_text())
    for mb, cap in ((1, tree.MAX_FILE_BYTES), (1024, 1024 << 20)):
        data.setdefault("sync", {})["max_file_mb"] = mb
        (rel / "appliance.yaml").write_text(_yaml.safe_dump(data))
        if not (tmp_path / "current").exists():
            (tmp_path / "current").symlink_to("releases/1")
        assert max_file_bytes(_Paths(tmp_path)) == cap, mb


def test_carp_counts_as_on_unless_stopped_on_purpose_in_this_boot(tmp_path: Path, monkeypatch) -> None:
    from appliance.core import state as st
    from appliance.core.paths import Paths as _Paths
    from sync.receive import carp_running
    paths = _Paths(tmp_path)
    paths.run.mkdir(parents=True, exist_ok=True)
    assert carp_running(paths)                      # never started, or crashed: a CARP change would apply at start
    st.mark_carp_stopped(paths)
    assert not carp_running(paths)                  # `systemctl stop appliance-carp` in this boot
    monkeypatch.setattr(st, "boot_id", lambda: "another-boot")
    assert carp_running(paths)                      # a stop before a reboot does not count after it
    monkeypatch.undo()
    st.clear_carp_stopped(paths)                    # the supervisor starts again
    assert carp_running(paths)
