"""`appliance admin serve` for real on loopback, against a state dir the test prepares (MASTER, generation 7, an
ha.log, a sync.log, an access log), read by headless chromium: what a person sees, no JS error, a drawn chart."""
from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.support import browser
from tests.support.env import APPLIANCE, EXAMPLES, free_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow
PASSWORD = "correct horse battery"


def _tree(root: Path, port: int) -> tuple[Path, Path]:
    etc, state = root / "etc", root / "state"
    shutil.copytree(EXAMPLES / "lists", etc / "lists")
    data = yaml.safe_load((EXAMPLES / "appliance.yaml").read_text())
    data["admin"] = {"listen": ["loopback"], "port": port, "user": "ops",
                     "password_hash": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()}
    data["proxy"]["metrics_port"] = free_port()  # nothing listens there: the page shows the proxy down
    (etc / "appliance.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (etc / "node.yaml").write_text("node: fw1\n")
    (state / "releases" / "7").mkdir(parents=True)
    os.symlink("releases/7", state / "current")
    (state / "role.json").write_text('{"role": "MASTER", "vhid": 1, "iface": "em0", "since": %d}' % time.time())
    (state / "ha.log").write_text("2024-01-03T10:00:00 carp: BACKUP -> MASTER vhid 1 vip 192.168.1.50/24 on em0 "
                                  "(peer silent)\n")
    (state / "sync").mkdir()
    (state / "sync" / "sync.log").write_text("2024-01-03T10:05:00 INFO generation 7 pushed to fw2\n")
    now = time.time()
    log = root / "access.log"
    log.write_text("".join(
        f"{now - 120 + i:.3f}      3 192.168.1.10 TCP_MISS/200 900 GET http://example.org/{i} - HIER_DIRECT/"
        f"203.0.113.5 text/html\n" for i in range(5)) + f"{now - 60:.3f}      1 192.168.1.11 TCP_DENIED/403 300 GET "
        "http://adult.example/ - HIER_NONE/- text/html [block:adult]\n")
    return etc / "appliance.yaml", log


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("admin")
    port = free_port()
    cfg, log = _tree(root, port)
    env = {**os.environ, "APPLIANCE_STATE_DIR": str(root / "state")}
    err = open(root / "serve.log", "wb")
    # as the systemd unit runs it: the config's text from a private copy (LoadCredential=), -c the original
    cred = root / "credentials"
    cred.mkdir(mode=0o700)
    shutil.copy(cfg, cred / "appliance.yaml")
    # ExecStartPre=+ (root): the certificate, and the node's name where the server can read it; the server's user
    # cannot read node.yaml beside the original (gone here: the name must come from what `admin cert` wrote)
    subprocess.run([APPLIANCE, "-c", str(cfg), "admin", "cert"], env=env, check=True, capture_output=True, timeout=120)
    (cfg.parent / "node.yaml").unlink()
    p = subprocess.Popen([APPLIANCE, "-c", str(cfg), "admin", "serve", "--access-log", str(log), "--config-copy",
                          str(cred / "appliance.yaml")], env=env,
                         stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: p.poll() is not None or b"status page on" in (root / "serve.log").read_bytes(), 30,
                   "admin serve listening")
        assert p.poll() is None, (root / "serve.log").read_text()
        yield f"https://127.0.0.1:{port}/", root
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        err.close()


def test_the_page_in_a_browser(served, tmp_path: Path) -> None:
    browser.require()
    url, _ = served
    page = browser.load(url, screenshot=tmp_path / "status-loopback.png", ignore_cert=True,
                        basic_auth=("ops", PASSWORD), timeout=90, evaluate=[
                            "document.getElementById('role').textContent",
                            "document.querySelector('#chart polyline.req').getAttribute('points').split(' ').length",
                            "+document.getElementById('chart').dataset.requests"])
    assert page.status == 200 and page.errors == []
    assert "MASTER" in page.text and "Generation: 7" in page.text
    assert "BACKUP -> MASTER vhid 1" in page.text and "generation 7 pushed to fw2" in page.text
    assert page.values == ["MASTER", 60, 6]
    assert "adult 1" in page.text  # today's summary: top categories


def test_a_wrong_password_gets_401(served) -> None:
    browser.require()
    page = browser.load(served[0], ignore_cert=True, basic_auth=("ops", "nope"), timeout=90)
    assert page.status == 401 and "MASTER" not in page.text


def test_status_json_and_metrics_with_the_password(served) -> None:
    url, root = served
    ctx = ssl.create_default_context(cafile=str(root / "state" / "admin" / "admin-cert.pem"))
    auth = {"Authorization": "Basic " + base64.b64encode(f"ops:{PASSWORD}".encode()).decode()}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    with opener.open(urllib.request.Request(url + "status.json", headers=auth), timeout=20) as r:
        s = json.load(r)
    assert (s["role"], s["sync"]["generation"], s["traffic"]["today"]["requests"]) == ("MASTER", 7, 6)
    with opener.open(urllib.request.Request(url + "metrics", headers=auth), timeout=20) as r:
        assert b"appliance_proxy_up 0" in r.read()
    log = (root / "serve.log").read_text()
    assert PASSWORD not in log and "$2b$" not in log
