"""The worker's lean mitmproxy Master: only the proxy server, the filter hooks and (intercept) TLS config."""
from __future__ import annotations

import os
from typing import Any

from mitmproxy import options
from mitmproxy.proxy import mode_servers, server

from filters.proxy import ca, front, gate, trims
from filters.proxy.mitmaddons import Master, proxyserver, tlsconfig
from filters.proxy.upstream import UpstreamCap
from filters.proxy.accesslog import AccessLog
from filters.proxy.addon import FilterAddon, FilterNextLayer, State

__all__ = ["make_master", "make_state", "trims"]
# tests and benches only (like dest.REACH_ENV): the CA file intercepted origins are verified against instead of certifi's
UPSTREAM_CA_ENV = "APPLIANCE_PROXY_TEST_UPSTREAM_CA"


def make_state(spec: Any) -> State:
    """What the hooks and the fast path read: rules, config, access log, counters (and the CA in intercept mode)."""
    state = State(engine=spec.engine, cfg=spec.cfg, base=spec.base, access=AccessLog(spec.access_log), port=spec.port)
    state.configure(spec.cfg, spec.engine, spec.host)
    state.limits = gate.Limits.from_config(spec.cfg, spec.cfg.proxy.worker_count())
    if spec.cfg.proxy.tls == "intercept":
        state.ca_pem = ca.cert_path(spec.base).read_bytes()
    return state


class GateAddon:
    """Tells a client's gate (front.GATES, or the inner gate inside intercepted TLS) how its requests were answered:
    the keep-alive idle timer (proxy.idle_timeout) runs only while no request is waiting for the origin, and a
    CONNECT or Upgrade request turns the gate's checks off only once the answer switched protocols (2xx to CONNECT,
    101), never because of the request alone."""

    @staticmethod
    def _gate(flow: Any) -> Any:
        inner = getattr(flow.client_conn, "cg_inner", None)  # set once intercepted TLS carries HTTP/1
        return inner if inner is not None else front.GATES.get(flow.client_conn.peername)

    def response(self, flow: Any) -> None:
        g = self._gate(flow)
        if g is not None:
            g.decide(flow.response is not None and flow.response.status_code == 101)
            g.responded()

    error = response

    def http_connected(self, flow: Any) -> None:
        g = self._gate(flow)
        if g is not None:
            g.decide(True)

    def http_connect_error(self, flow: Any) -> None:
        g = self._gate(flow)
        if g is not None:
            g.decide(False)
            g.responded()


def make_master(spec: Any, state: State) -> tuple[Master, mode_servers.ServerInstance]:
    """The Master and the server instance whose handle_stream serves one accepted client connection."""
    intercept = spec.cfg.proxy.tls == "intercept"
    opts = options.Options(mode=[], listen_host=spec.host, listen_port=spec.port)
    master = Master(opts)
    ps = proxyserver.Proxyserver()
    addons = [ps, FilterNextLayer(state)]
    if intercept:
        addons.append(tlsconfig.TlsConfig())
    addons += [FilterAddon(state), UpstreamCap(ps, state), GateAddon()]
    master.addons.add(*addons)
    # mitmproxy's inactivity timer per client connection (module constant, 600 s) = proxy.tunnel_idle_timeout: it
    # closes tunnels mitmproxy carries and requests whose origin stays silent; front.GateReader does the rest
    server.TCP_TIMEOUT = max(0.1, getattr(state, "limits", gate.DEFAULTS).tunnel_idle_timeout)
    # intercept: lazy, so a blocked host gets its block page inside TLS without any upstream connection
    upd = {"server": False, "connection_strategy": "lazy" if intercept else "eager", "http2": True}
    if intercept:  # certificates from the SNI, no upstream probe: a blocked host is never contacted
        upd.update(confdir=str(ca.ca_dir(spec.base)), upstream_cert=False)
        if os.environ.get(UPSTREAM_CA_ENV):
            upd["ssl_verify_upstream_trusted_ca"] = os.environ[UPSTREAM_CA_ENV]
    opts.update(**upd)
    return master, mode_servers.ServerInstance.make("regular", ps)
