"""The Debian image's baked list index is current when the node boots (issue 10: it was stale, so the proxy tried to
recompile into its read-only release and crash-looped): the release tree made as the image build makes it, no qemu."""
from __future__ import annotations

from pathlib import Path

import pytest

from appliance.core import loader
from filters import ruleset
from filters.index import DomainIndex, read_meta
from image import debian, keygen
from image.debian import ext4, overlay
from tests.support.env import copy_examples, need_tool

pytestmark = pytest.mark.root
EPOCH = 1704067200
ADDED = "added-after-the-host-index.example"


def fake_base(root: Path) -> Path:
    """What populate() reads of the common tree: the users and groups the .deb made."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\ncarpguard:x:998:998::/nonexistent:/usr/sbin/nologin\n"
                                     "appliance-sync:x:997:997::/var/lib/appliance-sync:/bin/sh\n"
                                     "carpguard-admin:x:996:996::/nonexistent:/usr/sbin/nologin\n")
    (root / "etc/group").write_text("root:x:0:\ncarpguard:x:998:\nappliance-sync:x:997:\ncarpguard-admin:x:996:\n")
    return root


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """fw1's root tree as the build leaves it for mke2fs, from a config dir where the proxy once ran (a compiled/
    made for the host's mtimes and for lists that changed since)."""
    need_tool("ssh-keygen")
    etc = copy_examples(tmp_path / "etc")
    cfg_path = etc / "debian.yaml"
    cfg = loader.load(cfg_path)
    ruleset.compile_index(cfg, etc)  # what `make run` or `appliance explain` leaves in examples/compiled/
    with open(etc / "lists/adult/domains", "a") as f:
        f.write(f"{ADDED}\n")
    keygen.ensure_keys(cfg, etc)
    overlay.ensure_admin_key(etc)
    root = fake_base(tmp_path / "root")
    debian.populate(cfg, cfg_path, "fw1", root, tmp_path / "dist", EPOCH, "6.1.0-0-amd64", "u-u-i-d")
    ext4.clamp_times(root, EPOCH)  # what make_ext4 does to the tree before mke2fs -d copies it
    return root


def test_baked_index_is_current_by_its_mtimes(image_root: Path):
    """The fast check (one stat per list) holds on the image's mtimes: the booted proxy hashes nothing, compiles nothing."""
    rel = image_root / overlay.RELEASE.lstrip("/")
    cfg = loader.load(rel / "appliance.yaml")
    meta = read_meta(ruleset.index_path(rel))
    assert meta["fingerprint"] == ruleset.fingerprint(cfg, rel)
    assert meta["content"] == ruleset.content_fingerprint(cfg, rel)
    idx = DomainIndex(ruleset.index_path(rel))
    assert idx.lookup(ADDED), "the image holds the config dir's stale index, not one of its own lists"


def test_proxy_uses_the_baked_index_of_a_read_only_release(image_root: Path, tmp_path: Path, monkeypatch):
    """As the Debian unit runs it (release read-only, its own state dir writable): no compile, nothing written."""
    state = tmp_path / "proxy-state"
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(state))
    monkeypatch.setattr(ruleset, "_writable", lambda d: False)
    rel = image_root / overlay.RELEASE.lstrip("/")
    cfg = loader.load(rel / "appliance.yaml")
    rep = ruleset.ensure_index(cfg, rel, in_child=False)
    assert (rep.compiled, rep.path) == (False, ruleset.index_path(rel))
    assert not state.exists()
    assert sorted(p.name for p in (rel / "compiled").iterdir()) == [".gitignore", "filter.idx"]
