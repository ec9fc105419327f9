"""The filter addon in-process, with mitmproxy's own test harness (taddons, tflow): no sockets, no proxy process."""
from __future__ import annotations

import asyncio
import datetime as dt
import re
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.options import Options
from mitmproxy.proxy import events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.test import taddons, tflow, tutils
from mitmproxy.tls import ClientHelloData

from filters import ruleset
from filters.proxy import pac
from filters.proxy.accesslog import AccessLog
from filters.proxy.addon import Cut, FilterAddon, FilterNextLayer, State
from filters.proxy.dest import REACH_ENV, Destinations
from tests.support.proxy import client_hello, make_tree

PORT = 3128
WEDNESDAY_10 = dt.datetime(2024, 1, 3, 10, 0)  # inside the "staff-hours" policy's mon-fri 08:00-17:00
# The names the tests' resolver knows (no DNS is asked): anything else does not resolve, as offline.
DNS = {"example.org": ["192.0.2.10"], "www.blocked.test": ["192.0.2.11"], "blocked.test": ["192.0.2.11"],
       "ok.blocked.test": ["192.0.2.12"], "vm": ["192.0.2.13"], "x.org": ["192.0.2.14"], "www.exempt.test": ["192.0.2.15"],
       "to-loopback.test": ["127.0.0.1"], "to-metadata.test": ["169.254.169.254"], "to-mapped.test": ["::ffff:127.0.0.1"],
       "mixed.test": ["192.0.2.16", "127.0.0.1"], "to-node.test": ["192.168.1.2"]}
SQUID_LINE = re.compile(r"^\d+\.\d{3} +\d+ \S+ [A-Z_]+/\d{3} \d+ [A-Z]+ \S+ \S+ (HIER_DIRECT|HIER_NONE)/\S+ \S+( \[\S+\])?$")


def _state(tmp_path: Path, **proxy) -> State:
    cfg_path = make_tree(tmp_path, proxy=proxy or None, filt={"intercept_exempt": ["exempt"]})
    cfg, engine, _ = ruleset.load(cfg_path, compile_in_child=False)
    engine.clock = lambda: WEDNESDAY_10
    st = State(engine=engine, cfg=cfg, base=cfg_path.parent, access=AccessLog(str(tmp_path / "access.log")), port=PORT)
    st.configure(cfg, engine, "0.0.0.0")
    st.dest = _dest(st, reach="127.0.0.1:8000")  # the one loopback origin the tests may name (the urls list's entry)
    return st


def _dest(st: State, reach: str = "") -> Destinations:
    """The state's guard with the tests' resolver (DNS above) and the test-only reachable loopback origins."""
    dest = Destinations(st.dest.guard, env={REACH_ENV: reach})
    dest.lookups = []

    async def lookup(name: str, port: int) -> list[str]:
        dest.lookups.append(name)
        if name not in DNS:
            raise OSError(f"no address for {name}")
        return DNS[name]

    dest._lookup = lookup
    return dest


def _run(coro) -> None:
    asyncio.run(coro)


@pytest.fixture
def state(tmp_path: Path):
    st = _state(tmp_path)
    yield st
    st.access.close()


def _log(st: State) -> list[str]:
    lines = Path(st.access.path).read_text().splitlines() if Path(st.access.path).exists() else []
    assert all(SQUID_LINE.match(line) for line in lines), lines
    return lines


