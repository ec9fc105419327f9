"""Abuse suite (issue 11), the real proxy on loopback in both `tls: sni` (CONNECT fast path + mitmproxy for HTTP) and
`tls: intercept` (mitmproxy for everything): destinations never proxied in every spelling, names resolving to loopback
(a stub DNS server of the test's own), Host mismatch, control characters in a CONNECT host, ports. Each refusal is
asserted by the proxy's own block page and reason and its access-log record, not by a status code alone."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time

import pytest

from tests.support.dns import StubDNS
from tests.support.env import APPLIANCE
from tests.support.proxy import LISTS, Proxy, fetch, get_local, make_tree, start_origin
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)
SQUID_LINE = re.compile(r"^\d+\.\d{3} +\d+ \S+ [A-Z_]+/\d{3} \d+ (?:[A-Z]+|-) \S+ \S+ (HIER_DIRECT|HIER_NONE)/\S+ \S+( \[\S+\])?$")
LOOPBACK = ("127.0.0.1", "127.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.000.000.001", "[::ffff:127.0.0.1]",
            "localhost.", "127.0.0.2", "0177.0.0.2", "127.000.000.002", "2130706434", "127.2", "0x7f.0.0.2",
            "[::ffff:127.0.0.2]", "[::1]")


@pytest.fixture(scope="module")
def origins(tmp_path_factory):
    """(plain HTTP origin port, TLS origin port, a loopback server the proxy must never reach)."""
    srv, port = start_origin()
    tls_srv, tls_port = start_origin(tmp_path_factory.mktemp("tls"))
    private = socket.socket()  # "a local test server": listens, but is not one of the tests' reachable origins
    private.bind(("127.0.0.1", 0))
    private.listen(16)
    yield port, tls_port, private.getsockname()[1]
    private.close()
    srv.shutdown()
    tls_srv.shutdown()


@pytest.fixture(scope="module")
def dns():
    s = StubDNS({"origin.test": ["127.0.0.1"], "to-loopback.test": ["127.0.0.1"], "to-v6-loopback.test": ["::1"],
                 "to-metadata.test": ["169.254.169.254"], "to-node.test": ["192.168.1.2"],
                 "to-mapped.test": ["::ffff:127.0.0.1"]}).start()
    yield s
    s.close()


@pytest.fixture(scope="module", params=["sni", "intercept"])
def proxy(request, tmp_path_factory, origins, dns):
    root = tmp_path_factory.mktemp(f"abuse-{request.param}")
    (root / "state").mkdir()
    lists = {"blocked/domains": LISTS["blocked/domains"] + "127.0.0.2\n"}
    cfg = make_tree(root, proxy={"tls": request.param}, lists=lists)
    p = Proxy(cfg, root / "state", env={"APPLIANCE_PROXY_RESOLVER": f"{dns.address[0]}:{dns.address[1]}"})
    p.wait_ready(60)
    p.root, p.mode, p.cfg = root, request.param, cfg
    p.metrics_port = _metrics_port(cfg)
    yield p
    p.stop()


def _metrics_port(cfg) -> int:
    import yaml

    return yaml.safe_load(cfg.read_text())["proxy"]["metrics_port"]


def _log(p: Proxy) -> list[str]:
    path = p.root / "access.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    assert all(SQUID_LINE.match(line) for line in lines), [x for x in lines if not SQUID_LINE.match(x)]
    return lines


def _logged(p: Proxy, pattern: str) -> str:
    rx = re.compile(pattern)
    found: list[str] = []

    def seen() -> bool:
        found[:] = [line for line in _log(p) if rx.search(line)]
        return bool(found)

    wait_until(seen, 10, f"access log line {pattern!r}")
    return found[-1]


def _refusal(body: bytes, reason: str) -> str:
    text = body.decode("utf-8", "replace")
    assert "category: appliance" in text and f"refused by the appliance ({reason})" in text, text
    return text


def _connect_body(p: Proxy, target: str, client: str = "127.0.0.1") -> tuple[int, bytes]:
    """CONNECT target: (status, the body of a refusal; b"" for 200, the tunnel is closed at once). The body is read
    to its Content-Length: mitmproxy keeps the connection open after a refused CONNECT, the fast path closes it."""
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10, source_address=(client, 0))
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nAccept: text/plain\r\n\r\n".encode())
    data = b""
    try:
        while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
            data += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        head = data.partition(b"\r\n\r\n")[0].lower()
        length = re.search(rb"\r\ncontent-length: *(\d+)", head)
        if status != 200:
            while (length is None or len(data.partition(b"\r\n\r\n")[2]) < int(length[1])) and (chunk := s.recv(65536)):
                data += chunk
    except (ConnectionResetError, socket.timeout):
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    s.close()
    return status, data.partition(b"\r\n\r\n")[2]


def _raw(p: Proxy, data: bytes) -> bytes:
    """Send raw bytes to the proxy, read its answer until it closes (or 10 s)."""
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(data)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
            if b"\r\n\r\n" in got and b"Connection: close" not in got and b"connection: close" not in got.lower():
                break
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    return got


# ------------------------------------------------------------------ never proxied

def test_the_appliances_own_metrics_are_not_reachable_through_the_proxy(proxy):
    url = f"http://127.0.0.1:{proxy.metrics_port}/metrics"
    status, body, _ = fetch(proxy.port, url, accept="text/plain")
    text = _refusal(body, "loopback")
    assert status == 403 and "appliance_proxy_requests_total" not in text
    _logged(proxy, rf" TCP_DENIED/403 \d+ GET {re.escape(url)} - HIER_NONE/- ")


def test_connect_to_a_local_server_is_refused(proxy, origins):
    private = origins[2]
    status, body = _connect_body(proxy, f"127.0.0.1:{private}")
    assert status == 403
    _refusal(body, "loopback")
    _logged(proxy, rf" TCP_DENIED/403 \d+ CONNECT 127\.0\.0\.1:{private} ")


@pytest.mark.parametrize("spelling", LOOPBACK)
def test_every_spelling_of_loopback_is_refused(proxy, origins, spelling):
    private = origins[2]
    status, body, _ = fetch(proxy.port, f"http://{spelling}:{proxy.metrics_port}/metrics", accept="text/plain")
    assert status == 403
    _refusal(body, "loopback")
    status, body = _connect_body(proxy, f"{spelling}:{private}")
    assert status == 403
    _refusal(body, "loopback")


def test_a_listed_loopback_literal_is_refused_in_every_spelling_and_the_lists_see_the_canonical_host(proxy, origins):
    """127.0.0.2 is listed and loopback: refused whatever the spelling. The lists see canonical hosts: the urls entry
    127.0.0.1/private/ blocks 0x7f.1 and 2130706433 on the one loopback origin the test proxy may reach."""
    port = origins[0]
    for spelling in ("0177.0.0.2", "127.000.000.002", "2130706434", "127.2", "0x7f.0.0.2", "[::ffff:127.0.0.2]"):
        status, body, _ = fetch(proxy.port, f"http://{spelling}/", accept="text/plain")
        assert status == 403 and b"127.0.0.2" in body, spelling
    for spelling in ("0x7f.1", "2130706433", "0177.0.0.1", "[::ffff:127.0.0.1]"):
        status, body, _ = fetch(proxy.port, f"http://{spelling}:{port}/private/x", accept="text/plain")
        assert status == 403 and b"rule: lists/blocked/urls:1" in body, (spelling, body)
    _logged(proxy, rf" TCP_DENIED/403 \d+ GET http://127\.0\.0\.1:{port}/private/x ")
    status, body, _ = fetch(proxy.port, f"http://0x7f.1:{port}/public")  # the same origin, not listed: reached
    assert status == 200 and body.startswith(b"origin says hello: /public")


@pytest.mark.parametrize("name,reason", [("to-loopback.test", "loopback"), ("to-v6-loopback.test", "loopback"),
                                         ("to-mapped.test", "loopback"), ("to-metadata.test", "link-local"),
                                         ("to-node.test", "cluster-address")])
def test_a_name_resolving_to_a_refused_address_is_refused(proxy, dns, name, reason):
    status, body, _ = fetch(proxy.port, f"http://{name}:{proxy.metrics_port}/metrics", accept="text/plain")
    assert status == 403
    assert f"{name} resolves to" in _refusal(body, reason)
    status, body = _connect_body(proxy, f"{name}:{proxy.metrics_port}")
    assert status == 403
    _refusal(body, reason)
    assert name in dns.queries  # the proxy asked the test's resolver, not the system's


def test_a_name_resolving_to_a_reachable_origin_passes(proxy, origins):
    port, tls_port, _ = origins
    status, body, _ = fetch(proxy.port, f"http://origin.test:{port}/named")
    assert status == 200 and body.startswith(b"origin says hello: /named")
    line = _logged(proxy, rf" TCP_MISS/200 \d+ GET http://origin\.test:{port}/named ")
    assert "HIER_DIRECT/127.0.0.1" in line
    status, body = _connect_body(proxy, f"origin.test:{tls_port}")
    assert status == 200


def test_a_name_the_resolver_does_not_know_is_never_connected(proxy):
    status, _, _ = fetch(proxy.port, "http://nowhere.test:8080/")
    assert status in (502, 503)  # no address: the proxy's error, never a connection the guard did not check


# ------------------------------------------------------------------ Host header, log injection

def test_host_header_mismatch_is_refused(proxy, origins):
    port = origins[0]
    req = (f"GET http://origin.test:{port}/x HTTP/1.1\r\nHost: blocked.test\r\nAccept: text/plain\r\n"
           "Connection: close\r\n\r\n").encode()
    got = _raw(proxy, req)
    assert got.startswith(b"HTTP/1.1 409"), got[:200]
    assert b"refused by the appliance (host-mismatch)" in got
    req = (f"GET http://origin.test:{port}/x HTTP/1.1\r\nHost: 0x7f.1:{port}\r\nConnection: close\r\n\r\n").encode()
    assert _raw(proxy, req).startswith(b"HTTP/1.1 409")
    req = (f"GET http://origin.test:{port}/same HTTP/1.1\r\nHost: ORIGIN.test.:{port}\r\nConnection: close\r\n\r\n").encode()
    assert _raw(proxy, req).startswith(b"HTTP/1.1 200")  # the same host, spelt otherwise


@pytest.mark.parametrize("host", ["evil.test\n1.2.3.4", "evil\t.test", "a\rb.test", "a\x00b.test", "a\x7fb.test"])
def test_a_connect_host_with_control_characters_never_forges_a_log_line(proxy, host):
    # the log once the earlier tests' lines are in (the HTTP fast path logs a response when it ends: late)
    before = len(_log(proxy))
    for _ in range(20):  # bounded: 20 x 0.25 s
        time.sleep(0.25)
        now = len(_log(proxy))
        if now == before:
            break
        before = now
    forged = f"{host}:443"
    got = _raw(proxy, f"CONNECT {forged} HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1"))
    assert got.startswith(b"HTTP/1.1 400"), got[:200]
    time.sleep(0.3)  # pacing: let any (wrong) extra line reach the log before it is read
    lines = _log(proxy)  # every line is one whole Squid record
    assert not any(line.startswith("1.2.3.4") or "TCP_TUNNEL" in line and "evil" in line for line in lines)
    assert len(lines) <= before + 1


# ------------------------------------------------------------------ ports

def test_connect_and_http_ports(proxy, origins):
    port, tls_port, _ = origins
    for p in (22, 25):
        status, body = _connect_body(proxy, f"origin.test:{p}")
        assert status == 403, p
        assert "proxy.connect_ports" in _refusal(body, "connect-port")
    status, body, _ = fetch(proxy.port, "http://origin.test:25/", accept="text/plain")
    assert status == 403 and "proxy.safe_ports" in _refusal(body, "port")
    _logged(proxy, r" TCP_DENIED/403 \d+ GET http://origin\.test:25/ ")
    assert _connect_body(proxy, f"origin.test:{tls_port}")[0] == 200
    assert fetch(proxy.port, f"http://origin.test:{port}/ok")[0] == 200


# ------------------------------------------------------------------ the proxy's own pages, metrics, explain

def test_own_pages_keep_answering(proxy):
    for path, want in (("/healthz", b"ok\n"), ("/proxy.pac", b"FindProxyForURL"), ("/wpad.dat", b"FindProxyForURL")):
        status, body = get_local(proxy.port, path)
        assert status == 200 and want in body, path
        status, body, _ = fetch(proxy.port, f"http://127.0.0.1:{proxy.port}{path}")
        assert status == 200 and want in body, path


def test_refusals_are_counted_by_reason(proxy):
    fetch(proxy.port, f"http://127.1:{proxy.metrics_port}/metrics")

    def counted() -> bool:
        text = get_local(proxy.metrics_port, "/metrics")[1].decode()
        m = re.search(r'appliance_proxy_refused_total\{reason="loopback"\} (\d+)', text)
        return m is not None and int(m.group(1)) > 0 and 'reason="host-mismatch"' in text and 'reason="bad-host"' in text

    wait_until(counted, 10, "appliance_proxy_refused_total{reason=loopback} > 0, every reason shown")


CASES = [  # (explain's argument, the proxy's request: ("GET", url) or ("CONNECT", target))
    "http://127.1:9/", "http://0x7f.1:9/", "[::ffff:127.0.0.1]:443", "localhost.:443", "2130706433:443",
    "http://169.254.169.254/latest", "origin.test:22", "http://origin.test:25/", "http://192.168.1.50:8080/",
    "http://0177.0.0.2/", "bad_-.test:443", "http://www.blocked.test/x",
]


def test_explain_agrees_with_the_proxy(proxy):
    if proxy.mode != "sni":
        pytest.skip("explain is run once, against the sni proxy")
    for case in CASES:
        r = subprocess.run([APPLIANCE, "-c", str(proxy.cfg), "explain", case, "--json"], capture_output=True, text=True,
                           timeout=60, env=proxy.env)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        if case.startswith("http://"):
            status, body, _ = fetch(proxy.port, case, accept="text/plain")
        else:
            status, body = _connect_body(proxy, case)
        assert status == d["status"], (case, status, d)
        if d["reason"]:
            _refusal(body, d["reason"])
        else:
            assert f"category: {d['category']}".encode() in body, (case, body)
