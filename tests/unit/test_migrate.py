"""`appliance import squidguard` on configs written from SquidGuard's documentation and in pfSense's layout: every
(client, URL, time) of the tables is decided by our real engine as SquidGuard's documented semantics decide it.

The expected decisions are written by hand from SquidGuard's documentation (and its source, sgAclAccess and
sgAclCheckSource in sg.y): the first `src` that lists the client picks its first active acl (`within`/`outside`,
else `else`), or the default acl; the pass list is read left to right, the first dest listing the URL decides
(`!dest` blocks), `all`/`any` pass the rest, `none` blocks it, a timed dest outside its time is skipped, a src
matching by user never matches a request without ident. Each row says why."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from appliance.cli import main
from appliance.core.loader import load as load_config
from filters import ruleset
from tests.support.env import ROOT

DATA = ROOT / "tests" / "data" / "squidguard"
APPLIANCE = str(ROOT / ".venv" / "bin" / "appliance")
AT = {  # local times: 2024-01-01 is a Monday
    "wed10": dt.datetime(2024, 1, 3, 10, 0), "wed1629": dt.datetime(2024, 1, 3, 16, 29),
    "wed1630": dt.datetime(2024, 1, 3, 16, 30), "wed1759": dt.datetime(2024, 1, 3, 17, 59),
    "wed18": dt.datetime(2024, 1, 3, 18, 0), "wed20": dt.datetime(2024, 1, 3, 20, 0),
    "fri1615": dt.datetime(2024, 1, 5, 16, 15), "fri1730": dt.datetime(2024, 1, 5, 17, 30),
    "sat10": dt.datetime(2024, 1, 6, 10, 0), "mon0759": dt.datetime(2024, 1, 1, 7, 59),
}

# (client, URL, time, SquidGuard's decision, why). https:// is a CONNECT in tls: sni (the host alone).
DOCS_TABLE = [
    ("10.1.1.7", "http://adult.example/", "wed10", "block", "teachers: good !adult all -> !adult"),
    ("10.1.1.7", "http://school.example/", "wed10", "allow", "teachers: good"),
    ("10.1.1.7", "http://games.example/", "wed20", "allow", "teachers do not list games: all"),
    ("10.1.1.7", "http://www.xxx.example/page", "wed10", "block", "a domain list covers subdomains"),
    ("10.1.1.7", "http://files.example/adult/x.html", "sat10", "block", "adult urllist prefix"),
    ("10.1.1.7", "http://files.example/other", "sat10", "allow", "outside the url prefix"),
    ("10.1.1.7", "http://news.example/porn-story", "wed10", "block", "adult expressionlist"),
    ("10.1.1.7", "https://adult.example/", "wed10", "block", "CONNECT: the domain list"),
    ("10.1.2.15", "http://news.example/", "sat10", "allow", "10.1.2.10-10.1.2.20 is teachers"),
    ("10.1.2.9", "http://news.example/", "sat10", "block", "below the range: pupils, outside workhours: good none"),
    ("10.1.2.21", "http://news.example/", "sat10", "block", "above the range: pupils, good none"),
    ("10.1.5.5", "http://games.example/", "wed10", "allow", "pupils in workhours; games (within leisure) inactive"),
    ("10.1.5.5", "http://games.example/", "fri1615", "block", "fri 16:00-16:30 is workhours and leisure: !games"),
    ("10.1.5.5", "http://192.0.2.7/", "wed10", "block", "pupils: !in-addr"),
    ("10.1.5.5", "http://wiki.example/", "wed10", "allow", "pupils: good"),
    ("10.1.5.5", "http://news.example/", "wed10", "allow", "pupils in workhours: all"),
    ("10.1.5.5", "http://news.example/", "wed1629", "allow", "still workhours (to 16:30)"),
    ("10.1.5.5", "http://news.example/", "wed1630", "block", "16:30 is outside: else, good none"),
    ("10.1.5.5", "http://news.example/", "sat10", "block", "weekend: else, good none"),
    ("10.1.5.5", "http://wiki.example/", "sat10", "allow", "else: good"),
    ("10.1.5.5", "https://wiki.example/", "sat10", "allow", "else: good (host only)"),
    ("10.1.5.5", "http://adult.example/", "sat10", "block", "else: none"),
    ("10.1.0.4", "http://news.example/", "sat10", "block", "src admin needs a user: no ident, so pupils"),
    ("10.2.0.9", "http://adult.example/", "wed10", "block", "library within workhours: else, local !adult all"),
    ("10.2.0.9", "http://news.example/", "wed10", "allow", "library else: all"),
    ("10.2.1.2", "http://intranet.example/", "sat10", "block", "iplist range; outside workhours: none"),
    ("10.2.1.2", "http://news.example/", "wed20", "block", "outside workhours: none"),
    ("10.2.1.4", "http://news.example/", "sat10", "allow", "not in library.ips: default, any"),
    ("10.2.1.4", "http://adult.example/", "sat10", "block", "default: !adult"),
    ("10.2.1.4", "http://portal.example/staff/x", "sat10", "allow", "default: local url"),
    ("172.16.9.9", "http://games.example/", "wed20", "block", "default: !games, active in leisure"),
    ("172.16.9.9", "http://games.example/", "wed10", "allow", "games inactive in the day: any"),
    ("172.16.9.9", "http://intranet.example/", "wed10", "allow", "default: local"),
    ("172.16.9.9", "http://192.0.2.7/", "wed10", "allow", "default has no in-addr"),
    ("172.16.9.9", "https://adult.example/", "sat10", "block", "default: !adult (host only)"),
]

PFSENSE_TABLE = [
    ("192.168.10.5", "http://www.social.test/", "wed10", "block", "Staff within WorkHours: !blk_BL_socialnet"),
    ("192.168.10.5", "http://www.social.test/", "wed1759", "block", "WorkHours wed to 18:00"),
    ("192.168.10.5", "http://www.social.test/", "wed18", "allow", "18:00: else, which allows social"),
    ("192.168.10.5", "http://www.social.test/", "mon0759", "allow", "before 08:00: else"),
    ("192.168.10.5", "http://www.social.test/", "fri1615", "block", "fri 08:00-17:00"),
    ("192.168.10.5", "http://www.social.test/", "fri1730", "allow", "after fri 17:00: else"),
    ("192.168.10.5", "http://www.social.test/", "sat10", "allow", "weekend: else"),
    ("192.168.10.5", "https://www.social.test/", "wed10", "block", "CONNECT: the domain list"),
    ("192.168.10.5", "http://adult.test/", "wed20", "block", "else: !blk_BL_adult"),
    ("192.168.10.5", "http://cdn.social.test/x", "wed10", "allow", "Whitelist comes first for Staff"),
    ("192.168.10.5", "http://192.0.2.7/", "wed10", "allow", "Staff has no in-addr"),
    ("192.168.20.50", "http://news.test/", "wed10", "block", "Guests (range): none"),
    ("192.168.20.10", "http://example-news.test/", "wed10", "allow", "Guests: Whitelist"),
    ("192.168.20.30", "http://192.0.2.7/", "wed10", "block", "Guests: !in-addr"),
    ("192.168.20.30", "http://files.test/adult/a", "sat10", "block", "Guests: blk_BL_adult url"),
    ("192.168.20.51", "http://news.test/", "wed10", "allow", "above the range: default, all"),
    ("192.168.20.9", "http://adult.test/", "wed10", "block", "below the range: default, !blk_BL_adult"),
    ("192.168.30.3", "http://192.0.2.7/", "wed10", "block", "default: !in-addr"),
    ("192.168.30.3", "http://news.test/", "wed10", "allow", "default: all"),
    ("192.168.30.3", "http://www.social.test/", "wed10", "allow", "default does not list social"),
    ("192.168.30.3", "http://www.adult.test/", "wed10", "block", "default: !blk_BL_adult"),
    ("192.168.30.3", "http://files.test/adult/movie", "wed10", "block", "blk_BL_adult urllist"),
    ("192.168.30.3", "http://files.test/other", "wed10", "allow", "outside the url prefix"),
    ("192.168.30.3", "https://adult.test/", "sat10", "block", "default: !blk_BL_adult (host only)"),
    ("192.168.30.3", "http://cdn.social.test/", "sat10", "allow", "Whitelist"),
]


def run_import(tmp: Path, name: str, *extra: str):
    out = tmp / name
    res = CliRunner().invoke(main, ["import", "squidguard", str(DATA / name / "squidGuard.conf"), "--dbhome",
                                    str(DATA / name / "db"), "--out", str(out), *extra])
    return res, out


def appliance_yaml(out: Path) -> Path:
    """A whole cluster file around the imported filter section (the admin's paste)."""
    section = yaml.safe_load((out / "filter.yaml").read_text())
    cfg = {
        "cluster": {"vip": "192.168.1.50/24", "password": "change-me", "interface": "em0"},
        "nodes": {"fw1": {"lan": "192.168.1.2/24", "sync": "192.168.200.1/30", "advskew": 0},
                  "fw2": {"lan": "192.168.1.3/24", "sync": "192.168.200.2/30", "advskew": 100}},
        "proxy": {"clients": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]},
        **section,
    }
    path = out / "appliance.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sgimport")
    engines = {}
    for name in ("docs", "pfsense"):
        res, out = run_import(tmp, name)
        assert res.exit_code == 0, res.output
        path = appliance_yaml(out)
        cfg = load_config(path)
        engine, _ = ruleset.build_engine(cfg, out, compile_in_child=False)
        engines[name] = (path, engine, res.output)
    return engines


