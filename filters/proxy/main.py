"""The proxy's main process: load and check the rules, fork the workers, supervise them, fan out signals, serve /metrics."""
from __future__ import annotations

import errno
import gc
import logging
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.errors import ApplianceError, ConfigError
from appliance.core.model import Appliance
from appliance.core.paths import run_dir as state_run_dir
from filters import ruleset
from filters.index import IndexFormatError
from filters.proxy import ca, gate, metrics
from filters.proxy import control as proxyctl

log = logging.getLogger("appliance.proxy")
MAX_RESTARTS = 10  # per minute, then the proxy gives up (a crash loop must not spin forever)


@dataclass
class WorkerSpec:
    """What a worker inherits through fork: rules already loaded (the index is mapped, shared pages)."""

    config_path: Path
    base: Path
    cfg: Any
    engine: Any
    host: str
    port: int
    access_log: str
    run_dir: Path


def parse_listen(value: str | None, cfg: Appliance) -> tuple[str, int]:
    if value:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--listen {value!r}: expected HOST:PORT")
        host = host.strip("[]") or "0.0.0.0"
        try:
            socket.inet_aton(host)
        except OSError:
            raise ValueError(f"--listen {value!r}: {host!r} is not an IPv4 address") from None
        return host, int(port)
    listen = cfg.proxy.listen
    host = "0.0.0.0" if listen == "any" else str(cfg.cluster.vip.ip) if listen == "vip" else str(listen)
    return host, cfg.proxy.port


def _reserve(host: str, port: int) -> socket.socket:
    """Bind (not listen) with SO_REUSEPORT: fails early when the port is taken, keeps it for respawned workers."""
    # a plain bind first: SO_REUSEPORT alone would silently share the port with another running proxy
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


class WorkerSupervisor:
    """The main process's loop: fork the workers, restart the ones that die, fan out signals, reload, serve /metrics."""

    def __init__(self, spec: WorkerSpec, workers: int):
        self.spec = spec
        self.nworkers = workers
        self.children: dict[int, int] = {}  # pid -> worker index
        self.restarts: list[float] = []
        self.pending: list[int] = []
        self.stopping = False
        self.reload_failures = 0
        self.reloads = 0

    def spawn(self, index: int) -> None:
        parent = os.getpid()
        # Frozen, the objects a worker inherits are never walked by a collector (a walk writes to every object header,
        # copying the pages this process and the workers share: 8 MB per worker after the first requests). Never
        # unfrozen here either, so this process does not copy them; the rules a reload drops hold no reference cycles,
        # so reference counting frees them, frozen or not.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            self._in_child()
            from filters.proxy import worker as proxy_worker  # deferred: see preload_worker_code()

            proxy_worker.die_with_parent(parent)  # a SIGKILLed main process takes its workers with it
            proxy_worker.run(index, self.spec, parent)  # never returns
        self.children[pid] = index

    def _in_child(self) -> None:
        for s in (getattr(self, "metrics_sock", None), getattr(self, "wake_r", None)):
            try:
                s.close() if hasattr(s, "close") else os.close(s) if s is not None else None
            except OSError:
                pass
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)

    def fan_out(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def reload(self) -> None:
        t0 = time.monotonic()
        try:
            cfg, engine, rep = ruleset.load(self.spec.config_path)
        except Exception as e:  # noqa: BLE001 - config, list or index problems: keep the old rules
            self.reload_failures += 1
            log.error("reload failed, keeping the old rules: %s", e)
            return
        old = self.spec.engine
        self.spec.cfg, self.spec.engine = cfg, engine
        self.reloads += 1
        if old is not engine and hasattr(old, "index"):
            old.index.close()
        log.warning("reload: %s checked in %.2f s (%d entries, %d bad lines skipped); telling %d workers",
                    self.spec.config_path, time.monotonic() - t0, rep.entries, rep.bad_count, len(self.children))
        self.fan_out(signal.SIGHUP)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None or self.stopping:
                continue
            log.error("worker %d (pid %d) exited with status %d; restarting it", index, pid, status)
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < 60] + [now]
            if len(self.restarts) > MAX_RESTARTS:
                log.error("workers keep dying (%d restarts in a minute); stopping the proxy", len(self.restarts))
                self.stopping = True
                self.fan_out(signal.SIGTERM)
                return
            self.spawn(index)

    def metrics(self) -> str:
        files = [metrics.worker_file(self.spec.run_dir, i) for i in range(self.nworkers)]
        total = metrics.aggregate(files)
        total["reload_failures"] = max(total["reload_failures"], 0) + self.reload_failures
        return metrics.prometheus(total, len(self.children)) + metrics.node_files(self.spec.run_dir)

    def serve_metrics(self, sock: socket.socket) -> None:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(1.0)
            data = b""
            try:
                while b"\r\n\r\n" not in data and len(data) < 8192:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                path = data.split(b" ", 2)[1] if data.count(b" ") >= 2 else b""
                if path.split(b"?")[0] == b"/metrics":
                    body, status = self.metrics().encode(), b"200 OK"
                else:
                    body, status = b"not found\n", b"404 Not Found"
                conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            except OSError:
                pass

    def loop(self) -> int:
        sel = selectors.DefaultSelector()
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.wake_r = r
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, lambda s, f: None)
        sel.register(r, selectors.EVENT_READ, "signal")
        self.metrics_sock = None
        port = self.spec.cfg.proxy.metrics_port
        try:
            ms = socket.socket()
            ms.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ms.bind(("127.0.0.1", port))
            ms.listen(16)
            self.metrics_sock = ms
            sel.register(ms, selectors.EVENT_READ, "metrics")
        except OSError as e:
            log.warning("metrics: cannot listen on 127.0.0.1:%d (%s); /metrics is off", port, e)
        gc.collect()  # once, before the first fork: what is garbage now is not frozen with the rest
        for i in range(self.nworkers):
            self.spawn(i)
        deadline = None
        while True:
            if self.stopping and not self.children:
                break
            if self.stopping and deadline is not None and time.monotonic() > deadline:
                self.fan_out(signal.SIGKILL)
            for key, _ in sel.select(timeout=1.0):
                if key.data == "metrics":
                    self.serve_metrics(key.fileobj)
                    continue
                try:
                    sigs = os.read(r, 512)
                except BlockingIOError:
                    sigs = b""
                for sig in sigs:
                    if sig == signal.SIGHUP:
                        self.reload()
                    elif sig == signal.SIGUSR1:
                        self.fan_out(signal.SIGUSR1)
                    elif sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                        log.warning("stopping the proxy")
                        self.stopping = True
                        deadline = time.monotonic() + 10
                        self.fan_out(signal.SIGTERM)
            self.reap()
        if self.metrics_sock:
            self.metrics_sock.close()
        return 0


