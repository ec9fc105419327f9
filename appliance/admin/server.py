"""The HTTPS listeners: one threaded stdlib server per bound address; GET/HEAD of /, /status.json and /metrics only,
source addresses checked before TLS, HTTP Basic where access.Gate asks for it."""
from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from appliance.admin import gather, page
from appliance.admin.access import Gate

log = logging.getLogger("appliance.admin")
CONN_TIMEOUT = 10.0
SECURITY_HEADERS = {
    # no script at all: the page is server-drawn; anything injected could not run
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ROUTES = {"/": "page", "/status.json": "json", "/metrics": "metrics"}


class Handler(BaseHTTPRequestHandler):
    server: "Listener"
    server_version = "carpguard-admin"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = CONN_TIMEOUT

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True
            self._send(405, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8", {"Allow": "GET, HEAD"})
            return False
        return True

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        ip = self.client_address[0]
        gate = self.server.gate
        if gate.needs_password(ip):
            wait = gate.delay(ip)
            if wait:
                time.sleep(wait)
            if not gate.check(ip, self.headers.get("Authorization")):
                self._send(401, b"password required\n", "text/plain; charset=utf-8",
                           {"WWW-Authenticate": 'Basic realm="carpguard status", charset="UTF-8"'})
                return
        route = ROUTES.get(self.path.split("?", 1)[0])
        if route is None:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")
            return
        try:
            body, ctype = self._body(route)
        except Exception:  # noqa: BLE001 - a broken source must not take the listener down; the log says what
            log.exception("admin: %s failed", self.path.split("?", 1)[0])
            self._send(500, b"status not available; see the admin server's log\n", "text/plain; charset=utf-8")
            return
        self._send(200, body, ctype)

    def _body(self, route: str) -> tuple[bytes, str]:
        src = self.server.sources
        if route == "metrics":
            return src.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8"
        snap = gather.snapshot(src)
        if route == "json":
            return (json.dumps(snap, default=str, indent=1) + "\n").encode(), "application/json"
        return page.render(snap).encode(), "text/html; charset=utf-8"

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in {**SECURITY_HEADERS, "Content-Type": ctype, "Content-Length": str(len(body)),
                     **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        # the request line and status only: never a header (Authorization holds the password)
        log.info("%s %s", self.client_address[0], format % args)


class Listener(ThreadingHTTPServer):
    """One bound address. Sources outside the gate are closed before the TLS handshake; TLS runs in the
    connection's own thread, so a slow handshake holds up nobody else."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext, gate: Gate, sources: gather.Sources):
        self.tls, self.gate, self.sources = tls, gate, sources
        super().__init__(address, Handler)

    def verify_request(self, request, client_address) -> bool:
        if self.gate.source_ok(client_address[0]):
            return True
        log.warning("admin: refused %s (not loopback, the sync subnet or admin.allow)", client_address[0])
        return False

    def finish_request(self, request: socket.socket, client_address) -> None:
        request.settimeout(CONN_TIMEOUT)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log.info("admin: %s: TLS handshake failed: %s", client_address[0], e)
            return
        try:
            Handler(conn, client_address, self)
        finally:
            try:
                conn.close()
            except OSError:
                pass


class AdminServer:
    """Every listener of admin.listen, served in threads until stop()."""

    def __init__(self, addresses: list[str], port: int, tls: ssl.SSLContext, gate: Gate, sources: gather.Sources):
        self.addresses, self.port, self.tls, self.gate, self.sources = addresses, port, tls, gate, sources
        self.listeners: list[Listener] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> list[tuple[str, int]]:
        """Bind every address (OSError naming the address when one cannot be bound: nothing left listening)."""
        port = self.port
        try:
            for a in self.addresses:
                try:
                    lst = Listener((a, port), self.tls, self.gate, self.sources)
                except OSError as e:
                    raise OSError(f"cannot listen on {a}:{port}: {e.strerror or e}") from None
                port = lst.server_address[1]  # port 0 (tests): every address on the first one's port
                self.listeners.append(lst)
        except OSError:
            self.stop()
            raise
        for lst in self.listeners:
            t = threading.Thread(target=lst.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True)
            t.start()
            self.threads.append(t)
        self.sources.peers.start()
        return [lst.server_address[:2] for lst in self.listeners]

    def stop(self) -> None:
        self.sources.peers.stop.set()
        for lst in self.listeners:
            if self.threads:  # serve_forever runs (start() starts all or none): shutdown() waits for it
                lst.shutdown()
            lst.server_close()
        for t in self.threads:
            t.join(timeout=5)
        self.listeners, self.threads = [], []
