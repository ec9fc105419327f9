"""Incremental list compile: only the categories whose list files changed are parsed again; the rest is reused from
the previous index, and the result answers exactly as a full compile does."""
from __future__ import annotations

import datetime as dt
import random
import shutil
from pathlib import Path

import pytest
import yaml

from appliance.core import loader as cfgmod
from filters import ruleset
from filters.index import DomainIndex, read_meta
from tests.support.proxy import make_tree

WED_10 = dt.datetime(2024, 1, 3, 10, 0)  # the staff-hours policy (social) is on
HOSTS = ["blocked.test", "x.blocked.test", "ok.blocked.test", "vm", "social.test", "a.social.test", "runsc",
         "exempt.test", "10.9.8.7", "calhost", "example-caps.test", "xn--bcher-kva.test", "new.test", "w.new.test",
         "both.test", "sub.both.test", "nothere.test", "localhost", "dup.test"]
URLS = ["http://www.files.test:8080/payload/x", "http://127.0.0.1/private/a", "http://h.test/secret-12.html",
        "http://blocked.test/", "http://new.test/x"]


def _answers(cfg_path: Path) -> list:
    cfg = cfgmod.load(cfg_path)
    eng, _ = ruleset.build_engine(cfg, cfg_path.parent, compile_in_child=False)
    out = []
    for client in ("127.0.0.1", "127.0.0.2", "127.0.0.4"):
        for h in HOSTS:
            d = eng.decide(client, h, when=WED_10)
            out.append((client, h, d.to_json(), eng.hits(h)))
        for u in URLS:
            h = u.split("/")[2].split(":")[0]
            out.append((client, u, eng.decide(client, h, u, WED_10).to_json(), eng.hits(h, u)))
    eng.index.close()
    return out


def _full(tmp: Path, etc: Path) -> list:
    """The same tree compiled from scratch, elsewhere."""
    copy = tmp / "full"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(etc, copy, ignore=shutil.ignore_patterns("compiled"))
    rep = ruleset.compile_index(cfgmod.load(copy / "appliance.yaml"), copy)
    assert rep.reused == []
    return _answers(copy / "appliance.yaml")


@pytest.fixture
def tree(tmp_path):
    lists = {"social/domains": "vm\nsocial.test\nboth.test\ndup.test\nDUP.test\n",
             "blocked/domains": "# test list\nblocked.test\nboth.test\ndup.test\n10.9.8.7\nCALHOST\n"}
    cfg_path = make_tree(tmp_path, lists=lists)
    rep = ruleset.compile_index(cfgmod.load(cfg_path), cfg_path.parent)
    assert rep.reused == [] and set(rep.parsed) == {"allowlist", "blocked", "social"}
    return cfg_path


def test_one_changed_category_is_the_only_one_parsed(tree, tmp_path):
    (tree.parent / "lists/social/domains").write_text("vm\nnew.test\nboth.test\n")
    rep = ruleset.compile_index(cfgmod.load(tree), tree.parent)
    assert rep.parsed == ["social"]
    assert sorted(rep.reused) == ["allowlist", "blocked"]
    assert _answers(tree) == _full(tmp_path, tree.parent)
    idx = DomainIndex(ruleset.index_path(tree.parent))
    assert [c for c, _, _ in idx.lookup("both.test")] == ["blocked", "social"]
    assert idx.lookup("social.test") is None and idx.lookup("new.test")[0][1] == "lists/social/domains:2"
    idx.close()


def test_nothing_changed_reuses_everything_and_answers_the_same(tree, tmp_path):
    before = _answers(tree)
    rep = ruleset.compile_index(cfgmod.load(tree), tree.parent)
    assert rep.parsed == [] and rep.entries == read_meta(ruleset.index_path(tree.parent))["entries"] + 3
    assert _answers(tree) == before == _full(tmp_path, tree.parent)


def test_urls_or_expressions_change_reparses_that_category(tree, tmp_path):
    (tree.parent / "lists/blocked/urls").write_text("new.test/x\n")
    rep = ruleset.compile_index(cfgmod.load(tree), tree.parent)
    assert rep.parsed == ["blocked"]
    answers = _answers(tree)
    assert answers == _full(tmp_path, tree.parent)
    assert any(u == "http://new.test/x" and d["verdict"] == "block" for _, u, d, _ in answers)


def test_a_removed_category(tree, tmp_path):
    data = yaml.safe_load(tree.read_text())
    data["filter"]["policies"] = []  # social was only in the policies
    tree.write_text(yaml.safe_dump(data))
    cfg = cfgmod.load(tree)
    rep = ruleset.compile_index(cfg, tree.parent)
    assert "social" not in rep.reused + rep.parsed and rep.parsed == [] and rep.reused
    assert _answers(tree) == _full(tmp_path, tree.parent)