def run(config_path: Path, listen: str | None, access_log: str | None) -> int:
    config_path = Path(config_path)
    try:
        cfg, engine, rep = ruleset.load(config_path)
    except ConfigError as e:
        return _err(str(e))
    except (ruleset.ListError, IndexFormatError) as e:
        return _err(str(e))
    try:
        host, port = parse_listen(listen, cfg)
    except ValueError as e:
        return _err(str(e))
    base = config_path.resolve().parent
    if cfg.proxy.tls == "intercept":
        ca.ensure_ca(base)
    try:
        reservation = _reserve(host, port)
    except OSError as e:
        hint = " (another program uses this port)" if e.errno == errno.EADDRINUSE else ""
        return _err(f"cannot listen on {host}:{port}: {e.strerror}{hint}", 1)
    reservation.close()
    nofile, _ = gate.raise_nofile()  # the workers' connection ceilings (gate.worker_ceiling) are taken from this
    n = cfg.proxy.worker_count()
    if n > 1:
        preload_worker_code()

    run_dir = state_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    pidfile = proxyctl.pidfile()
    pidfile.write_text(f"{os.getpid()}\n")
    spec = WorkerSpec(config_path, base, cfg, engine, host, port, access_log or cfg.proxy.access_log, run_dir)
    log.warning("proxy on %s:%d, %d worker(s), tls %s, %d list entries (%d bad lines skipped), metrics on 127.0.0.1:%d, "
                "%d fds, at most %d client connections per worker", host, port, n, cfg.proxy.tls, rep.entries,
                rep.bad_count, cfg.proxy.metrics_port, nofile, gate.Limits.from_config(cfg, n, nofile).per_worker)
    sup = WorkerSupervisor(spec, n)
    try:
        return sup.loop()
    finally:
        try:
            if pidfile.read_text().strip() == str(os.getpid()):
                pidfile.unlink()
        except OSError:
            pass


def preload_worker_code() -> None:
    """Import what only the workers run (the worker module with asyncio, mitmproxy through filters.proxy.lean, uvloop)
    here, before the fork, so that the workers share its pages (about 30 MB). Only for two workers or more: a single
    worker shares them with no one, and the main process, which never runs them, would hold them in its own resident
    set too (the two processes' RSS added up to 32 MB over their PSS). Deferred on purpose either way: mitmproxy
    loads only once the config, lists and port are known good, so a bad config fails fast."""
    from filters.proxy import worker as proxy_worker  # deferred: see above
    import filters.proxy.lean  # noqa: F401  (deferred: see above; the workers' Master, the addon, the trims)
    if os.environ.get(proxy_worker.LOOP_ENV, "uvloop") == "uvloop":
        try:  # each worker installs it
            import uvloop  # noqa: F401
        except ImportError:
            pass


def _err(msg: str, code: int = 2) -> int:
    raise ApplianceError(msg, code)  # the CLI prints it and exits with `code`
