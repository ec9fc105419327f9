"""Helpers for the filter proxy tests: a config tree with test lists, a local origin (HTTP and TLS), the proxy process."""
from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import signal
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Callable, Iterator

import yaml

from tests.support.env import APPLIANCE, free_port
from tests.support.wait import Timeout, wait_until

WEDNESDAY_10 = "2024-01-03 10:00"  # inside "mon-fri 08:00-17:00"
# The proxy refuses loopback (issue 11), and the tests' origins live there: origins take their ports from a pool drawn
# at first use, and every proxy a test starts gets the whole pool as test-only reachable destinations
# (APPLIANCE_PROXY_TEST_REACH), whatever the order origins and proxies start in; any other loopback port stays refused.
ORIGIN_PORTS: list[int] = []  # the pool, handed out in order by start_origin()
_POOL = 24
REACH_ENV = "APPLIANCE_PROXY_TEST_REACH"


_used = [0]  # how many pool ports start_origin() handed out


def _below_ephemeral() -> range:
    """Ports under the kernel's ephemeral range: no client socket or bind-to-0 (free_port) elsewhere in the suite can
    take one of them between the pool being drawn and an origin binding it again, which free_port() ports allowed."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 2048)
    return range(max(1024, low - 8192), low)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pool() -> list[int]:
    if not ORIGIN_PORTS:
        span = _below_ephemeral()
        # each xdist worker (gwN) draws from its own 1024-port slice; the pid moves the start within it, so two runs
        # at once rarely meet either
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
        slot = (int(worker) if worker.isdigit() else 0) * 1024 + (os.getpid() * 97) % (1024 - 4 * _POOL)
        start = span.start + slot % max(1, len(span) - 4 * _POOL)
        for port in range(start, span.stop):  # bounded by the span
            if _bindable(port):
                ORIGIN_PORTS.append(port)
            if len(ORIGIN_PORTS) == _POOL:
                break
        if len(ORIGIN_PORTS) < _POOL:
            ORIGIN_PORTS.extend(free_port() for _ in range(_POOL - len(ORIGIN_PORTS)))
    return ORIGIN_PORTS


def _origin_port() -> int:
    port = _pool()[_used[0] % _POOL]  # a port is reused only after _POOL origins (module fixtures shut theirs down)
    _used[0] += 1
    return port


class Origin(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        body = (f"origin says hello: {self.path}\n".encode() + b"x" * 1024)[:1024]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a) -> None:
        pass


def start_origin(tls_dir: Path | None = None) -> tuple[Origin, int]:
    port = _origin_port()
    srv = Origin(("127.0.0.1", port), _Handler)
    if tls_dir is not None:
        cert, key = make_cert(tls_dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, port


def make_cert(d: Path) -> tuple[str, str]:
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "origin.pem", d / "origin.key"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                        "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


LISTS = {
    "blocked/domains": "# test list\r\nblocked.test\r\nCALHOST\r\nUNSC\r\nExample-Caps.TEST.\r\nbücher.test\r\n10.9.8.7\r\n",
    "blocked/urls": "127.0.0.1/private/\nwww.files.test:8080/payload/\n",
    "blocked/expressions": r"secret-[0-9]+\.html" + "\n",
    "allowlist/domains": "localhost\nok.blocked.test\n",
    "social/domains": "vm\nsocial.test\n",
    "nightly/domains": "runsc\n",
    "exempt/domains": "exempt.test\n",
}


def make_tree(root: Path, proxy: dict | None = None, filt: dict | None = None, lists: dict | None = None) -> Path:
    """A config tree under root/etc (appliance.yaml + lists/); returns the config path."""
    etc = root / "etc"
    for rel, text in {**LISTS, **(lists or {})}.items():
        p = etc / "lists" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode())
    cfg = {
        "cluster": {"vip": "192.168.1.50/24", "vhid": 1, "password": "change-me", "interface": "em0"},
        "nodes": {"fw1": {"lan": "192.168.1.2/24", "sync": "192.168.200.1/30", "advskew": 0},
                  "fw2": {"lan": "192.168.1.3/24", "sync": "192.168.200.2/30", "advskew": 100}},
        # connect_ports: the tests' TLS origins listen on ephemeral ports (the default is [443])
        "proxy": {"port": 3128, "clients": ["127.0.0.1/32", "127.0.0.2/31", "127.0.0.4/32"], "workers": 1,
                  "connect_ports": [443, "1024-65535"],
                  "metrics_port": free_port(), "access_log": str(root / "access.log"), "admin_contact": "helpdesk@test",
                  **(proxy or {})},
        "filter": {"lists": "lists/", "block": ["blocked"], "allow": ["allowlist"],
                   "policies": [
                       {"name": "staff-hours", "clients": ["127.0.0.2/32"], "block": ["social"], "schedule": "mon-fri 08:00-17:00"},
                       {"name": "weekend", "clients": ["127.0.0.4/32"], "block": ["social"], "schedule": "sat-sun"},
                   ], **(filt or {})},
    }
    (etc / "appliance.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return etc / "appliance.yaml"


class Proxy:
    """`appliance proxy` as a real process on a free loopback port."""

    def __init__(self, cfg_path: Path, state: Path, clock: str | None = WEDNESDAY_10, access_log: str | None = None,
                 env: dict | None = None):
        self.cfg_path, self.state = cfg_path, state
        self.port = free_port()
        self.closed_port = free_port()  # reachable for the guard, nothing listens: the upstream-refused case
        reach = ",".join(f"127.0.0.1:{p}" for p in [*_pool(), self.closed_port])
        self.env = {**os.environ, "APPLIANCE_STATE_DIR": str(state), REACH_ENV: reach, **(env or {})}
        if clock:
            self.env["APPLIANCE_FILTER_CLOCK"] = clock
        self.stderr_path = state / "proxy.stderr"
        args = [APPLIANCE, "-c", str(cfg_path), "proxy", "--listen", f"127.0.0.1:{self.port}"]
        if access_log:
            args += ["--access-log", access_log]
        self.proc = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "wb"))

    def wait_ready(self, timeout: float = 30) -> "Proxy":
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}: {self.stderr()}")
            try:
                return get_local(self.port, "/healthz", timeout=1)[0] == 200
            except OSError:
                return False

        try:
            wait_until(healthy, timeout, "proxy answering /healthz")
        except Timeout:
            self.stop()  # callers enter their try/finally only after wait_ready(): never leave it running
            raise RuntimeError(f"proxy not ready after {timeout}s: {self.stderr()}") from None
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def get_local(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def fetch(proxy_port: int, url: str, client: str = "127.0.0.1", accept: str | None = None,
          timeout: float = 10) -> tuple[int, bytes, dict]:
    """GET an absolute URL through the proxy from a chosen loopback source address."""
    c = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=timeout, source_address=(client, 0))
    try:
        host = url.split("://", 1)[1].split("/", 1)[0]
        headers = {"Host": host}
        if accept:
            headers["Accept"] = accept
        c.request("GET", url, headers=headers)
        r = c.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        c.close()


def client_hello(name: str | None) -> bytes:
    """The real ClientHello bytes Python's ssl sends for this SNI (None: no server_name extension)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass  # waiting for the ServerHello: the ClientHello is in `out`
    return out.read()


