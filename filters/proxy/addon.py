"""Thin mitmproxy hooks over the engine: HTTP/CONNECT/SNI decisions, block page, local pages, access log."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.addons.next_layer import NeedsMoreData, NextLayer
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.tls import ClientHelloData

from filters.engine import Decision, RuleEngine
from filters.proxy import pac, verdict
from filters.proxy.accesslog import AccessLog
from filters.proxy.metrics import Counters

log = logging.getLogger("filters.proxy.addon")
LOCAL_PATHS = ("/healthz", "/proxy.pac", "/wpad.dat", "/ca.pem", "/metrics")


@dataclass
class State:
    """What the hooks read; reload swaps `engine`/`cfg` in one assignment each (in-flight flows keep going)."""

    engine: RuleEngine
    cfg: Any
    base: Path
    access: AccessLog
    port: int
    counters: Counters = field(default_factory=Counters)
    self_hosts: set = field(default_factory=set)
    ca_pem: bytes | None = None
    pac: bytes = b""

    def configure(self, cfg: Any, engine: RuleEngine, listen_host: str) -> None:
        self.cfg, self.engine = cfg, engine
        hosts = {"localhost", "127.0.0.1", str(cfg.cluster.vip.ip)}
        hosts |= {str(n.lan.ip) for n in cfg.nodes.values()}
        hosts |= {str(x.vip.ip) for x in cfg.cluster.extra_vhids}
        if listen_host not in ("", "0.0.0.0"):
            hosts.add(listen_host)
        self.self_hosts = hosts
        self.pac = pac.render(str(cfg.cluster.vip.ip), cfg.proxy.port, [])


class Cut(layer.Layer):
    """Closes the client connection at once (a TLS tunnel whose SNI is blocked)."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


class FilterNextLayer(NextLayer):
    """mitmproxy's NextLayer, plus: inside CONNECT tunnels decide on the TLS SNI (sni mode: pass or cut)."""

    def __init__(self, state: State):
        super().__init__()
        self.state = state

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer:
            return
        context = nextlayer.context
        if context.client.tls or not (isinstance(context.layers[0], modes.HttpProxy) and len(context.layers) > 2
                                      and context.server.address):
            # the first layer of a client connection (explicit HTTP proxy), or inside intercepted TLS
            return super().next_layer(nextlayer)
        st = self.state
        data = nextlayer.data_client()
        try:
            hello = self._get_client_hello(context, data)
        except NeedsMoreData:
            return  # wait for the rest of the ClientHello
        sni = hello.sni if hello else None
        host = context.server.address[0]
        client = context.client.peername[0]
        intercept = st.cfg.proxy.tls == "intercept"
        d = verdict.sni_block(st.engine, client, host, sni)
        if d is not None:
            meta = getattr(context.client, "cg_tunnel", None)
            if meta is not None:
                meta["decision"] = d
                meta["sni"] = sni
            verdict.cut(st, d, host, sni, log)
            nextlayer.layer = Cut(context)
            return
        if not intercept or hello is None or st.engine.exempt_host(sni or host) or st.engine.exempt_host(host):
            nextlayer.layer = layers.TCPLayer(context, ignore=True)
            return
        return super().next_layer(nextlayer)


