"""Unit tests of the rule engine, list parsing/normalisation and the compiled index (no proxy)."""
from __future__ import annotations

import datetime as dt
import os
import sys
import time
from pathlib import Path

import pytest

from appliance.core import loader as cfgmod
from filters import lists as fl
from filters import ruleset
from filters.index import DomainIndex, IndexFormatError
from tests.support.proxy import make_tree

WED_10 = dt.datetime(2024, 1, 3, 10, 0)
SAT_10 = dt.datetime(2024, 1, 6, 10, 0)


@pytest.mark.parametrize("raw,want", [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("example.com:8080", "example.com"),
    ("bücher.de", "xn--bcher-kva.de"),
    ("XN--BCHER-KVA.DE", "xn--bcher-kva.de"),
    ("010.1.2.3", None),  # leading zeros are ambiguous (octal?): not a host
    ("10.1.2.3:443", "10.1.2.3"),
    ("[::1]:443", "::1"),
    ("2001:DB8::1", "2001:db8::1"),
    ("a b.com", None),
    ("-bad.com", None),
    ("", None),
    ("a" * 64 + ".com", None),
])
def test_norm_host(raw, want):
    assert fl.norm_host(raw) == want


def test_parse_lists_bad_lines_reported_with_line_numbers(tmp_path):
    f = tmp_path / "domains"
    f.write_bytes(b"# c\r\nGood.Example.\r\n\r\n.dot.example\r\n*.star.example\r\nbad domain\r\nb\xff\xfed.example\r\nx/y\n")
    p = fl.parse_file(f, "domains", "lists/c/domains")
    assert p.entries == [("good.example", 2), ("dot.example", 4), ("star.example", 5)]
    assert [b.line for b in p.bad] == [6, 7, 8]
    assert str(p.bad[0]).startswith("lists/c/domains:6: ")
    assert fl.count_file(f, "domains") == (3, 3)
    u = tmp_path / "urls"
    u.write_text("www.Example.com:8080/Path/\nhttp://files.example/x\nbad url/with space\n")
    p = fl.parse_file(u, "urls")
    assert p.entries == [("example.com", "/path/", 1), ("files.example", "/x", 2)]
    assert [b.line for b in p.bad] == [3]
    e = tmp_path / "expressions"
    e.write_text("ok.*x\n(unclosed\n")
    p = fl.parse_file(e, "expressions")
    assert [x[1] for x in p.entries] == [1] and p.bad[0].line == 2 and "regular expression" in p.bad[0].reason


@pytest.fixture
def engine(tmp_path):
    cfg_path = make_tree(tmp_path)
    cfg = cfgmod.load(cfg_path)
    eng, rep = ruleset.build_engine(cfg, cfg_path.parent, compile_in_child=False)
    return eng


def test_decision_order_and_sources(engine):
    d = engine.decide("127.0.0.1", "www.blocked.test", "http://www.blocked.test/", WED_10)
    assert (d.verdict, d.category, d.source, d.policy, d.rule) == ("block", "blocked", "lists/blocked/domains:2", None, "blocked.test")
    d = engine.decide("127.0.0.1", "ok.blocked.test", "http://ok.blocked.test/", WED_10)
    assert (d.verdict, d.category) == ("allow", "allowlist")  # allow wins over the parent domain's block
    d = engine.decide("127.0.0.9", "example.org", "http://example.org/", WED_10)
    assert (d.verdict, d.source) == ("deny", "proxy.clients")
    assert engine.decide("127.0.0.1", "example.org", "http://example.org/", WED_10).verdict == "allow"


def test_label_boundary_and_normalisation(engine):
    assert engine.decide("127.0.0.1", "aablocked.test").verdict == "allow"
    assert engine.decide("127.0.0.1", "blocked.test.evil").verdict == "allow"
    assert engine.decide("127.0.0.1", "A.B.BLOCKED.TEST.").verdict == "block"
    assert engine.decide("127.0.0.1", "blocked.test:8080").verdict == "block"
    assert engine.decide("127.0.0.1", "bücher.test").verdict == "block"
    assert engine.decide("127.0.0.1", "www.xn--bcher-kva.test").verdict == "block"
    assert engine.decide("127.0.0.1", "10.9.8.7").verdict == "block"
    assert engine.decide("127.0.0.1", "1.10.9.8.7").verdict == "allow"


def test_urls_and_expressions(engine):
    d = engine.decide("127.0.0.1", "127.0.0.1", "http://127.0.0.1:8000/private/a")
    assert (d.verdict, d.source) == ("block", "lists/blocked/urls:1")
    assert engine.decide("127.0.0.1", "127.0.0.1", "http://127.0.0.1/privateer").verdict == "allow"
    d = engine.decide("127.0.0.1", "files.test", "http://WWW.files.test:8080/Payload/x.exe")
    assert (d.verdict, d.source) == ("block", "lists/blocked/urls:2")
    d = engine.decide("127.0.0.1", "x.org", "http://x.org/a/SECRET-7.html")
    assert (d.verdict, d.source) == ("block", "lists/blocked/expressions:1")


