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
from tests.support.proxy import client_hello, make_tree

PORT = 3128
WEDNESDAY_10 = dt.datetime(2024, 1, 3, 10, 0)  # inside the "staff-hours" policy's mon-fri 08:00-17:00
SQUID_LINE = re.compile(r"^\d+\.\d{3} +\d+ \S+ [A-Z_]+/\d{3} \d+ [A-Z]+ \S+ \S+ (HIER_DIRECT|HIER_NONE)/\S+ \S+$")


def _state(tmp_path: Path, **proxy) -> State:
    cfg_path = make_tree(tmp_path, proxy=proxy or None, filt={"intercept_exempt": ["exempt"]})
    cfg, engine, _ = ruleset.load(cfg_path, compile_in_child=False)
    engine.clock = lambda: WEDNESDAY_10
    st = State(engine=engine, cfg=cfg, base=cfg_path.parent, access=AccessLog(str(tmp_path / "access.log")), port=PORT)
    st.configure(cfg, engine, "0.0.0.0")
    return st


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
                                        "blocks": {"blocked": 1}, "reloads": 0, "reload_failures": 0}
    [line] = _log(state)
    fields = line.split()
    assert fields[2:] == ["127.0.0.1", "TCP_DENIED/403", str(len(r.raw_content) + 100), "GET",
                          "http://www.blocked.test/index.html", "-", "HIER_NONE/-", "text/html"]


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
    FilterAddon(state).http_connect(f)
    assert f.response.status_code == 403 and "category: blocked" in f.response.get_text()
    assert "www.blocked.test:443" in f.response.get_text()
    c = state.counters
    assert (c.requests, c.connects, c.blocks) == (1, 1, {"blocked": 1})
    [line] = _log(state)
    assert " TCP_DENIED/403 " in line and " CONNECT www.blocked.test:443 " in line


def test_connect_allowed_is_logged_as_a_tunnel_when_the_client_leaves(state):
    f = _flow("example.org:443", method="CONNECT")
    addon = FilterAddon(state)
    addon.http_connect(f)
    assert f.response is None and _log(state) == []
    addon.client_disconnected(f.client_conn)
    [line] = _log(state)
    assert " TCP_TUNNEL/200 0 CONNECT example.org:443 " in line and "HIER_DIRECT/example.org" in line


def test_connect_in_intercept_mode_leaves_the_block_page_to_tls(tmp_path):
    st = _state(tmp_path, tls="intercept")
    addon = FilterAddon(st)
    f = _flow("www.blocked.test:443", method="CONNECT")
    addon.http_connect(f)
    assert f.response is None  # the block page is served inside TLS, on the request
    f = _flow("www.blocked.test:443", method="CONNECT", client="127.0.0.9")
    addon.http_connect(f)
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
    assert " TCP_DENIED/403 0 CONNECT WWW.Blocked.Test:443 " in line


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