def connect_tunnel(proxy_port: int, target: str, client: str = "127.0.0.1", timeout: float = 10) -> tuple[int, socket.socket]:
    """Send CONNECT target; returns (status, socket positioned after the response headers)."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout, source_address=(client, 0))
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, s


def read_to_close(s: socket.socket, ignore: tuple[type[BaseException], ...] = (ConnectionResetError,)) -> bytes:
    """Everything `s` receives until the peer closes it (or one of `ignore` ends the read: by default a reset)."""
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ignore:
        pass
    return got


@contextlib.contextmanager
def proxy_and_origins(root: Path, proxy: Callable[[int], dict] | None = None) -> Iterator[tuple[Proxy, int, int]]:
    """A TLS origin, a plain origin and a proxy over make_tree(root) (state in root/state, `p.root` = root):
    yields (proxy, TLS origin port, plain origin port); all stopped after. `proxy(tls_port)` gives proxy keys."""
    (root / "state").mkdir()
    tls_srv, tls_port = start_origin(root)
    srv, port = start_origin()
    try:
        p = Proxy(make_tree(root, proxy=proxy(tls_port) if proxy else None), root / "state").wait_ready()
        p.root = root
        try:
            yield p, tls_port, port
        finally:
            p.stop()
    finally:
        tls_srv.shutdown()
        srv.shutdown()