def _flow(url: str, client: str = "127.0.0.1", accept: str | None = None, method: str = "GET",
          resp: bool = False) -> http.HTTPFlow:
    """A flow for an absolute-URL proxy request (or a CONNECT to host:port) from `client`."""
    headers = http.Headers(accept=accept) if accept else http.Headers()
    if method == "CONNECT":
        host, port = url.rsplit(":", 1)
        req = tutils.treq(method=b"CONNECT", scheme=b"", host=host, port=int(port), authority=url.encode(), path=b"",
                          headers=headers, content=b"")
    else:
        scheme, rest = url.split("://", 1)
        hostport, _, path = rest.partition("/")
        if hostport.startswith("[") and "]" in hostport:  # IPv6: mitmproxy keeps the host without brackets
            host, _, port = hostport[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = hostport.partition(":")
        req = tutils.treq(scheme=scheme.encode(), host=host, port=int(port or 80), authority=hostport.encode(),
                          path=b"/" + path.encode(), headers=headers, content=b"")
    f = tflow.tflow(req=req, resp=tutils.tresp() if resp else False)
    f.client_conn.peername = (client, 40000)
    return f


def _cycle(addon, f: http.HTTPFlow) -> None:
    """Run the flow through the addon's hooks as mitmproxy does: request, then response (or error) if there is one."""
    async def go() -> None:
        with taddons.context(addon) as tctx:
            await tctx.cycle(addon, f)

    asyncio.run(go())


# ------------------------------------------------------------------ HTTP requests

def test_blocked_request_gets_the_block_page_counted_and_logged(state):
    f = _flow("http://www.blocked.test/index.html", accept="text/html")
    _cycle(FilterAddon(state), f)
    r = f.response
    assert r.status_code == 403
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["cache-control"] == "no-store" and r.headers["connection"] == "close"
    page = r.get_text()
    for part in ("Access blocked", "<dd>blocked</dd>", "http://www.blocked.test/index.html", "127.0.0.1",
                 "lists/blocked/domains:2", "helpdesk@test"):
        assert part in page, part
    assert state.counters.to_dict() == {"requests": 1, "connects": 0, "denied": 0, "errors": 0,
                                        "blocks": {"blocked": 1}, "refused": {}, "reloads": 0, "reload_failures": 0}
    [line] = _log(state)
    fields = line.split()
    assert fields[2:] == ["127.0.0.1", "TCP_DENIED/403", str(len(r.raw_content) + 100), "GET",
                          "http://www.blocked.test/index.html", "-", "HIER_NONE/-", "text/html", "[block:blocked]"]


def test_block_page_is_plain_text_for_a_non_html_client(state):
    f = _flow("http://blocked.test/", accept="text/plain")
    _cycle(FilterAddon(state), f)
    assert f.response.status_code == 403
    assert f.response.headers["content-type"] == "text/plain; charset=utf-8"
    text = f.response.get_text()
    assert "category: blocked" in text and "rule: lists/blocked/domains:2" in text and "<html" not in text


def test_allowed_request_is_left_alone_and_logged_with_the_origin(state):
    f = _flow("http://example.org/page", resp=True)  # the origin's answer, as mitmproxy would have fetched it
    _cycle(FilterAddon(state), f)
    assert f.response.status_code == 200 and "cg_denied" not in f.metadata
    assert state.counters.requests == 1 and state.counters.blocks == {}
    [line] = _log(state)
    assert " TCP_MISS/200 " in line and " GET http://example.org/page " in line and "HIER_DIRECT/192.168.0.1" in line


def test_allow_list_wins_over_a_blocked_parent(state):
    f = _flow("http://ok.blocked.test/", resp=True)
    _cycle(FilterAddon(state), f)
    assert f.response.status_code == 200 and state.counters.blocks == {}


@pytest.mark.parametrize("url,rule", [
    ("http://127.0.0.1:8000/private/a", "lists/blocked/urls:1"),
    ("http://x.org/docs/SECRET-7.html", "lists/blocked/expressions:1"),
])
def test_url_prefix_and_expression_name_their_rule(state, url, rule):
    f = _flow(url, accept="text/plain")
    _cycle(FilterAddon(state), f)
    assert f.response.status_code == 403 and f"rule: {rule}" in f.response.get_text()


def test_policy_block_names_category_and_policy(state):
    f = _flow("http://vm/", client="127.0.0.2", accept="text/plain")
    _cycle(FilterAddon(state), f)
    text = f.response.get_text()
    assert f.response.status_code == 403
    assert "category: social" in text and "(policy staff-hours)" in text
    assert state.counters.blocks == {"social": 1}
    f = _flow("http://vm/", client="127.0.0.3", resp=True)  # no policy for .3: allowed
    _cycle(FilterAddon(state), f)
    assert f.response.status_code == 200


def test_client_outside_proxy_clients_is_denied(state):
    f = _flow("http://example.org/", client="127.0.0.9", accept="text/plain")
    _cycle(FilterAddon(state), f)
    assert f.response.status_code == 403
    text = f.response.get_text()
    assert "not allowed to use the proxy" in text and "category: (client not allowed)" in text
    assert state.counters.denied == 1 and state.counters.blocks == {}
    assert " 127.0.0.9 TCP_DENIED/403 " in _log(state)[0]


def test_upstream_error_is_counted_and_logged(state):
    f = _flow("http://example.org/gone")
    f.error = tflow.terr("Connection killed: peer disconnected")
    _cycle(FilterAddon(state), f)
    assert state.counters.errors == 1
    [line] = _log(state)
    assert " TCP_MISS_ABORTED/503 0 GET http://example.org/gone " in line


# ------------------------------------------------------------------ the proxy's own pages

@pytest.mark.parametrize("path,status,ctype,part", [
    ("/healthz", 200, "text/plain", b"ok\n"),
    ("/proxy.pac", 200, pac.CONTENT_TYPE, b'return "PROXY 192.168.1.50:3128"'),
    ("/wpad.dat?x=1", 200, pac.CONTENT_TYPE, b"FindProxyForURL"),
    ("/ca.pem", 404, "text/plain", b"not found"),  # tls: sni has no CA to hand out
    ("/nothing-here", 404, "text/plain", b"not found"),
])
def test_local_pages_answer_any_client_and_are_not_filtered(state, path, status, ctype, part):
    f = _flow(f"http://192.168.1.50:{PORT}{path}", client="127.0.0.9")  # even a denied client
    _cycle(FilterAddon(state), f)
    assert (f.response.status_code, f.response.headers["content-type"]) == (status, ctype)
    assert part in f.response.raw_content
    assert f.metadata["cg_local"] and state.counters.denied == 0
    assert f" TCP_MEM_HIT/{status} " in _log(state)[0]


def test_local_pages_on_every_node_address_only_on_the_proxy_port(state):
    for host in ("192.168.1.2", "192.168.1.3", "127.0.0.1", "localhost"):
        f = _flow(f"http://{host}:{PORT}/healthz")
        _cycle(FilterAddon(state), f)
        assert f.response.get_text() == "ok\n", host
    f = _flow("http://192.168.1.50:8080/healthz", resp=True)  # another port: an ordinary proxied request
    _cycle(FilterAddon(state), f)
    assert "cg_local" not in f.metadata


def test_ca_page_in_intercept_mode(state):
    state.ca_pem = b"-----BEGIN CERTIFICATE-----\n"
    f = _flow(f"http://192.168.1.50:{PORT}/ca.pem")
    _cycle(FilterAddon(state), f)
    assert f.response.status_code == 200 and f.response.raw_content == state.ca_pem
    assert f.response.headers["content-type"] == "application/x-x509-ca-cert"


# ------------------------------------------------------------------ CONNECT

def test_connect_to_a_blocked_host_is_refused_and_logged(state):
    f = _flow("www.blocked.test:443", method="CONNECT", accept="text/plain")
    _run(FilterAddon(state).http_connect(f))
    assert f.response.status_code == 403 and "category: blocked" in f.response.get_text()
    assert "www.blocked.test:443" in f.response.get_text()
    c = state.counters
    assert (c.requests, c.connects, c.blocks) == (1, 1, {"blocked": 1})
    [line] = _log(state)
    assert " TCP_DENIED/403 " in line and " CONNECT www.blocked.test:443 " in line


def test_connect_allowed_is_logged_as_a_tunnel_when_the_client_leaves(state):
    f = _flow("example.org:443", method="CONNECT")
    addon = FilterAddon(state)
    _run(addon.http_connect(f))
    assert f.response is None and _log(state) == []
    addon.client_disconnected(f.client_conn)
    [line] = _log(state)
    assert " TCP_TUNNEL/200 0 CONNECT example.org:443 " in line and "HIER_DIRECT/example.org" in line


def test_connect_in_intercept_mode_leaves_the_block_page_to_tls(tmp_path):
    st = _state(tmp_path, tls="intercept")
    addon = FilterAddon(st)
    f = _flow("www.blocked.test:443", method="CONNECT")
    _run(addon.http_connect(f))
    assert f.response is None  # the block page is served inside TLS, on the request
    f = _flow("www.blocked.test:443", method="CONNECT", client="127.0.0.9")
    _run(addon.http_connect(f))
    assert f.response.status_code == 403 and st.counters.denied == 1  # a denied client is refused at CONNECT
    st.access.close()


def _tunnel_layer(st: State, target: str, data: bytes) -> layer.NextLayer:
    """A NextLayer inside an explicit-proxy CONNECT tunnel to `target`, having received `data` from the client."""
    client = tflow.tclient_conn()
    client.peername, client.sockname = ("127.0.0.1", 40000), ("127.0.0.1", PORT)
    ctx = Context(client, Options())
    modes.HttpProxy(ctx)
    layers.HttpLayer(ctx, HTTPMode.regular)
    layers.HttpLayer(ctx, HTTPMode.regular)  # the stack under a CONNECT: proxy mode, HTTP, the tunnel's own layer
    host, port = target.rsplit(":", 1)
    ctx.server.address = (host, int(port))
    client.cg_tunnel = {"start": 946681200.0, "hostport": target, "client": "127.0.0.1", "decision": None}
    nl = layer.NextLayer(ctx)
    nl.events.append(events.DataReceived(client, data))
    return nl


def test_sni_naming_a_blocked_host_cuts_the_tunnel(state):
    nl = _tunnel_layer(state, "127.0.0.1:443", client_hello("WWW.Blocked.Test"))
    FilterNextLayer(state).next_layer(nl)
    assert isinstance(nl.layer, Cut)
    assert state.counters.blocks == {"blocked": 1}
    FilterAddon(state).client_disconnected(nl.context.client)
    [line] = _log(state)
    assert " TCP_DENIED/403 0 CONNECT www.blocked.test:443 " in line  # the SNI as the lists saw it: canonical


def test_sni_allowed_or_same_as_target_passes_untouched(state):
    for target, name in (("127.0.0.1:443", "example.org"), ("www.blocked.test:443", "www.blocked.test"),
                         ("127.0.0.1:443", None)):
        nl = _tunnel_layer(state, target, client_hello(name))
        FilterNextLayer(state).next_layer(nl)
        assert isinstance(nl.layer, layers.TCPLayer) and nl.layer.flow is None, (target, name)  # ignore=True
    assert state.counters.blocks == {}


def test_sni_waits_for_the_whole_client_hello(state):
    hello = client_hello("www.blocked.test")
    nl = _tunnel_layer(state, "127.0.0.1:443", hello[:40])
    FilterNextLayer(state).next_layer(nl)
    assert nl.layer is None  # asked again when more data arrives
    nl.events.append(events.DataReceived(nl.context.client, hello[40:]))
    FilterNextLayer(state).next_layer(nl)
    assert isinstance(nl.layer, Cut)


def test_intercept_exempt_hosts_are_not_intercepted(tmp_path):
    st = _state(tmp_path, tls="intercept")
    addon = FilterAddon(st)
    for name, ignored in (("www.exempt.test", True), ("example.org", False)):
        ch = parse_client_hello(client_hello(name))
        data = ClientHelloData(Context(tflow.tclient_conn(), Options()), ch)
        addon.tls_clienthello(data)
        assert data.ignore_connection is ignored, name
    st.access.close()


# ------------------------------------------------------------------ the guard (issue 11): refused whatever the lists say

def _refused(st: State, f: http.HTTPFlow, reason: str, status: int = 403) -> str:
    """The flow got the appliance's own block page naming `reason`, was counted by reason and logged TCP_DENIED."""
    assert f.response is not None and f.response.status_code == status, f.response and f.response.get_text()
    text = f.response.get_text()
    assert "category: appliance" in text and f"refused by the appliance ({reason})" in text, text
    assert "whatever the lists say" in text
    assert st.counters.refused.get(reason, 0) >= 1, st.counters.refused
    return text


LOOPBACK_SPELLINGS = ("127.0.0.1", "127.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.000.000.001", "[::ffff:127.0.0.1]",
                      "localhost.", "LOCALHOST", "[::1]", "0x7f.0.0.2", "127.2", "2130706434", "[::ffff:127.0.0.2]")


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_every_spelling_of_loopback_is_refused_over_http(state, spelling):
    f = _flow(f"http://{spelling}:9128/metrics", accept="text/plain")
    _cycle(FilterAddon(state), f)
    _refused(state, f, "loopback")
    [line] = _log(state)
    assert " TCP_DENIED/403 " in line and " HIER_NONE/- " in line
    assert state.dest.lookups == []  # refused before any DNS


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS[:8])
def test_every_spelling_of_loopback_is_refused_over_connect(state, spelling):
    f = _flow(f"{spelling}:443", method="CONNECT", accept="text/plain")
    _run(FilterAddon(state).http_connect(f))
    _refused(state, f, "loopback")
    assert getattr(f.client_conn, "cg_tunnel", None) is None  # no tunnel
    [line] = _log(state)
    assert " TCP_DENIED/403 0 CONNECT " in line or " TCP_DENIED/403 " in line


