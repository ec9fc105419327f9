"""`appliance report` on a log the real proxy wrote: allowed, blocked (two categories) and refused requests from
several clients; the JSON, the HTML page (in headless chromium) and calamaris/sarg against the test's own counts."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.support import browser
from tests.support.env import APPLIANCE
from tests.support.proxy import Proxy, connect_tunnel, fetch, make_tree, start_origin
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(300)


def _traffic(p: Proxy, origin: int) -> dict:
    """Send the mix; returns what the report must find, counted here as the requests are made."""
    want = {"requests": 0, "blocked": 0, "categories": {}, "refusals": {}, "clients": {}, "blocked_clients": {}}

    def did(client: str, status: int, got: int, category: str | None = None, reason: str | None = None) -> None:
        assert got == status, (client, got, status)
        want["requests"] += 1
        want["clients"][client] = want["clients"].get(client, 0) + 1
        if category or reason:
            want["blocked"] += 1
            want["blocked_clients"][client] = want["blocked_clients"].get(client, 0) + 1
        if category:
            want["categories"][category] = want["categories"].get(category, 0) + 1
        if reason:
            want["refusals"][reason] = want["refusals"].get(reason, 0) + 1

    for i in range(6):
        did("127.0.0.1", 200, fetch(p.port, f"http://127.0.0.1:{origin}/ok-{i}")[0])
    for i in range(3):
        did("127.0.0.2", 200, fetch(p.port, f"http://127.0.0.1:{origin}/two-{i}", client="127.0.0.2")[0])
    for i in range(4):
        did("127.0.0.1", 403, fetch(p.port, f"http://www.blocked.test/page-{i}")[0], category="blocked")
    status, sock = connect_tunnel(p.port, "www.blocked.test:443", client="127.0.0.4")
    sock.close()
    did("127.0.0.4", 403, status, category="blocked")
    for i in range(2):  # staff-hours policy of 127.0.0.2 at the test clock (Wednesday 10:00)
        did("127.0.0.2", 403, fetch(p.port, f"http://social.test/feed-{i}", client="127.0.0.2")[0], category="social")
    for port in (9, 19, 25):  # loopback ports outside the test's reachable pool
        did("127.0.0.1", 403, fetch(p.port, f"http://127.0.0.1:{port}/x")[0], reason="loopback")
    for i in range(2):  # outside proxy.clients
        did("127.0.0.5", 403, fetch(p.port, f"http://allowed-{i}.test/", client="127.0.0.5")[0],
            reason="client-not-allowed")
    return want


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    (root / "state").mkdir()
    srv, origin = start_origin()
    p = Proxy(make_tree(root), root / "state").wait_ready()
    try:
        since = time.time()  # after /healthz polling: the report is asked from here on
        time.sleep(0.01)
        want = _traffic(p, origin)
        log = root / "access.log"

        def logged() -> bool:
            return sum(1 for l in log.read_text().splitlines() if float(l.split()[0]) >= since) >= want["requests"]

        wait_until(logged, 10, "every request in the access log")
    finally:
        p.stop()
        srv.shutdown()
    want["bytes"] = sum(int(l.split()[4]) for l in log.read_text().splitlines() if float(l.split()[0]) >= since)
    iso = datetime.fromtimestamp(since).isoformat(timespec="microseconds")
    html = root / "report.html"
    r = subprocess.run([APPLIANCE, "-c", str(root / "etc" / "appliance.yaml"), "report", "--since", iso, "--json",
                        "--html", str(html)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return {"want": want, "got": json.loads(r.stdout), "html": html, "log": log, "root": root}


def test_json_figures_equal_the_tests_counts(run):
    want, got = run["want"], run["got"]
    assert (got["requests"], got["blocked"], got["bytes"], got["bad_lines"]) == (want["requests"], want["blocked"],
                                                                                 want["bytes"], 0)
    assert {c["category"]: c["blocks"] for c in got["categories"]} == want["categories"]
    assert {r["reason"]: r["count"] for r in got["refusals"]} == want["refusals"]
    assert {c["client"]: c["requests"] for c in got["top_clients"]} == want["clients"]
    assert {c["client"]: c["blocks"] for c in got["top_blocked_clients"]} == want["blocked_clients"]
    assert {d["domain"]: d["blocks"] for d in got["top_blocked_domains"]}["www.blocked.test"] == 5
    assert got["untagged_blocks"] == 0 and sum(h["requests"] for h in got["hours"]) == want["requests"]
    assert got["skipped"] > 0  # the /healthz polling before --since


def _num(text: str, label: str) -> int:
    m = re.search(rf"{label}\s*\n\s*([\d,]+)", text, re.IGNORECASE)
    assert m, f"{label!r} not on the page: {text[:400]!r}"
    return int(m.group(1).replace(",", ""))


CHARTS = """[...document.querySelectorAll('svg.chart')].map(s => {
  const r = s.getBoundingClientRect();
  const bars = [...s.querySelectorAll('rect')].filter(x => x.getBoundingClientRect().height > 0.5
                                                        && x.getBoundingClientRect().width > 0.5).length;
  return {w: r.width, h: r.height, bars: bars};
})"""
ROWS = """[...document.querySelectorAll('#refusals tr, #blocking-clients tr')].map(r => r.innerText.replace(/\\s+/g, ' ').trim())"""


@pytest.mark.browser
def test_the_page_a_person_sees(run, tmp_path):
    browser.require()
    want = run["want"]
    page = browser.load(run["html"].as_uri(), screenshot=tmp_path / "report.png", evaluate=[CHARTS, ROWS])
    assert page.errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
    text = page.text
    assert _num(text, "Requests") == want["requests"] and _num(text, "Blocked") == want["blocked"]
    assert _num(text, "Refused by the appliance") == sum(want["refusals"].values())
    share = f"{100 * want['blocked'] / want['requests']:.1f} % of requests"
    assert share in text
    for category, n in want["categories"].items():
        assert re.search(rf"\b{category}\s*\n\s*{n}\b", text), category
    charts, rows = page.values
    assert len(charts) == 3 and all(c["w"] > 100 and c["h"] > 50 and c["bars"] > 0 for c in charts), charts
    assert charts[1]["bars"] == len(want["categories"])
    for reason, n in want["refusals"].items():
        assert f"{reason} {n}" in rows
    for client, n in want["blocked_clients"].items():
        assert f"{client} {n}" in rows


def _calamaris(log: Path) -> tuple[int, int]:
    r = subprocess.run(["calamaris", "-a", "-f", "squid-extended"], stdin=open(log, "rb"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    parsed = int(re.search(r"lines parsed:\s+lines\s+(\d+)", r.stdout).group(1))
    invalid = int(re.search(r"invalid lines:\s+lines\s+(\d+)", r.stdout).group(1))
    return parsed, invalid


def test_calamaris_and_sarg_still_read_the_log(run, tmp_path):
    log, lines = run["log"], run["log"].read_text().splitlines()
    assert sum(1 for l in lines if l.endswith("]")) >= run["want"]["blocked"]  # the tagged lines are in it
    if not shutil.which("calamaris") and not shutil.which("sarg"):
        pytest.skip("neither calamaris nor sarg is installed")
    if shutil.which("calamaris"):
        assert _calamaris(log) == (len(lines), 0)
    if shutil.which("sarg"):
        out = tmp_path / "sarg"
        out.mkdir()
        r = subprocess.run(["sarg", "-l", str(log), "-o", str(out), "-x"], capture_output=True, text=True, timeout=120)
        m = re.search(r"Records read: (\d+), written: (\d+), excluded: (\d+)", r.stdout + r.stderr)
        assert m and int(m.group(1)) == len(lines) and int(m.group(2)) == len(lines), r.stdout + r.stderr
