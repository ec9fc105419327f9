"""The status page in the namespace lab (root): each node runs `appliance admin serve`; headless chromium in the
master's namespace reads the master's page (loopback) and the backup's (over the sync link): MASTER on one, BACKUP on
the other, the generation, a drawn chart with the requests just sent, no JavaScript error; screenshot status.png."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from appliance.admin.traffic import CACHE_SECONDS
from appliance.ha import ip as netns
from appliance.lab import lifecycle, topology
from appliance.lab.model import LabError
from tests.support import browser
from tests.support.env import EXAMPLES, need_tool
from tests.support.wait import wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.browser]
PORT = 8443  # admin.port in the example
REQUESTS = 4


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    need_tool("ip", "arping", "curl")
    browser.require()
    try:
        with lifecycle.running(EXAMPLES / "appliance.yaml", tmp_path_factory.mktemp("labs"), "ad") as data:
            yield data
    except LabError as e:
        pytest.fail(f"lab: {e}")


def _traffic(lab, node: str) -> None:
    """REQUESTS through the node's own proxy (it runs on every node) from the lab's client: its access log fills."""
    n = lab.nodes[node]
    for _ in range(REQUESTS):
        subprocess.run(netns.in_ns(lab.client.netns, ["curl", "-s", "-o", "/dev/null", "--max-time", "10", "-x",
                                                      f"http://{n.lan_ip}:{lab.proxy_port}", lab.origin]),
                       timeout=20, check=False)


def _page(lab, ns: str, url: str, shot: Path | None):
    return browser.load(url, netns=ns, ignore_cert=True, screenshot=shot, timeout=90, evaluate=[
        "document.getElementById('role').textContent",
        "document.querySelector('#chart polyline.req').getAttribute('points').split(' ').length",
        "+document.getElementById('chart').dataset.requests"])


def test_master_and_backup_pages(lab, tmp_path: Path) -> None:
    master = topology.holders(lab)[0]
    backup = next(n for n in lab.nodes if n != master)
    for node in lab.nodes:
        _traffic(lab, node)
    ns = lab.nodes[master].netns
    url_m = f"https://127.0.0.1:{PORT}/"
    url_b = f"https://{lab.nodes[backup].sync_ip}:{PORT}/"
    # the servers started beside the proxies; the first page waits until they listen
    wait_until(lambda: subprocess.run(netns.in_ns(ns, ["curl", "-sk", "-o", "/dev/null", url_b]),
                                      timeout=20).returncode == 0, 30, "the backup's status page")
    # the figures are cached for CACHE_SECONDS (the peers' questions filled the cache before the requests)
    for url in (url_m, url_b):
        wait_until(lambda: _hour_requests(ns, url) >= REQUESTS, CACHE_SECONDS + 15, f"{url}: the requests counted")
    pm = _page(lab, ns, url_m, tmp_path / "status.png")
    pb = _page(lab, ns, url_b, tmp_path / "status-backup.png")
    for p, role in ((pm, "MASTER"), (pb, "BACKUP")):
        assert p.status == 200 and p.errors == [], (p.url, p.errors)
        assert p.values[0] == role and p.values[1] == 60, p.values
        assert p.values[2] >= REQUESTS, p.values  # the chart holds the requests just sent
        assert "Generation:" in p.text
    assert _generation(pm.text) == _generation(pb.text) == "1", (_generation(pm.text), _generation(pb.text))
    assert (tmp_path / "status.png").read_bytes()[:4] == b"\x89PNG"


def _hour_requests(ns: str, url: str) -> int:
    r = subprocess.run(netns.in_ns(ns, ["curl", "-sk", "--max-time", "10", url + "status.json"]), capture_output=True,
                       text=True, timeout=20)
    try:
        return sum(row[1] for row in json.loads(r.stdout)["traffic"]["chart"])
    except (ValueError, KeyError, TypeError):
        return 0


def _generation(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("Generation:"):
            return line.split(":", 1)[1].strip()
    return None