def test_a_renamed_category(tree, tmp_path):
    etc = tree.parent
    (etc / "lists/social").rename(etc / "lists/social2")
    tree.write_text(tree.read_text().replace("social", "social2"))
    rep = ruleset.compile_index(cfgmod.load(tree), etc)
    assert rep.parsed == ["social2"]  # its shown file names changed: parsed again, never shown under the old name
    answers = _answers(tree)
    assert answers == _full(tmp_path, etc)
    assert any(d["category"] == "social2" and d["source"] == "lists/social2/domains:1" for _, _, d, _ in answers)
    assert all("social" not in hits for _, _, _, hits in answers)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "section", "parser"])
def test_a_corrupt_previous_index_means_a_full_compile(tree, tmp_path, damage):
    path = ruleset.index_path(tree.parent)
    data = bytearray(path.read_bytes())
    meta = read_meta(path)
    if damage == "garbage":
        data = bytearray(b"garbage" * 100)
    elif damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "section":  # a flipped bit in every category's keys: each checksum fails
        for c in meta["categories"]:
            off, n = c["section"]["blob"]
            if n:
                data[off] ^= 0x20
    else:
        data = data.replace(b'"parser":' + str(ruleset.PARSER_VERSION).encode(), b'"parser":0')
    path.write_bytes(bytes(data))
    rep = ruleset.compile_index(cfgmod.load(tree), tree.parent)
    assert rep.reused == []
    assert _answers(tree) == _full(tmp_path, tree.parent)


def test_previous_from_another_tree_is_reused_only_for_the_same_bytes(tree, tmp_path):
    """What a sync's check does: compile a new release's tree against the live release's index."""
    new = tmp_path / "release2"
    shutil.copytree(tree.parent, new, ignore=shutil.ignore_patterns("compiled"))
    (new / "lists/blocked/domains").write_text("blocked.test\nw.new.test\n")
    rep = ruleset.compile_index(cfgmod.load(new / "appliance.yaml"), new, previous=ruleset.index_path(tree.parent))
    assert rep.parsed == ["blocked"] and "social" in rep.reused
    assert _answers(new / "appliance.yaml") == _full(tmp_path, new)


def test_bad_lines_of_a_reused_category_still_count(tmp_path):
    cfg_path = make_tree(tmp_path, lists={"social/domains": "vm\nbad line\n"})
    rep = ruleset.compile_index(cfgmod.load(cfg_path), cfg_path.parent)
    assert rep.bad_count == 1 and "lists/social/domains:2" in rep.bad[0]
    (cfg_path.parent / "lists/blocked/domains").write_text("other.test\n")
    rep = ruleset.compile_index(cfgmod.load(cfg_path), cfg_path.parent)
    assert "social" in rep.reused and rep.bad_count == 1 and "lists/social/domains:2" in rep.bad[0]
    cfg_path.write_text(cfg_path.read_text().replace("filter:\n", "filter:\n  bad_lines: reject\n"))
    with pytest.raises(ruleset.ListError, match=r"lists/social/domains:2"):
        ruleset.compile_index(cfgmod.load(cfg_path), cfg_path.parent)


def test_bulk_domain_parser_equals_the_line_by_line_reading(tmp_path):
    """The C-speed scans send only odd lines to the one-by-one parser; every line gets the answer it would alone."""
    from filters import lists as fl

    rnd = random.Random(5)
    pieces = ["a", "b-c", "0", "9x", "_u", "-", ".", "..", "*.", "xn--bcher-kva", "bücher", "A", "Z9", "1", "255",
              "010", "::1", "[::1]", " ", "\t", "#", "x" * 63, "y" * 64, "\r", ":80", "/p", "é", "\xff"]
    lines = ["".join(rnd.choice(pieces) + rnd.choice(["", ".", ".", "-"]) for _ in range(rnd.randint(0, 5)))
             for _ in range(4000)]
    lines += ["a." * 126 + "b", "a." * 127 + "b", "1.2.3.4", "4.3.2.1.", "x.com1", "x.1com"]
    data = "\n".join(lines).encode("utf-8", "surrogateescape")
    for variant in (data, data.replace(b"\n", b"\r\n"), data + b"\n", b"\n" + data):
        part = fl.parse_domains(variant, "f")
        want, bad = [], []
        for no, text in fl._split_lines(variant):
            try:
                want.append((fl.domain_line(text), no))
            except ValueError as e:
                bad.append((no, str(e)))
        assert part.entries() == want
        assert [(b.line, b.reason) for b in part.bad] == bad
        assert part.depths == {k.count(".") + 1 for k, _ in want}
