"""The outside review of the faster sync (issue 15): the parts a unit test shows (sync/uncut.py, indextrust.py,
background.py, serve.py's one waiter, delta.py on a newly referenced list)."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
import yaml

from appliance.core.loader import load
from appliance.core.paths import Paths
from filters import ruleset
from sync import background, delta, indextrust, serve, tree
from sync.errors import BUSY, SyncError
from sync.releases import Releases, mirror
from sync.uncut import uncut
from tests.support.env import config_tree


@pytest.fixture
def rel(tmp_path: Path) -> Releases:
    """Live generation 2 (compiled, recorded, mirrored into staging)."""
    seed = config_tree(tmp_path / "seed")
    r = Releases(tmp_path / "state")
    r.prepare_dirs()
    r.install(seed, 2, tree.tree_hash(seed), "test")
    r.activate(2)
    ruleset.compile_index(load(r.path(2) / "appliance.yaml"), r.path(2))
    indextrust.record(r, 2, ruleset.index_path(r.path(2)))
    mirror(r.path(2), r.staging, transfer=True)
    r.write_staging_meta(2, tree.tree_hash(r.staging))
    return r


def test_a_category_the_base_did_not_reference_is_parsed_in_full(rel: Releases) -> None:
    work = rel.path(2)
    for root in (work, rel.staging):  # the same unchecked list in the base and the working tree
        (root / "lists" / "gambling").mkdir()
        (root / "lists" / "gambling" / "domains").write_text("ok.example\nbad domain!!\n")
    cfg = yaml.safe_load((work / "appliance.yaml").read_text())
    cfg["filter"]["bad_lines"] = "reject"
    for root in (work, rel.staging):
        (root / "appliance.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rel.write_staging_meta(2, tree.tree_hash(rel.staging))
    cfg["filter"]["block"].append("gambling")
    (work / "appliance.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(SyncError, match="gambling/domains:2"):
        delta.check_changed(work, rel.staging)


def test_a_base_mirrored_under_another_parser_is_not_a_base(rel: Releases, monkeypatch) -> None:
    assert delta.base_tree(rel) == rel.staging
    monkeypatch.setattr(ruleset, "PARSER_VERSION", ruleset.PARSER_VERSION + 1)
    assert delta.base_tree(rel) is None


def test_a_failed_master_compile_puts_the_previous_release_back(rel: Releases) -> None:
    work = rel.path(2)
    (work / "lists" / "adult" / "domains").write_text("edited.example\n")
    rel.install(work, 3, tree.tree_hash(work), "cut", derived=False)
    rel.activate(3)
    assert rel.restore_pristine(2)  # what the cut's tidy does
    mirror(rel.path(3), rel.staging, transfer=True)
    rel.write_staging_meta(3, rel.meta(3)["hash"])
    uncut(rel, work, 2, 3, True)
    assert rel.live() == 2 and rel.staging_meta()["generation"] == 2
    assert delta.base_tree(rel) == rel.staging  # the staging base is generation 2 as it went live
    assert (work / "lists" / "adult" / "domains").read_text() == "edited.example\n"  # the edit stays to be checked


def test_only_an_index_whose_bytes_root_recorded_is_reused(rel: Releases) -> None:
    with indextrust.trusted_previous(rel, 2) as p:
        assert p != ruleset.NO_PREVIOUS and p.read_bytes() == ruleset.index_path(rel.path(2)).read_bytes()
    assert not p.exists()
    idx = ruleset.index_path(rel.path(2))
    idx.write_bytes(idx.read_bytes()[:-1] + b" ")
    with indextrust.trusted_previous(rel, 2) as p:
        assert p == ruleset.NO_PREVIOUS
    idx.unlink()
    os.mkfifo(idx)  # never a read that blocks
    with indextrust.trusted_previous(rel, 2) as p:
        assert p == ruleset.NO_PREVIOUS


def test_a_previous_index_that_breaks_the_merge_costs_a_full_compile(rel: Releases, monkeypatch) -> None:
    cfg = load(rel.path(2) / "appliance.yaml")
    calls = []
    real = ruleset._compile

    def flaky(cfg, base, out, prev):
        calls.append(prev is not None)
        if prev is not None:
            raise IndexError("list index out of range")  # what the reviewer's crafted section did
        return real(cfg, base, out, prev)

    monkeypatch.setattr(ruleset, "_compile", flaky)
    rep = ruleset.compile_index(cfg, rel.path(2), previous=ruleset.index_path(rel.path(2)))
    assert calls == [True, False] and rep.entries > 0


def test_a_hung_compile_is_killed_after_its_timeout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(background, "compile_lists_into", lambda *a, **k: time.sleep(60))
    c = background.Compile(None, tmp_path)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(ruleset.ListError, match="did not finish within .* was killed"):
        c.wait(timeout=0.5)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(c.pid, os.WNOHANG)  # killed and reaped


def test_one_receive_waits_for_its_transfer_at_a_time(tmp_path: Path, monkeypatch) -> None:
    paths = Paths(tmp_path)
    assert serve.after_transfer_wait(paths) == 5 * 60  # no live config: the default sync.timeout
    r, w = os.pipe()
    monkeypatch.setattr(serve.sys, "stdin", io.TextIOWrapper(os.fdopen(r, "rb")))
    with serve.one_waiter(paths.run):
        t0 = time.monotonic()
        with pytest.raises(SyncError) as e:
            serve.dispatch(f"receive 3 {'a' * 64} --after-transfer", paths)
        assert e.value.exit_code == BUSY and "another receive is waiting" in str(e.value)
        assert "receive --after-transfer:" in str(e.value)  # the master then sends the plain receive
        assert time.monotonic() - t0 < 5
    os.close(w)