def decide(engine, client: str, url: str, when: str) -> str:
    if url.startswith("https://"):  # tls: sni: the CONNECT host only, as the proxy and explain decide it
        d = engine.decide(client, url.split("/")[2], None, AT[when])
    else:
        d = engine.decide(client, url.split("/")[2], url, AT[when])
    return "allow" if d.verdict == "allow" else "block"


@pytest.mark.parametrize("name,table", [("docs", DOCS_TABLE), ("pfsense", PFSENSE_TABLE)])
def test_every_row_is_decided_as_squidguard_decides(imported, name, table):
    _, engine, _ = imported[name]
    wrong = [(c, u, t, want, why) for c, u, t, want, why in table if decide(engine, c, u, t) != want]
    assert not wrong, wrong
    assert {r[3] for r in table} == {"allow", "block"}  # the table can fail both ways


def test_explain_json_agrees_with_the_table(imported):
    """The admin's own check: `appliance explain --json` on the imported config, a few rows of each table."""
    for name, rows in (("docs", DOCS_TABLE[:3] + DOCS_TABLE[12:14]), ("pfsense", PFSENSE_TABLE[:3])):
        path = imported[name][0]
        for client, url, when, want, _ in rows:
            r = subprocess.run([APPLIANCE, "-c", str(path), "explain", url, "--client", client, "--at",
                                AT[when].strftime("%Y-%m-%d %H:%M"), "--json"], capture_output=True, text=True,
                               timeout=60)
            got = json.loads(r.stdout)
            assert ("allow" if got["verdict"] == "allow" else "block") == want, (name, url, client, when, got)


