"""Thin mitmproxy hooks over the guard and the engine: HTTP/CONNECT/SNI decisions, block page, local pages, access log."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.tls import ClientHelloData

from filters.engine import Decision, RuleEngine
from filters.hosts import BadHost, Host, canonical_host, host_port, shown
from filters.proxy import nextlayer, pac, verdict
from filters.proxy.accesslog import AccessLog, refusal_tag
from filters.proxy.dest import Destinations
from filters.proxy.guard import Guard, Refusal, bad_host, refusal
from filters.proxy.metrics import Counters
from filters.proxy.nextlayer import Cut, FilterNextLayer  # noqa: F401 - the worker and tests take them from here

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
    pacs: pac.Pacs | None = None  # the /proxy.pac answers, one per VIP order
    dest: Destinations | None = None

    def configure(self, cfg: Any, engine: RuleEngine, listen_host: str) -> None:
        dest = Destinations(Guard.from_config(cfg))  # first: a config the guard cannot read changes nothing
        self.cfg, self.engine, self.dest = cfg, engine, dest
        hosts = {"localhost", "127.0.0.1", str(cfg.cluster.vip.ip)}
        hosts |= {str(n.lan.ip) for n in cfg.nodes.values()}
        hosts |= {str(x.vip.ip) for x in cfg.cluster.extra_vhids}
        if listen_host not in ("", "0.0.0.0"):
            hosts.add(listen_host)
        self.self_hosts = hosts
        vips = [str(cfg.cluster.vip.ip)] + [str(x.vip.ip) for x in cfg.cluster.extra_vhids]
        self.pacs = pac.Pacs(vips, cfg.proxy.port, [])


def _host_header(st: State, req: http.Request, target: Host, default_port: int) -> Refusal | None:
    """The Host header (HTTP/2: :authority) must name the request target (Squid's host_verify_strict); two Host
    headers are refused outright (which one an origin reads is not ours to guess)."""
    values = req.headers.get_all("host")
    if len(values) > 1:
        return refusal("host-mismatch", f"{len(values)} Host headers for the request target {target.authority}")
    return st.dest.guard.host_header_mismatch(target, req.host_header, req.port, default_port)


class FilterAddon:
    """HTTP and CONNECT hooks: one engine.decide() each, the answer, and one access-log line."""

    def __init__(self, state: State):
        self.state = state

    # ---------------------------------------------------------------- HTTP

    async def request(self, flow: http.HTTPFlow) -> None:
        """The proxy's own pages first; then one check: canonical host (bad-host), client ACL, the guard's target
        rules and the Host header, the lists, and every address the name resolves to."""
        st = self.state
        req = flow.request
        st.counters.requests += 1
        if req.port == st.port and (req.host in st.self_hosts or req.host == (flow.client_conn.sockname or ("",))[0]):
            return self._local(flow)
        client = flow.client_conn.peername[0]
        try:
            host = canonical_host(req.host)
        except BadHost as e:
            return self._refuse(flow, bad_host(e), shown(req.pretty_url, 200)[1:-1], client)
        default = 443 if req.scheme == "https" else 80
        url = f"{req.scheme}://{host.authority}{'' if req.port == default else f':{req.port}'}{req.path}"
        flow.metadata["cg_url"] = url  # what the lists, the block page and the log see
        d = st.engine.decide(client, host.name, url)
        if d.verdict == "deny":
            return self._block(flow, d, url, client)
        r = st.dest.check_target(host, req.port, False) or _host_header(st, req, host, default)
        if r is not None:
            return self._refuse(flow, r, url, client)
        if d.blocked:
            return self._block(flow, d, url, client)
        r = await self._resolve(host, req.port)
        if r is not None:
            return self._refuse(flow, r, url, client)
        if req.host != host.name:
            req.host = host.name  # forward what was decided on (the Host header agreed with it)

    async def _resolve(self, host: Host, port: int) -> Refusal | None:
        """The guard on every address the name resolves to; None also when it does not resolve (mitmproxy's connect
        then fails and answers 502 as before). server_connect checks again and pins the address connected to."""
        try:
            return (await self.state.dest.resolve(host, port))[1]
        except (OSError, TimeoutError, UnicodeError):
            return None

    def _block(self, flow: http.HTTPFlow, d: Decision, url: str, client: str) -> None:
        resp = verdict.refuse(self.state, d, url, client, flow.request.headers.get("accept"))
        flow.response = http.Response.make(403, resp.body, resp.headers())
        flow.metadata["cg_denied"] = d

    def _refuse(self, flow: http.HTTPFlow, r: Refusal, url: str, client: str) -> None:
        """A guard refusal: block page (category appliance, the reason), counted by reason, logged TCP_DENIED/<status>."""
        resp = verdict.refuse_guard(self.state, r, url, client, flow.request.headers.get("accept"))
        flow.response = http.Response.make(resp.status, resp.body, resp.headers())
        flow.metadata["cg_denied"] = r
        flow.metadata.setdefault("cg_url", url)
        log.info("refused %s for %s: %s", url, client, r.text)

    def _local(self, flow: http.HTTPFlow) -> None:
        st = self.state
        path = flow.request.path.split("?", 1)[0]
        if path == "/healthz":
            flow.response = http.Response.make(200, b"ok\n", {"Content-Type": "text/plain"})
        elif path in ("/proxy.pac", "/wpad.dat"):
            body = st.pacs.for_client(flow.client_conn.peername[0])  # its VIP order (docs/ha.md, active/active)
            flow.response = http.Response.make(200, body, {"Content-Type": pac.CONTENT_TYPE})
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
        url = flow.metadata.get("cg_url") or (req.pretty_url if req.method != "CONNECT" else f"{req.host}:{req.port}")
        acc.log(start=start, elapsed_ms=elapsed, client=flow.client_conn.peername[0], code=code, status=status,
                size=size, method=req.method, url=url, peer=peer, mime=mime, tag=verdict.tag_of(denied))

    # ---------------------------------------------------------------- CONNECT

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """CONNECT: the target as host_port reads it (bad-host), client ACL, the guard (addresses, connect_ports), the
        lists on the canonical host, then every address it resolves to."""
        st = self.state
        req = flow.request
        st.counters.requests += 1
        st.counters.connects += 1
        client = flow.client_conn.peername[0]
        try:
            host, port = host_port(req.authority or f"{req.host}:{req.port}", req.port)
        except BadHost as e:
            return self._refuse_connect(flow, bad_host(e), shown(req.authority or req.host, 200)[1:-1], client)
        hostport = host.with_port(port)
        flow.metadata["cg_url"] = hostport
        d = st.engine.decide(client, host.name)
        if d.verdict == "deny":
            return self._block_connect(flow, d, hostport, client)
        r = st.dest.check_target(host, port, True)
        if r is not None:
            return self._refuse_connect(flow, r, hostport, client)
        intercept = st.cfg.proxy.tls == "intercept"
        # intercept mode shows the block page inside TLS; an exempt host is refused here
        if d.blocked and (not intercept or st.engine.exempt_host(host.name)):
            return self._block_connect(flow, d, hostport, client)
        r = await self._resolve(host, port)
        if r is not None:
            return self._refuse_connect(flow, r, hostport, client)
        if (req.host, req.port) != (host.name, port):
            req.host, req.port = host.name, port
        flow.client_conn.cg_tunnel = {"start": time.time(), "hostport": hostport, "host": host.name, "client": client,
                                      "decision": None, "blocked": d if d.blocked else None}

    def http_connected(self, flow: http.HTTPFlow) -> None:
        """The CONNECT was answered 200: its ClientHello must be whole within proxy.hello_timeout (nextlayer)."""
        if getattr(flow.client_conn, "cg_tunnel", None) is not None:
            asyncio.get_running_loop().call_later(nextlayer.limits(self.state).hello_timeout, nextlayer.hello_due,
                                                  self.state, flow.client_conn)

    def _block_connect(self, flow: http.HTTPFlow, d: Decision, hostport: str, client: str) -> None:
        self._block(flow, d, hostport, client)
        self._log_flow(flow)

    def _refuse_connect(self, flow: http.HTTPFlow, r: Refusal, hostport: str, client: str) -> None:
        self._refuse(flow, r, hostport, client)
        self._log_flow(flow)

    # ---------------------------------------------------------------- the address actually connected to

    async def server_connect(self, data: Any) -> None:
        """Every upstream connection (HTTP, CONNECT, inside intercepted TLS): resolve the name, check every address,
        and connect to the checked one (DNS rebinding cannot slip another address in between). The address goes back
        to the name in server_connected, so mitmproxy's connection reuse, SNI and logs see the name."""
        server = data.server
        if not server.address:
            return
        name, port = server.address[0], server.address[1]
        try:
            host = canonical_host(name)
        except BadHost as e:
            return self._kill(server, bad_host(e))
        try:
            addrs, r = await self.state.dest.resolve(host, port)
        except (OSError, TimeoutError, UnicodeError) as e:
            # fail closed: mitmproxy must never resolve (and connect to) a name the guard has not checked
            server.error = f"cannot resolve {host.name}: {e or type(e).__name__}"
            return
        if r is not None:
            return self._kill(server, r)
        server.cg_address = server.address
        server.address = (addrs[0], port)

    def server_connected(self, data: Any) -> None:
        """Give the connection its name back (it was opened to the checked address, which stays its peername): so
        mitmproxy reuses it for the next request to that name. mitmproxy refuses to change the address of an open
        connection (its layers would connect elsewhere than they think); here the name is what the layers asked for
        and the address it was pinned to is the one they reach, so the check is bypassed on purpose."""
        server = data.server
        named = getattr(server, "cg_address", None)
        if named is not None:
            object.__setattr__(server, "address", named)
        r = self.state.dest.check_address(server.peername[0], server.peername[1]) if server.peername else None
        if r is not None:  # cannot happen while server_connect pins the address; say so loudly if it ever does
            log.error("connected to a refused address %s: %s", server.peername[0], r.text)

    def server_connect_error(self, data: Any) -> None:
        named = getattr(data.server, "cg_address", None)
        if named is not None:
            data.server.address = named

    def _kill(self, server: Any, r: Refusal) -> None:
        self.state.counters.refuse(r.reason)
        server.error = r.text
        log.info("refused upstream connection to %s: %s", shown(server.address[0]), r.text)

    def client_disconnected(self, client: Any) -> None:
        meta = getattr(client, "cg_tunnel", None)
        acc = self.state.access
        if meta is None or acc.fd is None or "start" not in meta:
            return
        code, status, url, peer = nextlayer.tunnel_record(meta)
        cut = meta.get("cut")  # the report counts refusals by the log's tag (docs/report.md)
        tag = verdict.tag_of(meta.get("decision") or meta.get("blocked")) or (refusal_tag(cut) if isinstance(cut, str) else "")
        verdict.log_connect(acc, meta["start"], meta["client"], code, status, 0, url, peer=peer, tag=tag)

    def tls_clienthello(self, data: ClientHelloData) -> None:
        """tls: intercept: hosts of an intercept_exempt category are tunnelled untouched."""
        sni = data.client_hello.sni
        if sni and self.state.engine.exempt_host(sni):
            data.ignore_connection = True