@pytest.mark.parametrize("spelling", ("10.9.8.7", "0xa.9.8.7", "012.9.8.7", "168364039", "10.9.2055", "012.011.010.007",
                                      "[::ffff:10.9.8.7]", "[::ffff:a09:807]"))
def test_a_listed_ip_literal_is_blocked_in_every_spelling(state, spelling):
    """lists/blocked/domains holds 10.9.8.7: the engine gets the canonical address, on both steps."""
    f = _flow(f"http://{spelling}/x", accept="text/plain")
    _cycle(FilterAddon(state), f)
    assert f.response.status_code == 403 and "category: blocked" in f.response.get_text()
    assert "http://10.9.8.7/x" in f.response.get_text()
    assert " GET http://10.9.8.7/x " in _log(state)[0]  # the log sees the canonical host too
    f = _flow(f"{spelling}:443", method="CONNECT", accept="text/plain")
    _run(FilterAddon(state).http_connect(f))
    assert f.response.status_code == 403 and "category: blocked" in f.response.get_text()


@pytest.mark.parametrize("target", ("bad_-.test", "a..b", "1.2.3.4.5", "0x1.0x2.0x3.0x100", "ex ample.test", "[::1",
                                    "10.009.008.007", "::1%eth0"))
def test_a_host_the_normaliser_cannot_read_is_refused_never_allowed(state, target):
    f = _flow("http://placeholder.test/", accept="text/plain")
    f.request.data.host = target.encode()
    _cycle(FilterAddon(state), f)
    _refused(state, f, "bad-host", 400)
    [line] = _log(state)
    assert " TCP_DENIED/400 " in line


