"""The status page's HTTP side on a loopback listener with fake sources: read-only (405), nothing but three paths
(404), the password (401, then 200), the page escapes what it shows, and no secret reaches the log."""
from __future__ import annotations

import base64
import http.client
import logging
import ssl
from pathlib import Path

import bcrypt
import pytest

from appliance.admin import access, gather, page, tls
from appliance.admin.limits import Throttle
from appliance.admin.server import AdminServer, Listener
from appliance.admin.traffic import Traffic
from appliance.core.paths import Paths

PASSWORD = "hunter2 hunter2"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10))  # the lowest cost the config takes (~0.1 s, once)
STATUS = {"node": "fw1", "role": "MASTER", "sync_generation": 7, "proxy": {"up": True, "pid": 42},
          "carp": {"running": True, "engine": "speaker", "supervisor_pid": 41, "healthy": True},
          "vhids": [{"vhid": 1, "role": "MASTER", "vip": "192.168.1.50/24", "iface": "em0", "advskew": 0,
                     "since": 1.0}]}


class NoPeers(gather.Peers):
    def start(self) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path):
    paths = Paths(tmp_path / "state")
    paths.state.mkdir()
    paths.ha_log.write_text("2024-01-03T10:00:00 carp: BACKUP -> MASTER vhid 1 <script>alert(1)</script>\n")
    cert, key = tls.ensure_cert(paths, "fw1", ["127.0.0.1"])
    gate = access.Gate(allow=[], sync_nets=[], peers=set(), user="ops", password_hash=HASH)
    src = gather.Sources(paths=paths, status=lambda: STATUS, metrics=lambda: "appliance_proxy_workers 2\n",
                         traffic=Traffic(tmp_path / "access.log"), peers=NoPeers({}, 0, None))
    s = AdminServer(["127.0.0.1"], 0, tls.server_context(cert, key), gate, src)
    port = s.start()[0][1]
    yield port, gate
    s.stop()


def ask(port: int, method: str = "GET", path: str = "/", auth: str | None = None) -> tuple[int, dict, bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        c.request(method, path, headers=headers)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


GOOD = f"ops:{PASSWORD}"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
def test_read_only(server, method: str) -> None:
    code, headers, _ = ask(server[0], method, "/", GOOD)
    assert code == 405 and headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("path", ["/x", "/status.json/", "/../etc/passwd", "/favicon.ico", "/metrics/x"])
def test_three_paths_only(server, path: str) -> None:
    assert ask(server[0], "GET", path, GOOD)[0] == 404


def test_password_required_and_checked(server) -> None:
    code, headers, _ = ask(server[0])
    assert code == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    assert ask(server[0], auth="ops:wrong")[0] == 401
    code, headers, body = ask(server[0], auth=GOOD)
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src" not in headers["Content-Security-Policy"] and "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"MASTER" in body and b"<script>" not in body and b"&lt;script&gt;" in body


def test_head_and_json_and_metrics(server) -> None:
    code, headers, body = ask(server[0], "HEAD", "/status.json", GOOD)
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0
    code, _, body = ask(server[0], "GET", "/status.json", GOOD)
    assert code == 200 and b'"generation": 7' in body
    code, headers, body = ask(server[0], "GET", "/metrics?x=1", GOOD)
    assert code == 200 and body == b"appliance_proxy_workers 2\n" and "version=0.0.4" in headers["Content-Type"]


def test_no_secret_in_the_log(server, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="appliance.admin")
    ask(server[0], auth="ops:wrong-guess")
    ask(server[0], auth=GOOD)
    text = caplog.text
    assert "GET / HTTP/1.1" in text and "401" in text
    for secret in (PASSWORD, "wrong-guess", HASH.decode(), base64.b64encode(GOOD.encode()).decode()):
        assert secret not in text


def test_sources_outside_the_gate_are_closed_before_tls() -> None:
    gate = access.Gate(allow=[], sync_nets=[], peers=set())
    lst = Listener.__new__(Listener)
    lst.gate, lst.throttle = gate, Throttle()
    assert lst.verify_request(None, ("127.0.0.1", 1)) and not lst.verify_request(None, ("192.0.2.1", 1))


def test_key_is_private_and_cert_reused(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    cert, key = tls.ensure_cert(paths, "fw1", ["127.0.0.1", "192.168.200.1"])
    assert key.stat().st_mode & 0o777 == 0o600
    first = cert.read_bytes()
    assert tls.ensure_cert(paths, "fw1", ["127.0.0.1"])[0].read_bytes() == first


def test_signed_by_the_appliance_ca_when_there_is_one(tmp_path: Path) -> None:
    from mitmproxy import certs  # deferred: only this test makes a CA

    certs.CertStore.create_store(tmp_path / "ca", "mitmproxy", 2048, organization="carpguard", cn="test CA")
    cert, _ = tls.ensure_cert(Paths(tmp_path / "state"), "fw1", ["127.0.0.1"], tmp_path / "ca" / "mitmproxy-ca.pem")
    from cryptography import x509  # deferred: as above

    leaf, ca_cert = x509.load_pem_x509_certificates(cert.read_bytes())
    assert leaf.issuer == ca_cert.subject and "test CA" in ca_cert.subject.rfc4514_string()


def test_chart_of_an_empty_hour_is_drawn_flat() -> None:
    snap = {"node": "fw2", "role": "BACKUP", "vhids": [], "peers": {"fw1": {"role": "MASTER", "sync": "x"}},
            "sync": {"generation": None, "last": []}, "transitions": [], "engine": {}, "proxy": {},
            "traffic": {"chart": [[60 * i, 0, 0] for i in range(60)], "today": {"requests": 0, "blocked": 0,
                        "blocked_share": 0, "clients": 0, "categories": [], "blocked_domains": [], "errors": []}},
            "at": 0}
    html = page.render(snap)
    assert html.count("<polyline") == 2 and 'data-points="60"' in html and "<b>fw1</b>" in html
