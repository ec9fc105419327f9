"""The list index's two fingerprints: stats first, content when mtimes moved; an index of an older recipe is recompiled."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from appliance.core import loader as cfgmod
from filters import lists as flists
from filters import ruleset
from filters.index import DomainIndex, Section, read_meta, write_index
from tests.support.proxy import make_tree


def _compiled(tmp_path: Path):
    cfg_path = make_tree(tmp_path)
    cfg, base = cfgmod.load(cfg_path), cfg_path.parent
    ruleset.compile_index(cfg, base)
    return cfg, base


def test_moved_mtimes_with_the_same_bytes_keep_the_index(tmp_path):
    """What an image build (clamped to SOURCE_DATE_EPOCH), cp or tar does to a release: nothing to recompile."""
    cfg, base = _compiled(tmp_path)
    for f in (base / "lists").rglob("*"):
        if f.is_file():
            os.utime(f, ns=(1704067200 * 10**9, 1704067200 * 10**9))
    assert read_meta(ruleset.index_path(base))["fingerprint"] != ruleset.fingerprint(cfg, base)
    assert ruleset.is_fresh(cfg, base)
    assert ruleset.ensure_index(cfg, base, in_child=False).compiled is False


def test_changed_bytes_with_the_same_size_and_moved_mtime_recompile(tmp_path):
    cfg, base = _compiled(tmp_path)
    f = base / "lists/blocked/domains"
    data = f.read_bytes()
    f.write_bytes(data.replace(b"blocked.test", b"blocked.tesx"))
    assert len(f.read_bytes()) == len(data)
    os.utime(f, ns=(1, 1))
    assert not ruleset.is_fresh(cfg, base)
    rep = ruleset.ensure_index(cfg, base, in_child=False)
    assert rep.compiled and DomainIndex(rep.path).lookup("blocked.tesx")


def _old_recipe(cfg, base: Path) -> str:
    """The fingerprint before FINGERPRINT_VERSION 3: stats only, with a "depths" marker, no content fingerprint."""
    parts: list = [cfg.filter.bad_lines, sorted(cfg.filter.categories()), "depths"]
    for cat in sorted(cfg.filter.categories()):
        for kind in flists.KINDS:
            st = (cfg.lists_dir(base) / cat / kind)
            parts.append([f"{cat}/{kind}", st.stat().st_size, st.stat().st_mtime_ns] if st.exists() else [f"{cat}/{kind}", None])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def test_an_index_of_the_old_recipe_is_recompiled_never_used(tmp_path):
    cfg, base = _compiled(tmp_path)
    path = ruleset.index_path(base)
    old = Section.from_part(flists.parse_domains(b"old.test\n", "lists/blocked/domains"), 0)
    write_index(path, [old], {"fingerprint": _old_recipe(cfg, base), "depths": [2], "categories": [{"name": "blocked"}]})
    assert not ruleset.is_fresh(cfg, base)
    rep = ruleset.ensure_index(cfg, base, in_child=False)
    assert rep.compiled and DomainIndex(path).lookup("old.test") is None and "content" in read_meta(path)


def test_another_version_with_the_same_bytes_is_recompiled(tmp_path, monkeypatch):
    cfg, base = _compiled(tmp_path)
    monkeypatch.setattr(ruleset, "FINGERPRINT_VERSION", ruleset.FINGERPRINT_VERSION + 1)
    assert not ruleset.is_fresh(cfg, base)


def test_read_only_release_compiles_into_the_state_dir(tmp_path, monkeypatch):
    """A stale index the process may not rewrite: compiled once into <state>/compiled/, then used from there."""
    cfg, base = _compiled(tmp_path)
    (base / "lists/blocked/domains").write_text("now.test\n")
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(ruleset, "_writable", lambda d: False)
    before = ruleset.index_path(base).read_bytes()
    rep = ruleset.ensure_index(cfg, base, in_child=False)
    assert rep.compiled and rep.path == tmp_path / "state" / ruleset.INDEX_NAME
    assert ruleset.index_path(base).read_bytes() == before
    again = ruleset.ensure_index(cfg, base, in_child=False)
    assert (again.compiled, again.path) == (False, rep.path)
    eng, _ = ruleset.build_engine(cfg, base, compile_in_child=False)
    assert eng.decide("127.0.0.1", "now.test").verdict == "block"