@pytest.mark.parametrize("raw", ("evil.test\n1.2.3.4 0 127.0.0.1 TCP_TUNNEL/200", "a\tb.test", "a\rb", "x\x00y"))
def test_control_characters_in_a_connect_host_never_split_the_log(state, raw):
    f = _flow("placeholder.test:443", method="CONNECT", accept="text/plain")
    f.request.host = raw
    f.request.authority = f"{raw}:443"
    _run(FilterAddon(state).http_connect(f))
    _refused(state, f, "bad-host", 400)
    lines = _log(state)  # SQUID_LINE: every line is one whole record
    assert len(lines) == 1 and "\n" not in lines[0] and "\t" not in lines[0]


def test_control_characters_in_a_url_never_split_the_log(state):
    f = _flow("http://example.org/a", resp=True)
    f.request.path = "/a\r\n1 2 3.4.5.6 TCP_MISS/200 0 GET http://forged/ - HIER_NONE/- -"
    _cycle(FilterAddon(state), f)
    lines = _log(state)
    assert len(lines) == 1 and "%0D%0A1%202%20" in lines[0]


@pytest.mark.parametrize("header,ok", [
    ("blocked.test", False), ("example.org:8080", False), ("127.0.0.1", False), ("0x7f.1", False),
    ("example.org", True), ("EXAMPLE.org.", True), ("example.org:80", True),
])
def test_host_header_must_name_the_request_target(state, header, ok):
    f = _flow("http://example.org/", accept="text/plain", resp=True)
    f.request.headers["Host"] = header
    f.response = None
    _cycle(FilterAddon(state), f)
    if ok:
        assert "cg_denied" not in f.metadata
    else:
        text = _refused(state, f, "host-mismatch", 409)
        assert "does not name the request target example.org:80" in text


