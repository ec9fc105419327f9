"""One proxy worker process: a lean mitmproxy Master (only the addons the appliance needs) on a SO_REUSEPORT socket."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

log = logging.getLogger("appliance.proxy")
TRIMS_ENV = "APPLIANCE_PROXY_TRIMS"  # "0": no mitmproxy hot-path trims (for comparison)
_PARENT: int | None = None  # the main process's PID, set by run()
LOOP_ENV = "APPLIANCE_PROXY_LOOP"  # "uvloop" (default when installed) or "asyncio" (for comparison)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that shares its port with the other workers (kernel load-balanced)."""
    # proto IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY only on sockets whose proto
    # is IPPROTO_TCP. With proto 0 every response paid Nagle + delayed ACK (~40 ms): 3x fewer requests/s.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lb = getattr(socket, "SO_REUSEPORT_LB", None)  # FreeBSD 12+: load-balancing variant
    s.setsockopt(socket.SOL_SOCKET, lb if lb is not None else socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen(1024)
    s.setblocking(False)
    return s


def _lean_patches() -> None:
    """Hot-path trims of mitmproxy 11.0 internals, each found with a profiler, none changing behaviour:

    - `http.MessageData.__post_init__` only type-checks the fields, and mitmproxy defines it only `if __debug__`;
    - `_Option.current` deep-copies the value on every `ctx.options.x` read; immutable values are returned as they
      are (deepcopy would return the same object anyway), anything else is still deep-copied;
    - `AddonManager.handle_lifecycle` walks every addon twice per hook (the hook, then an `update` hook for flows);
      hooks that no addon implements are skipped (the set of implemented hooks is recomputed when addons change).

    `APPLIANCE_PROXY_TRIMS=0` turns them off (for comparison)."""
    if os.environ.get(TRIMS_ENV, "1") == "0":
        return
    import copy

    from mitmproxy import addonmanager, flow, hooks, http, optmanager

    http.MessageData.__post_init__ = lambda self: None
    scalar = (str, int, float, bool, bytes, type(None))

    def current(self):
        v = self._default if self.value is optmanager.unset else self.value
        if isinstance(v, scalar) or (type(v) is tuple and all(isinstance(x, scalar) for x in v)):
            return v
        return copy.deepcopy(v)

    optmanager._Option.current = current

    def implemented(mgr) -> frozenset:
        key = (len(mgr.lookup), len(mgr.chain))
        cached = mgr.__dict__.get("_cg_hooks")
        if cached is None or cached[0] != key:
            addons = list(addonmanager.traverse(mgr.chain))
            names = frozenset(n for n in hooks.all_hooks if any(callable(getattr(a, n, None)) for a in addons))
            cached = mgr.__dict__["_cg_hooks"] = (key, names)
        return cached[1]

    async def handle_lifecycle(self, event):
        names = implemented(self)
        if event.name in names:
            await self.trigger_event(event)
        if "update" in names and isinstance(event.args()[0], flow.Flow):
            await self.trigger_event(hooks.UpdateHook([event.args()[0]]))

    addonmanager.AddonManager.handle_lifecycle = handle_lifecycle


class _Acceptor:
    """Accepts on the shared socket itself; peeks at the first bytes: CONNECT -> filters.proxy.tunnel, else mitmproxy."""

    PEEK_WAIT = 2.0  # a client that has sent a prefix of "CONNECT " is given this long to send the rest

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, state, handle_stream):
        from filters.proxy import tunnel

        self.tunnel = tunnel
        self.loop, self.sock, self.state, self.handle_stream = loop, sock, state, handle_stream
        self.tasks: set[asyncio.Task] = set()
        self.task = loop.create_task(self._accept())

    async def _accept(self) -> None:
        loop, sock = self.loop, self.sock
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as e:  # EMFILE and the like: back off instead of spinning
                log.warning("accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = loop.create_task(self._route(conn))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _route(self, conn: socket.socket) -> None:
        loop, tunnel = self.loop, self.tunnel
        head = b""
        deadline = loop.time() + self.PEEK_WAIT
        try:
            while True:
                try:
                    head = conn.recv(8, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    head = None
                if head == b"":
                    conn.close()  # closed before sending anything
                    return
                if head is not None and (len(head) >= 8 or not b"CONNECT "[:len(head)] == head):
                    break
                if loop.time() >= deadline:
                    break  # mitmproxy handles the slow client as it always does
                if head is None:
                    try:
                        await asyncio.wait_for(tunnel.readable(loop, conn), deadline - loop.time())
                    except asyncio.TimeoutError:
                        pass
                else:
                    await asyncio.sleep(0.005)  # a partial "CONNECT": the socket stays readable, do not spin
        except OSError:
            conn.close()
            return
        if head == b"CONNECT ":
            await tunnel.handle(conn, self.state)
            return
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=2 ** 16)
        except OSError:
            conn.close()
            return
        await self.handle_stream(reader, writer)

    def close(self) -> None:
        self.task.cancel()
        self.sock.close()


async def _serve(index: int, spec) -> None:
    from mitmproxy import options
    from mitmproxy.addons import proxyserver, tlsconfig
    from mitmproxy.master import Master
    from mitmproxy.proxy import mode_servers

    from filters.proxy import ca as fca
    from filters import ruleset
    from filters.proxy.accesslog import AccessLog
    from filters.proxy.addon import FilterAddon, FilterNextLayer, State
    from filters.proxy.metrics import worker_file

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
    loop = asyncio.get_running_loop()
    if intercept:
        server = await asyncio.start_server(instance.handle_stream, sock=sock, backlog=1024)
    else:  # tls: sni: CONNECT tunnels take the asyncio fast path, everything else goes to mitmproxy untouched
        server = _Acceptor(loop, sock, state, instance.handle_stream)
    counters_path = worker_file(spec.run_dir, index)

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
        if _PARENT is not None and os.getppid() != _PARENT:  # orphaned: no main process escalates to SIGKILL
            loop.call_later(5.0, os._exit, 0)

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

    async def watch_parent() -> None:  # the portable fallback to die_with_parent(): bounded, one syscall a second
        while _PARENT is not None:
            await asyncio.sleep(PARENT_CHECK)
            if os.getppid() != _PARENT:
                log.warning("worker %d: the main process %d is gone, stopping", index, _PARENT)
                stop()
                return

    task = asyncio.create_task(dump_counters())
    watcher = asyncio.create_task(watch_parent())
    try:
        await master.run()
    finally:
        task.cancel()
        watcher.cancel()
        try:
            state.counters.dump(counters_path)
        except OSError:
            pass
        state.access.close()


PARENT_CHECK = 1.0  # seconds between the workers' portable getppid() checks
PR_SET_PDEATHSIG = 1  # Linux <sys/prctl.h>
PROC_PDEATHSIG_CTL, P_PID = 11, 0  # FreeBSD <sys/procctl.h>, <sys/wait.h>


def die_with_parent(parent: int) -> bool:
    """In a freshly forked worker: ask the kernel for SIGTERM when the main process dies (Linux prctl, FreeBSD procctl),
    then exit at once if it already has (the fork race). False when the kernel offers no such request (the worker's
    periodic getppid() check still applies)."""
    import ctypes

    armed = False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux"):
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
        elif sys.platform.startswith("freebsd"):
            libc.procctl.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p)
            sig = ctypes.c_int(int(signal.SIGTERM))
            armed = libc.procctl(P_PID, 0, PROC_PDEATHSIG_CTL, ctypes.byref(sig)) == 0
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent:  # the main process died between fork() and the request above
        os._exit(0)
    return armed


def run(index: int, spec, parent: int | None = None) -> None:
    """Entry point in the forked child; never returns. `parent`: the main process, watched every PARENT_CHECK s."""
    code = 0
    global _PARENT
    _PARENT = parent
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop installs its own handlers
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if os.environ.get(LOOP_ENV, "uvloop") == "uvloop":
            try:
                import uvloop
                uvloop.install()
            except ImportError:
                log.warning("uvloop not installed: using the asyncio event loop")
        asyncio.run(_serve(index, spec))
    except BaseException as e:  # noqa: BLE001
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            log.exception("worker %d crashed", index)
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