class FilterAddon:
    """HTTP and CONNECT hooks: one engine.decide() each, the answer, and one access-log line."""

    def __init__(self, state: State):
        self.state = state

    # ---------------------------------------------------------------- HTTP

    def request(self, flow: http.HTTPFlow) -> None:
        st = self.state
        req = flow.request
        st.counters.requests += 1
        if req.port == st.port and (req.host in st.self_hosts or req.host == (flow.client_conn.sockname or ("",))[0]):
            return self._local(flow)
        client = flow.client_conn.peername[0]
        url = req.url
        d = st.engine.decide(client, req.host, url)
        if d.blocked:
            self._block(flow, d, url, client)

    def _block(self, flow: http.HTTPFlow, d: Decision, url: str, client: str) -> None:
        resp = verdict.refuse(self.state, d, url, client, flow.request.headers.get("accept"))
        flow.response = http.Response.make(403, resp.body, resp.headers())
        flow.metadata["cg_denied"] = d

    def _local(self, flow: http.HTTPFlow) -> None:
        st = self.state
        path = flow.request.path.split("?", 1)[0]
        if path == "/healthz":
            flow.response = http.Response.make(200, b"ok\n", {"Content-Type": "text/plain"})
        elif path in ("/proxy.pac", "/wpad.dat"):
            flow.response = http.Response.make(200, st.pac, {"Content-Type": pac.CONTENT_TYPE})
        elif path == "/ca.pem" and st.ca_pem:
            flow.response = http.Response.make(200, st.ca_pem, {"Content-Type": "application/x-x509-ca-cert",
                                                                "Content-Disposition": 'attachment; filename="carpguard-ca.pem"'})
        else:
            flow.response = http.Response.make(404, b"not found\n", {"Content-Type": "text/plain"})
        flow.metadata["cg_local"] = True

    def response(self, flow: http.HTTPFlow) -> None:
        self._log_flow(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.state.counters.errors += 1
        self._log_flow(flow, error=True)

    def _log_flow(self, flow: http.HTTPFlow, error: bool = False) -> None:
        acc = self.state.access
        if acc.fd is None:
            return
        req, resp = flow.request, flow.response
        start = req.timestamp_start
        elapsed = int((time.time() - start) * 1000)
        denied = flow.metadata.get("cg_denied")
        if denied is not None:
            code, peer = "TCP_DENIED", "-"
        elif error and resp is None:
            code, peer = "TCP_MISS_ABORTED" if flow.error and "disconnect" in str(flow.error) else "TCP_MISS", "-"
        else:
            code = "TCP_MEM_HIT" if flow.metadata.get("cg_local") else "TCP_MISS"
            pn = flow.server_conn.peername
            peer = pn[0] if pn else "-"
        status = resp.status_code if resp is not None else (503 if error else 0)
        size = len(resp.raw_content or b"") + 100 if resp is not None else 0
        mime = (resp.headers.get("content-type", "-").split(";")[0] if resp is not None else "-") or "-"
        acc.log(start=start, elapsed_ms=elapsed, client=flow.client_conn.peername[0], code=code, status=status,
                size=size, method=req.method, url=req.pretty_url if req.method != "CONNECT" else f"{req.host}:{req.port}",
                peer=peer, mime=mime)

    # ---------------------------------------------------------------- CONNECT

    def http_connect(self, flow: http.HTTPFlow) -> None:
        st = self.state
        req = flow.request
        st.counters.requests += 1
        st.counters.connects += 1
        client = flow.client_conn.peername[0]
        d = st.engine.decide(client, req.host)
        hostport = f"{req.host}:{req.port}"
        intercept = st.cfg.proxy.tls == "intercept"
        # intercept mode shows the block page inside TLS; a denied client or an exempt host is refused here
        if d.blocked and (not intercept or d.verdict == "deny" or st.engine.exempt_host(req.host)):
            self._block(flow, d, hostport, client)
            self._log_flow(flow)
            return
        flow.client_conn.cg_tunnel = {"start": time.time(), "hostport": hostport, "client": client, "decision": None}

    def client_disconnected(self, client: Any) -> None:
        meta = getattr(client, "cg_tunnel", None)
        acc = self.state.access
        if meta is None or acc.fd is None:
            return
        host, port = meta["hostport"].rsplit(":", 1)
        if meta.get("decision") is not None:
            verdict.log_connect(acc, meta["start"], meta["client"], "TCP_DENIED", 403, 0, f"{meta['sni']}:{port}")
        else:
            verdict.log_connect(acc, meta["start"], meta["client"], "TCP_TUNNEL", 200, 0, meta["hostport"], peer=host)

    def tls_clienthello(self, data: ClientHelloData) -> None:
        """tls: intercept: hosts of an intercept_exempt category are tunnelled untouched."""
        sni = data.client_hello.sni
        if sni and self.state.engine.exempt_host(sni):
            data.ignore_connection = True
