"""Sync catch-up (issue 10): a node back from an outage finds, over the real sync link (sshd, forced command), the
MASTER that cut a generation while it was off; once that master's next sync has pushed it, nothing is ahead."""
from __future__ import annotations

from appliance.core.loader import load
from appliance.core.paths import Paths
from sync.catchup import ahead
from tests.support.sync_lab import SyncLab


def _ahead(node) -> tuple[str, int] | None:
    return ahead(load(node.config), node.name, node.config, Paths(node.state))


def _add_domain(node, domain: str) -> None:
    f = node.tree / "lists" / "adult" / "domains"
    f.write_text(f.read_text() + f"{domain}\n")


def test_a_node_back_from_an_outage_finds_the_master_that_moved_on(sync_lab: SyncLab, tmp_path, monkeypatch) -> None:
    fw1, fw2 = sync_lab.master, sync_lab.backup
    # the CARP unit asks with ProtectHome=yes: nothing under $HOME is read (ssh -F /dev/null: this config would fail)
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("NoSuchOption yes\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fw1.sync()[0] == 0 and fw2.live() == 2
    # fw1 loses power: fw2 takes over, the admin changes a list there; the push to fw1 fails (fw1 is off)
    fw1.role("BACKUP")
    fw2.role("MASTER")
    _add_domain(fw2, "changed-while-fw1-was-off.example")
    code, r = fw2.sync()
    assert code == 1 and r["generation"] == 3 and r["failed"] == ["fw1"], r
    # fw1 is back: asked over the sync link, fw2 is MASTER with generation 3, fw1 has 2
    assert _ahead(fw1) == ("fw2", 3)
    assert _ahead(fw2) is None  # and nothing is ahead of the master
    # fw2's next sync pushes generation 3 to fw1, which is then not behind any more
    fw1.start_sshd()
    code, r = fw2.sync()
    assert code == 0 and fw1.live() == 3, r
    assert _ahead(fw1) is None


def test_a_newer_backup_or_no_answer_is_nothing_to_wait_for(sync_lab: SyncLab) -> None:
    fw1, fw2 = sync_lab.master, sync_lab.backup
    fw1.role("BACKUP")
    fw2.role("MASTER")
    _add_domain(fw2, "x.example")
    assert fw2.sync()[0] == 1 and fw2.live() == 2 and fw1.live() == 1
    fw2.role("BACKUP")            # ahead, but not MASTER: not the node whose push fw1 would wait for
    assert _ahead(fw1) is None
    fw2.role("MASTER")
    fw2.stop()                    # no sshd: no answer, nothing to wait for
    assert _ahead(fw1) is None
    Paths(fw1.state).sync_key.unlink()   # no key of its own (and none in the tree): not asked at all
    assert _ahead(fw1) is None
