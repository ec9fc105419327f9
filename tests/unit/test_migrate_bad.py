"""`appliance import squidguard` refuses what SquidGuard refuses, naming file:line, and writes nothing then."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main

GOOD_TAIL = """
dest adult {
	domainlist adult/domains
}
acl {
	default {
		pass !adult all
	}
}
"""


def run(tmp: Path, conf: str, *extra: str):
    (tmp / "db" / "adult").mkdir(parents=True, exist_ok=True)
    (tmp / "db" / "adult" / "domains").write_text("adult.example\n")
    f = tmp / "squidGuard.conf"
    f.write_text(conf)
    out = tmp / "out"
    res = CliRunner().invoke(main, ["import", "squidguard", str(f), "--dbhome", str(tmp / "db"), "--out", str(out),
                                    *extra])
    return res, f, out


@pytest.mark.parametrize("conf,line,message", [
    ("dbhome /x\nbogus thing\n" + GOOD_TAIL, 2, "unknown keyword 'bogus'"),
    ("dest adult {\n\tdomainlist adult/domains\n\tcolour red\n}\nacl { default { pass all } }\n", 3,
     "unknown keyword 'colour' in dest adult"),
    ("dest adult {\n\tdomainlist adult/domains\n" + "acl {\n default {\n pass all\n }\n}\n", 3,
     "'acl' inside the dest adult block: is its closing '}' missing?"),
    ("dest adult {\n\tdomainlist adult/domains\n", 2, "unexpected end of file, expected '}' closing the dest"),
    (GOOD_TAIL + "}\n", 10, "unbalanced '}'"),
    ("dest adult {\n\tdomainlist adult/missing\n}\nacl {\n default {\n pass !adult all\n }\n}\n", 2,
     "no such list file"),
    ("dest adult {\n\tdomainlist adult/domains\n}\nacl {\n default {\n pass !porn all\n }\n}\n", 6,
     "pass names porn, which is no dest"),
    ("src kids {\n ip 10.0.0.0/8\n}\n" + GOOD_TAIL.replace("\tdefault", "\tstaff { pass all }\n\tdefault"), 9,
     "acl staff: no src staff is defined"),
    ("src kids {\n ip 10.0.0.300\n}\n" + GOOD_TAIL, 2, "not an IPv4 address"),
    ("src kids {\n ip 10.0.0.9-10.0.0.1\n}\n" + GOOD_TAIL, 2, "ends before it starts"),
    ("time t {\n weekly xyz 08:00-17:00\n}\n" + GOOD_TAIL, 2, "weekday format error"),
    ("time t {\n weekly * 08:00-25:00\n}\n" + GOOD_TAIL, 2, "not within 00:00-24:00"),
    ("src kids {\n ip 10.0.0.0/8\n within nightly\n}\n" + GOOD_TAIL, 3, "no time nightly is defined"),
    ("dest adult {\n}\ndest adult {\n}\n" + "acl { default { pass all } }\n", 3, "dest" + "ination adult is defined twice"),
    ("src kids {\n iplist kids.ips\n}\n" + GOOD_TAIL, 2, "iplist kids.ips: no such file"),
])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, conf, line, message):
    res, f, out = run(tmp_path, conf)
    assert res.exit_code == 2, res.output
    assert f"appliance: error: {f}:{line}: " in res.output and message in res.output, res.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_no_default_acl_is_refused(tmp_path):
    res, f, out = run(tmp_path, "dest adult {\n domainlist adult/domains\n}\n")
    assert res.exit_code == 2 and f"{f}: no default acl" in res.output
    assert not out.exists()


def test_a_non_empty_out_dir_is_refused_untouched(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine").write_text("keep")
    res, _, out = run(tmp_path, GOOD_TAIL)
    assert res.exit_code == 2 and "is not an empty directory" in res.output
    assert [p.name for p in out.iterdir()] == ["mine"]


def test_a_missing_config_file_is_named(tmp_path):
    res = CliRunner().invoke(main, ["import", "squidguard", str(tmp_path / "nope.conf"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and f"{tmp_path / 'nope.conf'}: cannot read" in res.output


def test_the_default_acl_alone_becomes_the_global_lists(tmp_path):
    res, _, out = run(tmp_path, GOOD_TAIL)
    assert res.exit_code == 0, res.output
    text = (out / "filter.yaml").read_text()
    assert "block:\n  - adult\n" in text and "policies" not in text
    assert (out / "lists" / "adult" / "domains").read_text() == "adult.example\n"