def test_policies_schedule_and_subnet(engine):
    d = engine.decide("127.0.0.2", "vm", "http://vm/", WED_10)
    assert (d.verdict, d.category, d.policy, d.schedule) == ("block", "social", "staff-hours", "mon-fri 08:00-17:00")
    assert engine.decide("127.0.0.2", "vm", "http://vm/", SAT_10).verdict == "allow"
    assert engine.decide("127.0.0.3", "vm", "http://vm/", WED_10).verdict == "allow"
    assert engine.decide("127.0.0.4", "vm", "http://vm/", SAT_10).policy == "weekend"
    assert engine.decide("127.0.0.4", "vm", "http://vm/", WED_10).verdict == "allow"


def test_clock_env_is_injectable(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_FILTER_CLOCK", "2024-01-06 10:00")
    cfg_path = make_tree(tmp_path)
    eng, _ = ruleset.build_engine(cfgmod.load(cfg_path), cfg_path.parent, compile_in_child=False)
    assert eng.decide("127.0.0.2", "vm").verdict == "allow"  # Saturday: staff-hours is off
    assert eng.decide("127.0.0.4", "vm").verdict == "block"


def test_index_staleness_and_recompile(tmp_path):
    cfg_path = make_tree(tmp_path)
    cfg = cfgmod.load(cfg_path)
    base = cfg_path.parent
    assert not ruleset.is_fresh(cfg, base)
    rep = ruleset.ensure_index(cfg, base)  # compiled in a forked child
    assert rep.compiled and ruleset.is_fresh(cfg, base)
    assert ruleset.ensure_index(cfg, base).compiled is False  # fresh: not rebuilt
    lst = base / "lists" / "blocked" / "domains"
    lst.write_text(lst.read_text() + "added.test\n")
    os.utime(lst, ns=(time.time_ns(), time.time_ns() + 5_000_000))
    assert not ruleset.is_fresh(cfg, base)
    eng, rep = ruleset.build_engine(cfg, base)
    assert rep.compiled and eng.decide("127.0.0.1", "x.added.test").verdict == "block"


def test_index_multi_category_and_corrupt_file(tmp_path):
    cfg_path = make_tree(tmp_path, lists={"social/domains": "blocked.test\nvm\n"})
    cfg = cfgmod.load(cfg_path)
    ruleset.compile_index(cfg, cfg_path.parent)
    idx = DomainIndex(ruleset.index_path(cfg_path.parent))
    cats = sorted(c for c, _, _ in idx.lookup("blocked.test"))
    assert cats == ["blocked", "social"]
    assert idx.lookup("nothere.test") is None
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(IndexFormatError):
        DomainIndex(bad)


def test_bad_lines_reject(tmp_path):
    cfg_path = make_tree(tmp_path, filt={"bad_lines": "reject"}, lists={"blocked/domains": "ok.test\nnot ok\n"})
    with pytest.raises(ruleset.ListError, match=r"lists/blocked/domains:2"):
        ruleset.compile_index(cfgmod.load(cfg_path), cfg_path.parent)


def test_engine_module_does_not_import_mitmproxy():
    import subprocess

    code = "import sys, filters.engine, filters.ruleset, filters.index, filters.lists; print('mitmproxy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "False", out.stderr


def test_depth_pruned_lookups_match_probing_every_suffix(tmp_path):
    """The engine probes only suffixes whose label count occurs in the lists; the answers equal probing every suffix."""
    import random

    from filters.engine import RuleEngine

    doms = ["com", "b.example", "x.y.z.example", "deep.a.b.c.d.test", "10.1.2.3", "::1", "sub.b.example"]
    cfg = make_tree(tmp_path, lists={"big/domains": "\n".join(doms) + "\n"},
                    filt={"block": ["blocked", "big"], "policies": []})
    c = cfgmod.load(cfg)
    eng, _ = ruleset.build_engine(c, cfg.parent, compile_in_child=False)
    assert eng.index.meta["depths"] == [1, 2, 3, 4, 6]

    class OldIndex:  # an index compiled before depths existed: every suffix is probed
        meta = {k: v for k, v in eng.index.meta.items() if k != "depths"}
        lookup = eng.index.lookup

    full = RuleEngine(index=OldIndex(), clients=["127.0.0.0/8"], allow=eng.allow, block=eng.block)
    assert full._depths is None and full._lookup_host is None
    rnd = random.Random(3)
    labels = ["a", "b", "c", "d", "x", "y", "z", "deep", "sub", "www", "example", "test", "com", "blocked"]
    hosts = ["10.1.2.3", "[::1]:443", "www.b.example", "B.Example.", "q.x.y.z.example", "y.z.example", "d.test"]
    hosts += [".".join(rnd.choice(labels) for _ in range(rnd.randint(1, 8))) for _ in range(3000)]
    blocked = 0
    for h in hosts:
        a, b = eng.decide("127.0.0.1", h), full.decide("127.0.0.1", h)
        assert (a.verdict, a.category, a.source, a.rule) == (b.verdict, b.category, b.source, b.rule), h
        assert eng.hits(h) == full.hits(h), h
        blocked += a.blocked
    assert eng.decide("127.0.0.1", "q.x.y.z.example").rule == "x.y.z.example"
    assert eng.decide("127.0.0.1", "y.z.example").verdict == "allow"  # the parent of a listed domain is not listed
    assert eng.decide("127.0.0.1", "shop.com").rule == "com"  # a bare TLD entry still matches (depth 1 is probed)
    assert 100 < blocked < len(hosts)
