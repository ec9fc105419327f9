"""One proxy worker process: a lean mitmproxy Master (only the addons the appliance needs) on a SO_REUSEPORT socket."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filters import ruleset
from filters.proxy import front, gate, httpfast, sockio, tunnel
from filters.proxy.accesslog import AccessLog, refusal_tag
from filters.proxy.metrics import worker_file

log = logging.getLogger("appliance.proxy")
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


class _Acceptor:
    """Accepts on the shared socket itself. Holds each client to its connection slots (gate.Slots: per address and
    per worker; excess answered 503 and closed, counted). Peeks at the first bytes: CONNECT -> filters.proxy.tunnel
    (tls: sni); other requests -> filters.proxy.httpfast when proxy.http_fast_path is on (it hands on what it does
    not serve); the rest to mitmproxy behind the front gate (front.GateReader: header limits and timeouts)."""

    PEEK_WAIT = 2.0  # a client that has sent a prefix of "CONNECT " is given this long to send the rest

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, state, handle_stream,
                 fast_connect: bool = True):
        self.loop, self.sock, self.state, self.handle_stream = loop, sock, state, handle_stream
        self.fast_connect = fast_connect
        lim = tunnel.limits(state)
        self.slots = gate.Slots(lim.per_client, lim.per_worker)
        state.slots = self.slots  # upstream.UpstreamCap counts extra upstream sockets in the same budget
        self.tasks: set[asyncio.Task] = set()
        self.task = loop.create_task(self._accept())

    def _refuse_conn(self, conn: socket.socket, client: str, reason: str) -> None:
        """Over a connection limit: a 503 if the socket takes it at once, then close; counted and logged."""
        tunnel.refused(self.state, reason)
        why = ("too many connections from this address (proxy.max_client_connections)" if reason == "client-connections"
               else "this proxy worker is at its connection ceiling (proxy.max_worker_connections)")
        try:
            conn.send(tunnel.answer_bytes(503, why))
        except OSError:
            pass
        conn.close()
        acc = self.state.access
        if acc.fd is not None:
            acc.log(start=time.time(), elapsed_ms=0, client=client, code="TCP_DENIED", status=503, size=0, method="-",
                    url="-", peer="-", mime="-", tag=refusal_tag(reason))

    async def _accept(self) -> None:
        loop, sock = self.loop, self.sock
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as e:  # EMFILE and the like: back off instead of spinning
                log.warning("accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            client = addr[0]
            lim = tunnel.limits(self.state)
            self.slots.per_client, self.slots.per_worker = lim.per_client, lim.per_worker  # a reload may change them
            reason = self.slots.take(client)
            if reason is not None:
                self._refuse_conn(conn, client, reason)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = loop.create_task(self._route(conn, client))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _route(self, conn: socket.socket, client: str) -> None:
        """Serve one accepted connection; its slot is given back exactly once, when the connection is over."""
        given = False

        def done() -> None:
            nonlocal given
            if not given:
                given = True
                self.slots.give(client)

        handed = False
        try:
            handed = await self._serve_conn(conn, done)
        finally:
            if not handed:
                done()

    async def _serve_conn(self, conn: socket.socket, done) -> bool:
        """True when `done` was handed on to the CONNECT fast path (it calls it when the tunnel ends)."""
        loop = self.loop
        head = b""
        # Until its first byte a connection costs one reader registration, nothing more (5,000 idle connections must
        # not become 5,000 mitmproxy handlers); with nothing by proxy.header_timeout it is closed and counted.
        deadline = loop.time() + tunnel.limits(self.state).header_timeout
        prefix = False
        try:
            while True:
                try:
                    head = conn.recv(8, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    head = None
                if head == b"":
                    conn.close()  # closed before sending anything
                    return False
                if head is not None and (len(head) >= 8 or not b"CONNECT "[:len(head)] == head):
                    break
                if head is not None and not prefix:  # a prefix of "CONNECT ": PEEK_WAIT for the rest
                    prefix, deadline = True, min(deadline, loop.time() + self.PEEK_WAIT)
                if loop.time() >= deadline:
                    if head is None:
                        tunnel.refused(self.state, "header-timeout")
                        conn.close()
                        return False
                    break  # mitmproxy handles the slow client as it always does
                if head is None:
                    try:
                        await sockio.wait_io(loop, conn, deadline)
                    except TimeoutError:
                        pass
                else:
                    await asyncio.sleep(0.005)  # a partial "CONNECT": the socket stays readable, do not spin
        except OSError:
            conn.close()
            return False
        if head == b"CONNECT " and self.fast_connect:
            await tunnel.handle(conn, self.state, done)
            return True
        if head and b"CONNECT "[:len(head)] != head and getattr(self.state.cfg.proxy, "http_fast_path", False):
            await httpfast.serve(conn, self.state, self._to_mitmproxy)  # plain HTTP/1.1 (proxy.http_fast_path)
            return False
        await self._to_mitmproxy(conn)
        return False

    async def _to_mitmproxy(self, conn: socket.socket, pre: bytes = b"") -> None:
        """mitmproxy serves the connection behind the front gate; `pre`: what the HTTP fast path read and did not
        answer (the gate and mitmproxy read it first, as if it had just arrived)."""
        loop = self.loop
        try:
            peer = conn.getpeername()
            reader = asyncio.StreamReader(limit=2 ** 16, loop=loop)
            if pre:
                reader.feed_data(pre)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=conn)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        except OSError:
            conn.close()
            return
        gr = front.GateReader(reader, writer, tunnel.limits(self.state), front.refusal_logger(self.state, peer[0]), key=peer)
        try:
            await self.handle_stream(gr, writer)
        finally:
            gr.close()

    def close(self) -> None:
        self.task.cancel()
        self.sock.close()


async def _serve(index: int, spec) -> None:
    # Deferred on purpose: mitmproxy (imported by lean) loads only once the config checked out: in the main process
    # before the fork with two workers or more (main.preload_worker_code), else here.
    from filters.proxy import lean

    lean.trims.apply()
    state = lean.make_state(spec)
    master, instance = lean.make_master(spec, state)
    # What start-up built lives as long as the worker: frozen, as what it inherited is, the collector never walks it
    # again (with workers: 1 that is all of mitmproxy, imported here)
    gc.collect()
    gc.freeze()
    sock = reuseport_socket(spec.host, spec.port)
    loop = asyncio.get_running_loop()
    # tls: sni: CONNECT tunnels take the asyncio fast path; everything else (and everything in intercept mode) goes
    # to mitmproxy behind the front gate; both under the connection slots
    server = _Acceptor(loop, sock, state, instance.handle_stream, fast_connect=spec.cfg.proxy.tls != "intercept")
    counters_path = worker_file(spec.run_dir, index)

    def stop() -> None:
        server.close()
        master.shutdown()
        if _PARENT is not None and os.getppid() != _PARENT:  # orphaned: no main process escalates to SIGKILL
            loop.call_later(5.0, os._exit, 0)

    loop.add_signal_handler(signal.SIGHUP, _Reloader(index, spec, state))
    loop.add_signal_handler(signal.SIGUSR1, state.access.reopen)
    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    tasks = [asyncio.create_task(_dump_counters(state, counters_path)), asyncio.create_task(_watch_parent(index, stop))]
    try:
        await master.run()
    finally:
        for task in tasks:
            task.cancel()
        try:
            state.counters.dump(counters_path)
        except OSError:
            pass
        state.access.close()


class _Reloader:
    """SIGHUP: the config and lists are loaded in a thread and applied in the loop, so the worker goes on answering
    while a big list loads (blocking the loop for it read as a hung proxy to the fast liveness check, whose 0.35 s
    would hand the VIP over at every sync). A SIGHUP during a load runs one more load after it; a failed reload
    keeps the old rules."""

    def __init__(self, index: int, spec, state) -> None:
        self.index, self.spec, self.state = index, spec, state
        self.busy = self.again = False

    def __call__(self) -> None:
        if self.busy:
            self.again = True
            return
        self.busy = True
        asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for _ in range(100):                     # bounded: SIGHUPs arriving faster than loads end are merged
                self.again = False
                try:
                    loaded = await loop.run_in_executor(None, ruleset.load, self.spec.config_path)
                except Exception as e:  # noqa: BLE001 - config, list or index problems: keep the old rules
                    self.state.counters.reload_failures += 1
                    log.error("worker %d: reload failed, keeping the old rules: %s", self.index, e)
                else:
                    self.apply(*loaded)
                if not self.again:
                    return
        finally:
            self.busy = False

    def apply(self, new_cfg, new_engine, rep) -> None:
        spec, state = self.spec, self.state
        if new_cfg.proxy.tls != spec.cfg.proxy.tls:
            log.warning("worker %d: proxy.tls changed to %s; restart the proxy to apply it", self.index, new_cfg.proxy.tls)
        state.configure(new_cfg, new_engine, spec.host)
        state.limits = gate.Limits.from_config(new_cfg, new_cfg.proxy.worker_count())
        state.counters.reloads += 1
        log.warning("worker %d: reloaded %s (%d entries, %d bad lines skipped)", self.index, spec.config_path,
                    rep.entries, rep.bad_count)


async def _dump_counters(state, path: Path) -> None:
    """Write the counters for the main process's /metrics whenever they changed (checked every COUNTERS_PERIOD)."""
    last = None
    while True:
        d = state.counters.to_dict()
        if d != last:
            try:
                state.counters.dump(path)
                last = {**d, "blocks": dict(d["blocks"])}
            except OSError:
                pass
        await asyncio.sleep(COUNTERS_PERIOD)


# /metrics lags a worker's counters by at most this; a scrape every few seconds needs no more. With a check every
# 0.2 s, the two idle workers of a TCG guest used 17% of a vCPU together (this 5 Hz loop was their busiest timer).
COUNTERS_PERIOD = 1.0


async def _watch_parent(index: int, stop) -> None:
    """The portable fallback to die_with_parent(): bounded, one syscall a second."""
    while _PARENT is not None:
        await asyncio.sleep(PARENT_CHECK)
        if os.getppid() != _PARENT:
            log.warning("worker %d: the main process %d is gone, stopping", index, _PARENT)
            stop()
            return


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
