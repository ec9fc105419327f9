"""Which mitmproxy layer carries a connection next: inside CONNECT tunnels the ClientHello is judged with the fast path's
rules (gate.hello_verdict: fails closed), inside intercepted TLS HTTP/1 goes through the inner gate."""
from __future__ import annotations

import logging
from typing import Any

from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello

from filters.hosts import BadHost, canonical_host, shown
from filters.proxy import front, gate, sni, verdict
from filters.proxy.guard import Refusal
from filters.proxy.inner import InnerGate
from filters.proxy.mitmaddons import next_layer as mitm_next_layer

log = logging.getLogger("filters.proxy.addon")


class Cut(layer.Layer):
    """Closes the client connection at once (a TLS tunnel whose SNI is blocked, or whose first bytes are refused)."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


def limits(state: Any) -> gate.Limits:
    return getattr(state, "limits", None) or gate.DEFAULTS


class FilterNextLayer(mitm_next_layer.NextLayer):
    """mitmproxy's NextLayer, plus: inside a CONNECT tunnel the ClientHello decides (cut, raw tunnel, or intercept),
    and inside intercepted TLS an HTTP/1 client is read through the inner gate (inner.InnerGate)."""

    def __init__(self, state: Any):
        super().__init__()
        self.state = state

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer:
            return
        context = nextlayer.context
        if context.client.tls:
            return self._inside_tls(nextlayer)
        if not (isinstance(context.layers[0], modes.HttpProxy) and len(context.layers) > 2 and context.server.address):
            return super().next_layer(nextlayer)  # the first layer of a client connection (explicit HTTP proxy)
        return self._tunnel(nextlayer)

    def _inside_tls(self, nextlayer: layer.NextLayer) -> None:
        """Intercepted TLS carries HTTP, nothing else: HTTP/2 to mitmproxy's HTTP/2 reader (its own limits), anything
        else to mitmproxy's HTTP/1 reader behind the inner gate (so bytes that are not HTTP/1 get 400, never a raw
        relay to the target)."""
        context = nextlayer.context
        http = layers.HttpLayer(context, HTTPMode.transparent)
        if context.client.alpn == b"h2":
            nextlayer.layer = http
            return
        context.layers.remove(http)  # the stack reads: ..., ClientTLSLayer, InnerGate, HttpLayer
        client = context.client.peername[0] if context.client.peername else "-"
        nextlayer.layer = InnerGate(context, http, limits(self.state), front.refusal_logger(self.state, client))
        context.layers.append(http)

    def _tunnel(self, nextlayer: layer.NextLayer) -> None:
        """The first bytes in a CONNECT tunnel, by the fast path's rules: wait until the ClientHello is whole; cut
        bytes that are not one (not-tls), one over sni.MAX_HELLO (hello-too-large), a bad or blocked SNI. (No hello
        within proxy.hello_timeout: the addon's timer cuts it.) A passed hello is a raw tunnel in `tls: sni` (and for
        an intercept_exempt host), else mitmproxy's TLS layers."""
        st, context = self.state, nextlayer.context
        meta = getattr(context.client, "cg_tunnel", None)
        if meta is None:
            meta = context.client.cg_tunnel = {"hostport": "%s:%s" % context.server.address}
        data = nextlayer.data_client()
        what, name = gate.hello_verdict(data, False, sni.MAX_HELLO)
        if what == "need":
            meta["hello_bytes"] = len(data)
            return
        meta["hello_done"] = True
        if what == "cut":
            return self._cut(nextlayer, meta, name)
        host = meta.get("host", context.server.address[0])
        client = context.client.peername[0]
        d = verdict.sni_block(st.engine, client, host, name)
        if d is not None:
            meta["decision"] = d
            meta["sni"] = _shown_sni(name)
            verdict.cut(st, d, host, name, log)
            nextlayer.layer = Cut(context)
            return
        if st.cfg.proxy.tls != "intercept" or st.engine.exempt_host(name or host) or st.engine.exempt_host(host):
            nextlayer.layer = layers.TCPLayer(context, ignore=True)
            return
        try:  # mitmproxy must read the same hello: one it cannot parse would be relayed raw
            ok = parse_client_hello(data) is not None
        except ValueError:
            ok = False
        if not ok:
            return self._cut(nextlayer, meta, "not-tls")
        super().next_layer(nextlayer)
        if not isinstance(nextlayer.layer, layers.ServerTLSLayer):
            nextlayer.layer = None
            self._cut(nextlayer, meta, "not-tls")

    def _cut(self, nextlayer: layer.NextLayer, meta: dict, reason: str) -> None:
        self.state.counters.refuse(reason)
        meta["cut"] = reason
        log.info("cut tunnel to %s from %s: %s (%d bytes read)", shown(meta.get("hostport", "-")),
                 nextlayer.context.client.peername[0], reason, len(nextlayer.data_client()))
        nextlayer.layer = Cut(nextlayer.context)


def _shown_sni(name: str | None) -> str:
    """The SNI as the access log shows it: canonical, or escaped when the host model cannot read it."""
    try:
        return canonical_host(name or "").name
    except BadHost:
        return shown(name or "-")[1:-1]


def hello_due(state: Any, client: Any) -> None:
    """proxy.hello_timeout after a CONNECT was answered 200 on the mitmproxy path: a tunnel whose ClientHello is not
    whole by now is cut (hello-timeout, or no-hello when nothing came), counted, and its client connection closed."""
    meta = getattr(client, "cg_tunnel", None)
    if meta is None or meta.get("hello_done") or meta.get("cut"):
        return
    reason = "hello-timeout" if meta.get("hello_bytes") else "no-hello"
    meta["cut"] = reason
    state.counters.refuse(reason)
    log.info("cut tunnel to %s from %s: %s", shown(meta.get("hostport", "-")), client.peername[0], reason)
    g = front.GATES.get(client.peername)
    if g is not None:
        g.abort()


def tunnel_record(meta: dict) -> tuple[str, int, str, str]:
    """(code, status, url, peer) of the access-log record for a CONNECT tunnel on the mitmproxy path when it ends."""
    host, port = meta["hostport"].rsplit(":", 1)
    d = meta.get("decision")
    if d is not None:  # a blocked or unreadable SNI: the name the client sent
        return "TCP_DENIED", d.status if isinstance(d, Refusal) else 403, f"{meta['sni']}:{port}", "-"
    if meta.get("cut") or meta.get("blocked") is not None:  # refused ClientHello; a listed host (intercept)
        return "TCP_DENIED", 403, meta["hostport"], "-"
    return "TCP_TUNNEL", 200, meta["hostport"], meta.get("host", host)