def test_the_not_carried_list_names_file_line_and_reason(imported):
    docs, pf = imported["docs"][2], imported["pfsense"][2]
    conf = str(DATA / "docs" / "squidGuard.conf")
    assert f"{conf}:11: time workhours date" in docs and "date entries are not carried" in docs
    assert f"{conf}:22: src admin user:" in docs
    assert f"{conf}:17: time leisure 22:00-06:00" in docs and "no effect on decisions" in docs
    pfconf = str(DATA / "pfsense" / "squidGuard.conf")
    assert f"{pfconf}:74: pass Whitelist after !blk_BL_socialnet" in pf and "cdn.social.test" in pf
    assert f"{pfconf}:74: pass Whitelist after !in-addr" in pf and "192.0.2.80" in pf
    assert f"{pfconf}:74: none: carried as the category sg-none" in pf
    assert f"{pfconf}:55: rewrite safesearch" in pf
    # the Staff pass list has Whitelist first: no order note for it
    assert f"{pfconf}:65: pass Whitelist" not in pf


def test_the_listed_differences_are_real(imported):
    """What the list says differs does differ: Guests' Whitelist after !blk_BL_socialnet lets cdn.social.test
    through, which SquidGuard blocks (so these rows are not in the table)."""
    engine = imported["pfsense"][1]
    assert decide(engine, "192.168.20.30", "http://cdn.social.test/", "wed10") == "allow"
    assert decide(engine, "192.168.20.30", "https://news.test/", "wed10") == "allow"  # none, host only


