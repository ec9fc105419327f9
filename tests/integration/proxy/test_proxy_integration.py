"""Real mitmproxy on loopback, a local origin, real clients on 127.0.0.x: the filter's acceptance behaviour."""
from __future__ import annotations

import re
import ssl

import pytest

from tests.support.proxy import (
    Proxy,
    connect_tunnel,
    fetch,
    get_local,
    make_tree,
    start_origin,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tls_origin(tmp_path_factory):
    srv, port = start_origin(tmp_path_factory.mktemp("tls"))
    yield port
    srv.shutdown()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    (root / "state").mkdir()
    cfg = make_tree(root)
    p = Proxy(cfg, root / "state").wait_ready()
    p.root = root
    yield p
    p.stop()


def test_blocked_domain_gets_block_page(proxy):
    status, body, headers = fetch(proxy.port, "http://www.blocked.test/index.html", accept="text/html")
    assert status == 403
    assert headers["Content-Type"].startswith("text/html")
    text = body.decode()
    for part in ("blocked", "http://www.blocked.test/index.html", "127.0.0.1", "helpdesk@test", "lists/blocked/domains:2"):
        assert part in text


def test_block_page_plain_text_when_html_not_accepted(proxy):
    status, body, headers = fetch(proxy.port, "http://blocked.test/", accept="text/plain")
    assert status == 403
    assert headers["Content-Type"].startswith("text/plain")
    assert b"category: blocked" in body and b"<html" not in body


def test_allowed_reaches_origin(proxy, origin):
    status, body, _ = fetch(proxy.port, f"http://127.0.0.1:{origin}/hello")
    assert status == 200 and body.startswith(b"origin says hello: /hello")


def test_subdomain_blocked(proxy):
    assert fetch(proxy.port, "http://a.b.c.blocked.test/")[0] == 403


def test_label_boundary_not_blocked(proxy, origin):
    # "unsc" is listed in a blocked category: it must not match "runsc" (not on a label boundary)
    status, body, _ = fetch(proxy.port, f"http://runsc:{origin}/x")
    assert status == 200 and body.startswith(b"origin says hello: /x")
    assert fetch(proxy.port, "http://unsc/")[0] == 403


def test_normalisation_case_trailing_dot_idn_ip(proxy):
    assert fetch(proxy.port, "http://WWW.EXAMPLE-CAPS.test./")[0] == 403
    assert fetch(proxy.port, "http://xn--bcher-kva.test/")[0] == 403  # listed as bücher.test
    assert fetch(proxy.port, "http://10.9.8.7:8080/")[0] == 403


def test_label_boundary_real_origin(proxy, origin):
    """`blocked.test` must not block `notblocked.test`; with no DNS for it the proxy answers 502, not the filter's 403."""
    status, body, _ = fetch(proxy.port, "http://notblocked.test/")
    assert status != 403
    assert b"lists/" not in body


def test_url_prefix(proxy, origin):
    assert fetch(proxy.port, f"http://127.0.0.1:{origin}/private/data")[0] == 403
    assert fetch(proxy.port, f"http://127.0.0.1:{origin}/public/data")[0] == 200


def test_regex_expression(proxy, origin):
    status, body, _ = fetch(proxy.port, f"http://127.0.0.1:{origin}/docs/secret-42.html", accept="text/plain")
    assert status == 403 and b"lists/blocked/expressions:1" in body
    assert fetch(proxy.port, f"http://127.0.0.1:{origin}/docs/secret-x.html")[0] == 200


def test_allow_wins(proxy, origin):
    # localhost is in allowlist; CALHOST in blocked does not match it anyway, ok.blocked.test is allowlisted inside blocked.test
    assert fetch(proxy.port, f"http://localhost:{origin}/")[0] == 200
    status, body, _ = fetch(proxy.port, "http://ok.blocked.test/")
    assert status != 403  # allowlisted: forwarded (no DNS for it: 502 from the proxy, not the block page)


def test_schedule_in_range_blocks_policy_client(proxy, origin):
    # clock is Wednesday 10:00; 127.0.0.2 has "staff-hours" (mon-fri 08:00-17:00) blocking social (vm)
    status, body, _ = fetch(proxy.port, f"http://vm:{origin}/", client="127.0.0.2", accept="text/plain")
    assert status == 403 and b"policy staff-hours" in body
    assert fetch(proxy.port, f"http://vm:{origin}/", client="127.0.0.3")[0] == 200  # no policy for .3


def test_schedule_out_of_range_allows(proxy, origin):
    # 127.0.0.4 has "weekend" (sat-sun): on a Wednesday social is allowed
    assert fetch(proxy.port, f"http://vm:{origin}/", client="127.0.0.4")[0] == 200


def test_denied_client(proxy, origin):
    status, body, _ = fetch(proxy.port, f"http://127.0.0.1:{origin}/", client="127.0.0.9", accept="text/plain")
    assert status == 403 and b"not allowed to use the proxy" in body
    # the proxy's own pages answer any client
    assert get_local(proxy.port, "/healthz") == (200, b"ok\n")


def test_connect_blocked(proxy):
    status, s = connect_tunnel(proxy.port, "www.blocked.test:443")
    s.close()
    assert status == 403
    status, s = connect_tunnel(proxy.port, "127.0.0.1:443", client="127.0.0.9")
    s.close()
    assert status == 403


def test_connect_allowed_passes_tls_untouched(proxy, tls_origin):
    status, s = connect_tunnel(proxy.port, f"127.0.0.1:{tls_origin}")
    assert status == 200
    ctx = ssl.create_default_context(cafile=str(_origin_cert(proxy)))
    with ctx.wrap_socket(s, server_hostname="localhost") as t:  # the origin's own certificate: not intercepted
        t.sendall(b"GET /tunnel HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = _read_all(t)
    assert data.startswith(b"HTTP/1.1 200") and b"origin says hello: /tunnel" in data


def test_sni_mismatch_cut(proxy, tls_origin):
    status, s = connect_tunnel(proxy.port, f"127.0.0.1:{tls_origin}")
    assert status == 200
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with ctx.wrap_socket(s, server_hostname="www.blocked.test") as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: www.blocked.test\r\n\r\n")
            if not t.recv(100):
                raise ConnectionError("closed")
    s.close()
    log = proxy.root / "access.log"
    wait_until(lambda: "CONNECT www.blocked.test:" in log.read_text(), 5, "the cut tunnel in the access log")
    assert re.search(r" TCP_DENIED/403 0 CONNECT www\.blocked\.test:\d+ ", log.read_text())


def test_local_pages(proxy):
    status, body = get_local(proxy.port, "/proxy.pac")
    assert status == 200 and b'PROXY 192.168.1.50:3128' in body
    status, body = get_local(proxy.port, "/wpad.dat")
    assert status == 200 and b"FindProxyForURL" in body
    assert get_local(proxy.port, "/nothing-here")[0] == 404


def test_access_log_squid_format(proxy, origin):
    fetch(proxy.port, f"http://127.0.0.1:{origin}/logged")
    fetch(proxy.port, "http://blocked.test/logged-block")
    log = proxy.root / "access.log"
    wait_until(lambda: "logged-block" in log.read_text(), 5, "the blocked request in the access log")
    lines = log.read_text().splitlines()
    line_re = re.compile(r"^\d+\.\d{3} +\d+ \S+ [A-Z_]+/\d{3} \d+ [A-Z]+ \S+ \S+ (HIER_DIRECT|HIER_NONE)/\S+ \S+( \[\S+\])?$")
    assert all(line_re.match(l) for l in lines), lines
    ok = [l for l in lines if "/logged " in l]
    blk = [l for l in lines if "logged-block" in l]
    assert ok and " TCP_MISS/200 " in ok[0] and "HIER_DIRECT/127.0.0.1" in ok[0]
    assert blk and " TCP_DENIED/403 " in blk[0] and "HIER_NONE/-" in blk[0] and blk[0].endswith(" [block:blocked]")


def test_metrics_counters(proxy, origin):
    from appliance.core import loader as cfgmod
    from filters.proxy import control as proxyctl

    fetch(proxy.port, "http://count.blocked.test/")
    cfg = cfgmod.load(proxy.cfg_path)

    def counted() -> dict | None:
        c = proxyctl.counters(cfg)
        return c if c and c.get('appliance_proxy_blocks_total{category="blocked"}', 0) >= 1 else None

    c = wait_until(counted, 5, "the block counted in /metrics")
    assert c["appliance_proxy_requests_total"] >= 2
    assert c["appliance_proxy_workers"] == 1


def _origin_cert(proxy):
    for p in proxy.root.parent.glob("tls*/origin.pem"):
        return p
    raise AssertionError("origin cert not found")


def _read_all(t) -> bytes:
    data = b""
    for _ in range(1000):
        chunk = t.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
