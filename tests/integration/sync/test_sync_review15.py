"""The outside review of the faster sync (issue 15), replayed on a real sshd pair: a newly referenced list is checked
in full, a live index the proxy user rewrote is never reused, a peer's key cannot rewrite the master's base."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from appliance.core.loader import load
from filters import ruleset
from filters.index import HEADER, DomainIndex, read_meta
from sync import tree
from tests.support.sync_lab import SyncLab


def _edit(node, fn) -> None:
    cfg = node.tree / "appliance.yaml"
    data = yaml.safe_load(cfg.read_text())
    fn(data)
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))


def _reject(data: dict) -> None:
    data["filter"]["bad_lines"] = "reject"


def _add(root: Path, line: str, category: str = "adult") -> None:
    f = root / "lists" / category / "domains"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text((f.read_text() if f.exists() else "") + f"{line}\n")


def test_a_newly_referenced_list_is_checked_in_full_and_nothing_goes_live(lab: SyncLab) -> None:
    """A list that sat unreferenced in the live tree was never checked: referencing it parses it in full, and the
    master refuses before the cut (finding 1)."""
    assert lab.master.sync()[0] == 0
    _edit(lab.master, _reject)
    _add(lab.master.tree, "ok.example", "gambling")
    _add(lab.master.tree, "bad domain!!", "gambling")
    assert lab.master.sync()[0] == 0  # unreferenced: not compiled anywhere
    _edit(lab.master, lambda d: d["filter"]["block"].append("gambling"))
    code, r = lab.master.sync()
    assert code == 2 and "gambling/domains:2" in r["error"], r
    assert lab.master.live() == 3 and lab.backup.live() == 3
    code, r = lab.master.sync()  # the next sync says the same, nothing was taken for live
    assert code == 2 and "gambling/domains:2" in r["error"] and lab.master.live() == 3, r


def _plant(live: Path, cat: str, planted: str) -> None:
    """What the proxy user (owner of compiled/ on FreeBSD) can do: an index built from other lists, with the
    genuine index's digests in its metadata (the reviewer's plant.py)."""
    idx = ruleset.index_path(live)
    genuine = read_meta(idx)
    t = live.parent / "plant-tmp"
    shutil.copytree(live, t, ignore=shutil.ignore_patterns("compiled"))
    _add(t, planted, cat)
    ruleset.compile_index(load(t / "appliance.yaml"), t, previous=ruleset.NO_PREVIOUS)
    data = bytearray(ruleset.index_path(t).read_bytes())
    shutil.rmtree(t)
    head = list(HEADER.unpack_from(data, 0))
    moff = head[-2]
    meta = json.loads(data[moff:])
    g = {c["name"]: c for c in genuine["categories"]}
    for c in meta["categories"]:
        c["digests"] = g[c["name"]]["digests"]
    meta["fingerprint"], meta["content"] = genuine["fingerprint"], genuine["content"]
    mb = json.dumps(meta, separators=(",", ":")).encode()
    head[-1] = len(mb)
    idx.write_bytes(bytes(HEADER.pack(*head)) + bytes(data[HEADER.size:moff]) + mb)


def _listed(node, host: str) -> bool:
    ix = DomainIndex(ruleset.index_path(node.tree))
    try:
        return ix.lookup(host) is not None
    finally:
        ix.close()


def test_a_rewritten_live_index_is_never_reused(lab: SyncLab) -> None:
    """Entries planted in the live index (no list has them) do not reach the next release on either node, and an
    index that crashes the merge costs a full compile, not a failed push (finding 2)."""
    assert lab.master.sync()[0] == 0
    _add(lab.master.tree, "one.example")
    assert lab.master.sync()[0] == 0
    for node in (lab.master, lab.backup):
        _plant(node.tree, "malware", "planted.example")
        assert _listed(node, "planted.example")
    _add(lab.master.tree, "two.example")
    code, r = lab.master.sync()
    assert code == 0 and r["check"] == "changed lines", r
    for node in (lab.master, lab.backup):
        assert _listed(node, "two.example") and not _listed(node, "planted.example"), node.name
    ruleset.index_path(lab.backup.tree).write_bytes(b"CGIDX\x03\x00\x00" + b"\xff" * 4096)
    _add(lab.master.tree, "three.example")
    code, r = lab.master.sync()
    assert code == 0 and lab.backup.live() == 5 and _listed(lab.backup, "three.example"), r
    # a genuine, recorded index is still reused: the sync stays cheap
    _add(lab.master.tree, "four.example")
    code, r = lab.master.sync()
    assert code == 0 and _listed(lab.backup, "four.example"), r


def test_a_peer_key_cannot_write_the_masters_base(lab: SyncLab, tmp_path: Path) -> None:
    """A stolen backup key: rsync into the master's staging dir is refused; a staging copy changed anyway (by hand
    here) is not the base of the master's CARP checks (finding 4)."""
    assert lab.master.sync()[0] == 0
    lab.master.start_sshd()
    staging = lab.master.state / "sync" / "staging"
    before = tree.tree_hash(staging)
    evil = tmp_path / "evil"
    shutil.copytree(staging, evil)
    cfg = yaml.safe_load((evil / "appliance.yaml").read_text())
    cfg["cluster"]["vhid"] = 77
    (evil / "appliance.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ssh = ["ssh", "-F", "/dev/null", "-p", str(lab.master.port), "-i", str(lab.backup.key), "-o", "IdentitiesOnly=yes",
           "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR", "-b", lab.backup.addr]
    r = subprocess.run(["rsync", "-rt", "--delete", "-e", " ".join(ssh), f"{evil}/", f"root@{lab.master.addr}:staging"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and tree.tree_hash(staging) == before, (r.stdout, r.stderr)
    shutil.copy(evil / "appliance.yaml", staging / "appliance.yaml")  # had it got there anyway
    _add(lab.master.tree, "after-staging.example")
    code, r = lab.master.sync()
    assert code == 0 and lab.backup.live() == 3, r