def test_clients_cuts_the_policies_and_decides_the_same(tmp_path):
    res, out = run_import(tmp_path, "pfsense", "--clients", "192.168.0.0/16")
    assert res.exit_code == 0, res.output
    pols = yaml.safe_load((out / "filter.yaml").read_text())["filter"]["policies"]
    assert [p["name"] for p in pols] == ["Staff", "Staff-else", "Guests", "default"]
    assert all(c.startswith("192.168.") for p in pols for c in p["clients"])
    path = appliance_yaml(out)
    engine, _ = ruleset.build_engine(load_config(path), out, compile_in_child=False)
    wrong = [row for row in PFSENSE_TABLE if decide(engine, *row[:3]) != row[3]]
    assert not wrong, wrong


def test_strict_exits_nonzero_and_json_lists_the_same(tmp_path):
    res, out = run_import(tmp_path, "pfsense", "--strict", "--json")
    assert res.exit_code == 1
    doc = json.loads(res.output[: res.output.rindex("}") + 1])
    assert doc["filter"]["policies"][0]["name"] == "Staff"
    assert any(n["line"] == 74 and n["decisions_may_differ"] for n in doc["not_carried"])
    assert (out / "filter.yaml").is_file()  # written whole; --strict only changes the exit status


def test_lists_are_copied_into_our_layout(imported):
    out = imported["docs"][0].parent
    assert (out / "lists" / "adult" / "urls").read_text() == "files.example/adult\n"
    assert (out / "lists" / "adult" / "expressions").read_text() == "(sex|porn)\n"
    assert sorted(p.name for p in (out / "lists").iterdir()) == ["adult", "games", "good", "local", "sg-in-addr",
                                                                 "sg-none"]


def test_notes_for_expressions_and_overlaps_only_when_they_can_matter(tmp_path):
    db = tmp_path / "db"
    for cat, kind, text in [("adult", "domains", "adult.example\n"), ("good", "domains", "school.example\n"),
                            ("kids", "domains", "www.adult.example\n"),
                            ("ads", "expressions", "^www\\.ads\\.\n[[:digit:]]+\\.gif\n")]:
        (db / cat).mkdir(parents=True, exist_ok=True)
        (db / cat / kind).write_text(text)
    conf = tmp_path / "squidGuard.conf"
    conf.write_text("dest adult {\n domainlist adult/domains\n}\ndest good {\n domainlist good/domains\n}\n"
                    "dest kids {\n domainlist kids/domains\n}\ndest ads {\n expressionlist ads/expressions\n}\n"
                    "src a {\n ip 10.0.0.0/8\n continue\n}\n"
                    "acl {\n a {\n pass !adult good kids all\n }\n default {\n pass !ads all\n }\n}\n")
    res = CliRunner().invoke(main, ["import", "squidguard", str(conf), "--dbhome", str(db), "--out",
                                    str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert f"{conf}:19: pass kids after !adult" in res.output and "www.adult.example" in res.output
    assert "pass good after !adult" not in res.output  # disjoint lists: the order cannot matter
    assert f"{conf}:11: dest ads expressionlist ads/expressions: 1 expression(s) such as '^www" in res.output
    assert "use POSIX classes" in res.output
    assert f"{conf}:15: src a continue" in res.output