def test_two_host_headers_are_refused(state):
    f = _flow("http://example.org/", accept="text/plain")
    f.request.headers.add("Host", "example.org")
    f.request.headers.add("Host", "blocked.test")
    _cycle(FilterAddon(state), f)
    _refused(state, f, "host-mismatch", 409)


def test_ports_plain_http_to_safe_ports_connect_to_connect_ports(tmp_path):
    state = _state(tmp_path, connect_ports=[443])  # the default (make_tree adds the tests' ephemeral ports)
    f = _flow("http://example.org:25/", accept="text/plain")
    _cycle(FilterAddon(state), f)
    assert "proxy.safe_ports" in _refused(state, f, "port")
    for port in (22, 25, 80, 8443):
        f = _flow(f"example.org:{port}", method="CONNECT", accept="text/plain")
        _run(FilterAddon(state).http_connect(f))
        assert "proxy.connect_ports: 443" in _refused(state, f, "connect-port")
    assert state.counters.refused == {"port": 1, "connect-port": 4}
    f = _flow("http://example.org:8080/", resp=True)
    _cycle(FilterAddon(state), f)
    assert "cg_denied" not in f.metadata
    state.access.close()


def test_port_keys_change_the_rules(tmp_path):
    st = _state(tmp_path, connect_ports=[443, "8000-8100"], safe_ports=[80])
    f = _flow("example.org:8080", method="CONNECT")
    _run(FilterAddon(st).http_connect(f))
    assert f.response is None
    f = _flow("http://example.org:8080/", accept="text/plain")
    _cycle(FilterAddon(st), f)
    _refused(st, f, "port")
    st.access.close()


