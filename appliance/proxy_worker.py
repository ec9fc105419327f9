"""One proxy worker process: a lean mitmproxy Master (only the addons the appliance needs) on a SO_REUSEPORT socket."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

log = logging.getLogger("appliance.proxy")


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that shares its port with the other workers (kernel load-balanced)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lb = getattr(socket, "SO_REUSEPORT_LB", None)  # FreeBSD 12+: load-balancing variant
    s.setsockopt(socket.SOL_SOCKET, lb if lb is not None else socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen(1024)
    s.setblocking(False)
    return s


def _lean_patches() -> None:
    """Hot-path trims measured with cProfile on mitmproxy 11.0: skip per-message type checks (debug-only in
    mitmproxy itself: `if __debug__`) and the deepcopy of immutable option values on every ctx.options read."""
    import copy

    from mitmproxy import http, optmanager

    http.MessageData.__post_init__ = lambda self: None
    immutable = (str, int, float, bool, bytes, tuple, type(None))

    def current(self):
        v = self._default if self.value is optmanager.unset else self.value
        return v if isinstance(v, immutable) else copy.deepcopy(v)

    optmanager._Option.current = current


async def _serve(index: int, spec) -> None:
    from mitmproxy import options
    from mitmproxy.addons import proxyserver, tlsconfig
    from mitmproxy.master import Master
    from mitmproxy.proxy import mode_servers

    from filters import ca as fca
    from filters import ruleset
    from filters.accesslog import AccessLog
    from filters.addon import FilterAddon, FilterNextLayer, State
    from filters.metrics import worker_file

    _lean_patches()
    cfg, engine = spec.cfg, spec.engine
    state = State(engine=engine, cfg=cfg, base=spec.base, access=AccessLog(spec.access_log), port=spec.port)
    state.configure(cfg, engine, spec.host)
    intercept = cfg.proxy.tls == "intercept"
    if intercept:
        state.ca_pem = fca.cert_path(spec.base).read_bytes()

    opts = options.Options(mode=[], listen_host=spec.host, listen_port=spec.port)
    master = Master(opts)
    ps = proxyserver.Proxyserver()
    addons = [ps, FilterNextLayer(state)]
    if intercept:
        addons.append(tlsconfig.TlsConfig())
    addons.append(FilterAddon(state))
    master.addons.add(*addons)
    # intercept: lazy, so a blocked host gets its block page inside TLS without any upstream connection
    upd = {"server": False, "connection_strategy": "lazy" if intercept else "eager", "http2": True}
    if intercept:  # certificates from the SNI, no upstream probe: a blocked host is never contacted
        upd.update(confdir=str(fca.ca_dir(spec.base)), upstream_cert=False)
    opts.update(**upd)

    instance = mode_servers.ServerInstance.make("regular", ps)
    sock = reuseport_socket(spec.host, spec.port)
    server = await asyncio.start_server(instance.handle_stream, sock=sock, backlog=1024)
    counters_path = worker_file(spec.run_dir, index)
    loop = asyncio.get_running_loop()

    def reload() -> None:
        try:
            new_cfg, new_engine, rep = ruleset.load(spec.config_path)
            if new_cfg.proxy.tls != cfg.proxy.tls:
                log.warning("worker %d: proxy.tls changed to %s; restart the proxy to apply it", index, new_cfg.proxy.tls)
            state.configure(new_cfg, new_engine, spec.host)
            state.counters.reloads += 1
            log.warning("worker %d: reloaded %s (%d entries, %d bad lines skipped)", index, spec.config_path, rep.entries, rep.bad_count)
        except Exception as e:  # noqa: BLE001 - a failed reload keeps the old rules
            state.counters.reload_failures += 1
            log.error("worker %d: reload failed, keeping the old rules: %s", index, e)

    def stop() -> None:
        server.close()
        master.shutdown()

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGUSR1, state.access.reopen)
    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)

    async def dump_counters() -> None:
        last = None
        while True:
            d = state.counters.to_dict()
            if d != last:
                try:
                    state.counters.dump(counters_path)
                    last = {**d, "blocks": dict(d["blocks"])}
                except OSError:
                    pass
            await asyncio.sleep(0.2)

    task = asyncio.create_task(dump_counters())
    try:
        await master.run()
    finally:
        task.cancel()
        try:
            state.counters.dump(counters_path)
        except OSError:
            pass
        state.access.close()


def run(index: int, spec) -> None:
    """Entry point in the forked child; never returns."""
    code = 0
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop installs its own handlers
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        asyncio.run(_serve(index, spec))
    except BaseException as e:  # noqa: BLE001
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            log.exception("worker %d crashed", index)
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
