"""The cheap parts of a sync of a small change (real sshd + rsync): the master checks only the changed lines against
the generation that went live and compiles its index beside the push; the peer still parses every changed list."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from appliance.core.loader import load
from filters import ruleset
from sync import tree
from sync.peer import make_peers, rsync_to
from tests.support.sync_lab import SyncLab


def _reject(node) -> None:
    cfg = node.tree / "appliance.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["filter"]["bad_lines"] = "reject"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))


def _add(root: Path, line: str, category: str = "adult") -> int:
    """Append a line to a domains list; its line number."""
    f = root / "lists" / category / "domains"
    text = f.read_text()
    f.write_text(text + f"{line}\n")
    return len(text.splitlines()) + 1


def _fresh(node) -> bool:
    return ruleset.is_fresh(load(node.tree / "appliance.yaml"), node.tree)


def test_a_small_change_is_checked_by_its_lines_and_both_indexes_are_current(lab: SyncLab) -> None:
    assert lab.master.sync()[0] == 0  # generation 2: the image's release had no metadata, so the full check
    _reject(lab.master)
    code, r = lab.master.sync()
    assert code == 0 and r["check"] == "full", r  # a stricter bad_lines: every line checked again
    _add(lab.master.tree, "newly-blocked.example")
    code, r = lab.master.sync()
    assert code == 0 and r["check"] == "changed lines" and r["compile"]["entries"] > 0, r
    assert r["peers"][0]["receive"]["phases"]["wall"]["check (bounded child)"] >= 0, r
    assert _fresh(lab.master) and _fresh(lab.backup)
    assert "newly-blocked.example" in (lab.backup.tree / "lists" / "adult" / "domains").read_text()
    no = _add(lab.master.tree, "bad domain!!")
    code, r = lab.master.sync()
    assert code == 2 and f"lists/adult/domains:{no}: " in r["error"] and "bad domain!!" in r["error"], r
    assert lab.master.live() == 4 and lab.backup.live() == 4


def test_a_staging_mirror_changed_after_it_went_live_is_not_trusted(lab: SyncLab) -> None:
    """The master's base is its staging mirror only while its hash is that of the live generation: a bad line put
    there and in the tree is found by the full check, not taken for a line that went live before."""
    assert lab.master.sync()[0] == 0
    _reject(lab.master)
    assert lab.master.sync()[0] == 0
    staging = lab.master.state / "sync" / "staging"
    _add(staging, "bad domain!!")
    no = _add(lab.master.tree, "bad domain!!")
    code, r = lab.master.sync()
    assert code == 2 and f"lists/adult/domains:{no}: " in r["error"], r
    assert lab.master.live() == 3 and lab.backup.live() == 3


def test_the_peer_parses_a_changed_list_whatever_its_previous_index_says(lab: SyncLab, tmp_path: Path) -> None:
    """A push that skips the master's check (a stolen key, say) with a bad line in a changed list is refused with
    file:line, and a corrupt live index on the peer only costs a full compile."""
    assert lab.master.sync()[0] == 0
    _reject(lab.master)
    assert lab.master.sync()[0] == 0
    idx = ruleset.index_path(lab.backup.tree)
    assert idx.is_file()
    bad = tmp_path / "bad"
    shutil.copytree(lab.master.tree, bad, symlinks=True)
    no = _add(bad, "bad domain!!")
    peer = make_peers(lab.cfg_obj(lab.master.tree), "fw1", lab.master.tree, lab.master.key)[0]
    rsync_to(peer, bad)
    code, out, err = peer.run(f"receive 4 {tree.tree_hash(bad)}")
    reply = json.loads(out)
    assert code == 2 and f"lists/adult/domains:{no}: " in reply["error"], (out, err)
    assert lab.backup.live() == 3
    idx.write_bytes(b"\0" * 4096)  # the peer's own index of its live release, corrupt
    _add(lab.master.tree, "after-corrupt.example")
    code, r = lab.master.sync()
    assert code == 0 and lab.backup.live() == 4 and _fresh(lab.backup), r