@pytest.mark.parametrize("name,reason", [("to-loopback.test", "loopback"), ("to-metadata.test", "link-local"),
                                         ("to-mapped.test", "loopback"), ("mixed.test", "loopback"),
                                         ("to-node.test", "cluster-address")])
def test_a_name_resolving_to_a_refused_address_is_refused(state, name, reason):
    f = _flow(f"http://{name}/", accept="text/plain")
    _cycle(FilterAddon(state), f)
    assert f"{name} resolves to" in _refused(state, f, reason)
    f = _flow(f"{name}:443", method="CONNECT", accept="text/plain")
    _run(FilterAddon(state).http_connect(f))
    _refused(state, f, reason)


def test_deny_destinations_and_cluster_addresses(tmp_path):
    st = _state(tmp_path, deny_destinations=["192.0.2.0/28", "2001:db8::/32"])
    for url, reason in (("http://example.org/", "denied-destination"), ("http://192.0.2.3/", "denied-destination"),
                        ("http://[2001:db8::1]/", "denied-destination"), ("http://192.168.1.50/", "cluster-address"),
                        ("http://192.168.200.2/", "cluster-address"), ("http://192.168.200.3/", "cluster-address")):
        f = _flow(url, accept="text/plain")
        _cycle(FilterAddon(st), f)
        _refused(st, f, reason)
    st.access.close()


def test_the_address_connected_to_is_checked_and_pinned(state):
    """server_connect resolves, checks and connects to the checked address; server_connected gives the name back."""
    from mitmproxy.connection import Server
    from mitmproxy.proxy.server_hooks import ServerConnectionHookData

    addon = FilterAddon(state)
    data = ServerConnectionHookData(server=Server(address=("example.org", 80)), client=tflow.tclient_conn())
    _run(addon.server_connect(data))
    assert data.server.address == ("192.0.2.10", 80) and data.server.error is None
    data.server.peername = ("192.0.2.10", 80)
    addon.server_connected(data)
    assert data.server.address == ("example.org", 80)
    # DNS rebinding: the name now answers loopback; the connect is refused (whatever the request hook saw)
    DNS["rebind.test"] = ["192.0.2.20"]
    try:
        f = _flow("http://rebind.test/", resp=True)
        _cycle(addon, f)
        assert "cg_denied" not in f.metadata
        DNS["rebind.test"] = ["127.0.0.1"]
        state.dest._cache.clear()  # the answer's short reuse window is over
        data = ServerConnectionHookData(server=Server(address=("rebind.test", 80)), client=tflow.tclient_conn())
        _run(addon.server_connect(data))
        assert data.server.error and "(loopback)" in data.server.error
        assert data.server.address == ("rebind.test", 80)
    finally:
        del DNS["rebind.test"]


def test_a_bad_sni_name_cuts_the_tunnel(state):
    nl = _tunnel_layer(state, "example.org:443", client_hello("bad_-.example"))
    FilterNextLayer(state).next_layer(nl)
    assert isinstance(nl.layer, Cut) and state.counters.refused == {"bad-host": 1}
    FilterAddon(state).client_disconnected(nl.context.client)
    assert " TCP_DENIED/400 0 CONNECT " in _log(state)[0]


