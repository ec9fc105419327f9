"""The report's figures against counts made by hand, the bounded top tables, and the three views of one summary."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from appliance.report import page, summary as summod
from appliance.report.figures import Figures, TopCounter
from appliance.report.parse import parse_line
from appliance.report.reader import Window, read_all
from filters.proxy.accesslog import DENIED_TAG, block_tag, refusal_tag
from tests.bench.bench_report import make_log
from tests.support.env import APPLIANCE
from tests.unit.test_report_parse import T0, line

HAND = [  # (line, hour offset): 7 requests, 4 blocked, 2 in 10:00, 5 in 11:00
    (line(ts=T0, client="10.0.0.1", size=100), 0),
    (line(ts=T0 + 60, client="10.0.0.2", code="TCP_DENIED", status=403, size=10, url="http://x.adult.test/a",
          peer="-", tag=block_tag("adult")), 0),
    (line(ts=T0 + 3600, client="10.0.0.2", code="TCP_DENIED", status=403, size=10, method="CONNECT",
          url="x.adult.test:443", peer="-", tag=block_tag("adult")), 1),
    (line(ts=T0 + 3700, client="10.0.0.3", code="TCP_DENIED", status=403, size=0, url="http://127.0.0.1/",
          peer="-", tag=refusal_tag("loopback")), 1),
    (line(ts=T0 + 3800, client="10.9.9.9", code="TCP_DENIED", status=403, size=5, peer="-", tag=DENIED_TAG), 1),
    (line(ts=T0 + 3900, client="10.0.0.1", size=1000, method="CONNECT", url="ok.test:443"), 1),
    (line(ts=T0 + 4000, client="10.0.0.1", code="TCP_TUNNEL", size=2000, method="CONNECT", url="ok.test:443"), 1),
]


def _fig(lines: list[str]) -> Figures:
    fig = Figures()
    for text in lines:
        fig.add(parse_line(text))
    return fig


def test_figures_by_hand():
    fig = _fig([l for l, _ in HAND])
    assert (fig.requests, fig.blocked, fig.bytes, fig.untagged_blocks) == (7, 4, 3125, 0)
    assert fig.categories.top(5) == [("adult", 2)]
    assert fig.refusals.top(5) == [("client-not-allowed", 1), ("loopback", 1)]
    assert fig.blocked_domains.top(5) == [("x.adult.test", 2), ("127.0.0.1", 1), ("a.test", 1)]
    assert fig.clients.top(2) == [("10.0.0.1", 3), ("10.0.0.2", 2)]
    assert fig.blocking_clients.top(5) == [("10.0.0.2", 2), ("10.0.0.3", 1), ("10.9.9.9", 1)]
    h = int(T0) // 3600
    assert fig.series() == [(h, 2, 1), (h + 1, 5, 3)]
    assert fig.blocked_share == pytest.approx(4 / 7) and fig.exact


def test_a_plain_squid_denied_line_counts_as_blocked_without_a_category():
    fig = _fig(["1704276000.000      3 10.0.0.8 TCP_DENIED/403 3800 GET http://b.test/ - HIER_NONE/- text/html\n"])
    assert (fig.blocked, fig.untagged_blocks, fig.categories.top(3)) == (1, 1, [])


def test_empty_hours_are_zero_in_the_series():
    fig = _fig([line(ts=T0), line(ts=T0 + 3 * 3600)])
    assert [(r, b) for _, r, b in fig.series()] == [(1, 0), (0, 0), (0, 0), (1, 0)]


def test_top_counter_stays_bounded_and_keeps_the_heavy_hitters():
    """A million distinct keys cost at most `cap` entries; keys far above the noise keep their place and count."""
    t = TopCounter(cap=1000)
    for i in range(1_000_000):
        t.add(f"d{i}.test")
        if i % 10 == 0:
            t.add("heavy.test")
        if i % 50 == 0:
            t.add("second.test")
        assert len(t.counts) <= 1000 or i % 100_000  # checked cheaply: the bound holds at every prune
    assert len(t.counts) <= 1000 and not t.exact
    (k1, n1), (k2, n2) = t.top(2)
    assert (k1, k2) == ("heavy.test", "second.test")
    assert 100_000 - t.max_error <= n1 <= 100_000 and 20_000 - t.max_error <= n2 <= 20_000


def test_generated_log_matches_the_generator(tmp_path):
    want = make_log(tmp_path / "access.log", 20_000)
    fig = read_all([tmp_path / "access.log"], Figures(), Window())
    assert (fig.requests, fig.blocked, fig.bytes, fig.bad_lines) == (want["requests"], want["blocked"], want["bytes"], 0)
    assert dict(fig.categories.top(50)) == want["categories"] and dict(fig.refusals.top(50)) == want["refusals"]


def test_summary_json_and_html_show_the_same_figures():
    fig = _fig([l for l, _ in HAND] + [line(client="<b>x</b>", url="http://<script>.test/")])
    s = summod.summary(fig, Window(), now=T0)
    assert s["schema"] == 1 and (s["requests"], s["blocked"], s["refused"]) == (8, 4, 2)
    assert s["categories"] == [{"category": "adult", "blocks": 2}] and s["untagged_blocks"] == 0
    assert [h["requests"] for h in s["hours"]] == [3, 5]
    json.dumps(s)  # plain data only
    html = page.render(s)
    assert re.search(r'id="requests">8<', html) and re.search(r'id="blocked">4<', html)
    assert "<script" not in html.replace("<script>", "") and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "http://" not in html.split("<body>", 1)[1].replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert html.count("<svg") == 3 and "<rect" in html


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([APPLIANCE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_bad_input_names_the_option_or_file(tmp_path):
    log = tmp_path / "access.log"
    log.write_text("".join(l for l, _ in HAND))
    for args, msg in ((["--since", "soonish", str(log)], "--since 'soonish': not a time"),
                      (["--client", "10.0.0.300", str(log)], "--client '10.0.0.300': not an address"),
                      (["--since", "2024-01-04", "--until", "2024-01-03", str(log)], "is not after --since"),
                      ([str(tmp_path / "nope.log")], "nope.log: no such file"),
                      (["--html", str(tmp_path / "no" / "r.html"), str(log)], "does not exist")):
        r = _run("report", *args, cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    (tmp_path / "bad.log").write_text(l := HAND[0][0] + "oops\n")
    r = _run("report", "--strict", str(tmp_path / "bad.log"), cwd=tmp_path)
    assert r.returncode == 2 and f"{tmp_path / 'bad.log'}:2: not a Squid access-log record" in r.stderr
    assert not list(tmp_path.glob("*.html")) and l


def test_cli_json_text_and_html(tmp_path):
    log = tmp_path / "access.log"
    log.write_text("".join(l for l, _ in HAND) + "not a record\n")
    r = _run("report", "--json", "--html", str(tmp_path / "r.html"), str(log), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["requests"], s["blocked"], s["bad_lines"], s["sources"][0]["bad"]) == (7, 4, 1, 1)
    assert 'id="requests">7<' in (tmp_path / "r.html").read_text()
    r = _run("report", "--client", "10.0.0.0/30", str(log), cwd=tmp_path)
    assert r.returncode == 0 and "Top categories" in r.stdout and f"bad line {log}:8" in r.stdout
    assert re.search(r"requests\s+│\s+6\b", r.stdout), r.stdout  # 10.0.0.1-3 only: 3 + 2 + 1