def test_local_pages_are_checked_first_and_loopback_on_another_port_is_not(state):
    f = _flow(f"http://127.0.0.1:{PORT}/healthz", client="127.0.0.9")
    _cycle(FilterAddon(state), f)
    assert f.response.get_text() == "ok\n"
    f = _flow("http://127.0.0.1:9128/metrics", accept="text/plain")
    _cycle(FilterAddon(state), f)
    _refused(state, f, "loopback")


def test_every_reason_is_a_metric_from_the_start():
    from filters.proxy import metrics
    from filters.proxy.guard import REASONS

    text = metrics.prometheus(metrics.aggregate([]), 1)
    for r in REASONS:
        assert f'appliance_proxy_refused_total{{reason="{r}"}} 0' in text


# ------------------------------------------------------------------ issue 11 review: the mitmproxy path's tunnel rules

def test_a_hello_whose_first_segment_is_one_byte_is_waited_for_then_judged(state):
    hello = client_hello("www.blocked.test")
    nl = _tunnel_layer(state, "127.0.0.1:443", hello[:1])  # mitmproxy's own test calls this "not TLS"
    FilterNextLayer(state).next_layer(nl)
    assert nl.layer is None  # waits for the rest, never a raw tunnel
    nl.events.append(events.DataReceived(nl.context.client, hello[1:]))
    FilterNextLayer(state).next_layer(nl)
    assert isinstance(nl.layer, Cut) and state.counters.blocks == {"blocked": 1}


@pytest.mark.parametrize("data,reason", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "not-tls"),
    (b"GET / HTTP/1.1\r\nHost: www.blocked.test\r\n\r\n", "not-tls"),
    (b"\x80\x2e\x01\x03\x01" + b"\0" * 45, "not-tls"),
    (b"\x16\x03\x01\x00\x10\x01\x01\x11\x70" + b"\0" * 12, "hello-too-large"),
])
def test_bytes_that_are_not_a_hello_cut_the_tunnel_in_both_modes(tmp_path, data, reason):
    for mode in ("sni", "intercept"):
        st = _state(tmp_path / mode, tls=mode)
        nl = _tunnel_layer(st, "example.org:443", data)
        FilterNextLayer(st).next_layer(nl)
        assert isinstance(nl.layer, Cut) and st.counters.refused == {reason: 1}, (mode, nl.layer)
        FilterAddon(st).client_disconnected(nl.context.client)
        [line] = _log(st)
        assert " TCP_DENIED/403 0 CONNECT example.org:443 " in line and "HIER_NONE/-" in line
        st.access.close()


def test_a_hello_never_completed_is_cut_by_the_hello_timer(state):
    from filters.proxy.nextlayer import hello_due

    nl = _tunnel_layer(state, "example.org:443", client_hello("example.org")[:20])
    FilterNextLayer(state).next_layer(nl)
    assert nl.layer is None
    hello_due(state, nl.context.client)
    assert state.counters.refused == {"hello-timeout": 1}
    FilterAddon(state).client_disconnected(nl.context.client)
    assert " TCP_DENIED/403 0 CONNECT example.org:443 " in _log(state)[0]


def test_a_blocked_intercept_connect_is_never_logged_as_a_tunnel(tmp_path):
    st = _state(tmp_path, tls="intercept")
    addon = FilterAddon(st)
    f = _flow("www.blocked.test:443", method="CONNECT")
    _run(addon.http_connect(f))
    assert f.response is None  # the block page comes inside TLS
    addon.client_disconnected(f.client_conn)  # the client gave up during the handshake
    [line] = _log(st)
    assert " TCP_DENIED/403 0 CONNECT www.blocked.test:443 " in line and "HIER_NONE/-" in line
    st.access.close()


def test_the_name_goes_back_on_an_open_connection_without_an_error(state):
    """mitmproxy refuses to change the address of an open connection; the name must still go back (reuse)."""
    from mitmproxy.connection import ConnectionState, Server
    from mitmproxy.proxy.server_hooks import ServerConnectionHookData

    addon = FilterAddon(state)
    data = ServerConnectionHookData(server=Server(address=("example.org", 80)), client=tflow.tclient_conn())
    _run(addon.server_connect(data))
    assert data.server.address == ("192.0.2.10", 80)
    data.server.state, data.server.peername = ConnectionState.OPEN, ("192.0.2.10", 80)  # as mitmproxy opens it
    addon.server_connected(data)
    assert data.server.address == ("example.org", 80) and data.server.peername == ("192.0.2.10", 80)
