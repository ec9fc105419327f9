"""The HTTPS listeners: one threaded stdlib server per bound address; GET/HEAD of /, /status.json and /metrics only,
source addresses and connection slots checked before TLS, HTTP Basic where access.Gate asks for it."""
from __future__ import annotations

import io
import json
import logging
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from appliance.admin import gather, page
from appliance.admin.access import FAIL_WINDOW, Gate
from appliance.admin.limits import CONN_TIMEOUT, HEAD_DEADLINE, DeadlineReader, Slots, Throttle, clean

log = logging.getLogger("appliance.admin")
SECURITY_HEADERS = {
    # no script at all: the page is server-drawn; anything injected could not run
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ROUTES = {"/": "page", "/status.json": "json", "/metrics": "metrics"}
TEXT = "text/plain; charset=utf-8"


class Handler(BaseHTTPRequestHandler):
    server: "Listener"
    server_version = "carpguard-admin"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = CONN_TIMEOUT

    def __init__(self, request, client_address, server, deadline: float | None = None) -> None:
        self.deadline = deadline if deadline is not None else time.monotonic() + HEAD_DEADLINE
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        # the head must be in by the deadline, however slowly it trickles (a per-read timeout never ends)
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, lambda: self.deadline))

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.deadline = time.monotonic() + HEAD_DEADLINE  # each further request on the connection: its own
            self.handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True
            self._send(405, b"read-only: GET and HEAD only\n", TEXT, {"Allow": "GET, HEAD"})
            return False
        return True

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self._allowed():
            return
        route = ROUTES.get(self.path.split("?", 1)[0])
        if route is None:
            self._send(404, b"not found\n", TEXT)
            return
        try:
            body, ctype = self._body(route)
        except Exception:  # noqa: BLE001 - a broken source must not take the listener down; the log says what
            log.exception("admin: %s failed", clean(self.path.split("?", 1)[0]))
            self._send(500, b"status not available; see the admin server's log\n", TEXT)
            return
        self._send(200, body, ctype)

    def _allowed(self) -> bool:
        """The password where the gate asks for it; a 401 or 429 sent (and logged, rate-limited) when not."""
        ip, gate = self.client_address[0], self.server.gate
        if not gate.needs_password(ip, self.connection.getsockname()[0], self.path.split("?", 1)[0]):
            return True
        auth = self.headers.get("Authorization")
        verdict = gate.verdict(ip, auth)
        if verdict == "ok":
            return True
        if verdict == "locked":
            self.close_connection = True
            self.server.note("locked", ip, "too many failed logins: answered 429 without checking")
            self._send(429, b"too many failed logins; try again later\n", TEXT,
                       {"Retry-After": str(int(FAIL_WINDOW)), "Connection": "close"})
            return False
        if auth is not None:
            self.server.note("failed", ip, "failed login")
        self._send(401, b"password required\n", TEXT,
                   {"WWW-Authenticate": 'Basic realm="carpguard status", charset="UTF-8"'})
        return False

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
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's error answers (400, 414, 431, ...) with the same headers as every other answer, and a
        fixed text: nothing of the bad request is echoed."""
        self.log_error("code %d, message %s", code, message or "")
        self.close_connection = True
        short = self.responses.get(code, ("error",))[0]
        self._send(code, f"{code} {short}\n".encode(), TEXT, {"Connection": "close"})

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        # the request line and status only, escaped: never a header (Authorization holds the password)
        log.info("%s %s", clean(self.client_address[0]), clean(format % args))


class Listener(ThreadingHTTPServer):
    """One bound address. Sources outside the gate, and connections past the slots, are closed before the TLS
    handshake; TLS runs in the connection's own thread, so a slow handshake holds up nobody else."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext, gate: Gate, sources: gather.Sources,
                 slots: Slots | None = None, throttle: Throttle | None = None):
        self.tls, self.gate, self.sources = tls, gate, sources
        self.slots = slots if slots is not None else Slots()
        self.throttle = throttle if throttle is not None else Throttle()
        super().__init__(address, Handler)

    def note(self, kind: str, ip: str, what: str) -> None:
        """A warning about ip, at most one a minute per kind and address, with how many it stands for."""
        n = self.throttle.due(kind, ip)
        if n is not None:
            log.warning("admin: %s: %s (%d since the last such line)", clean(ip), what, n)

    def verify_request(self, request, client_address) -> bool:
        if self.gate.source_ok(client_address[0]):
            return True
        self.note("refused", client_address[0], "refused (not loopback, the sync subnet or admin.allow)")
        return False

    def process_request(self, request, client_address) -> None:
        # in the accepting thread: a connection past the slots gets no thread and no TLS, it is closed at once
        ip = client_address[0]
        if not self.slots.take(ip):
            self.note("busy", ip, "closed: too many connections at once")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.give(ip)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.give(client_address[0])

    def finish_request(self, request: socket.socket, client_address) -> None:
        deadline = time.monotonic() + HEAD_DEADLINE
        # CPython's handshake keeps one deadline for the whole call: a trickled ClientHello ends in time too
        request.settimeout(HEAD_DEADLINE)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log.info("admin: %s: TLS handshake failed: %s", clean(client_address[0]), clean(str(e)))
            return
        try:
            Handler(conn, client_address, self, deadline)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        # one line, not the stdlib's traceback on stderr: an aborted connection is routine
        e = sys.exc_info()[1]
        log.info("admin: %s: connection ended: %s", clean(str(client_address[0])), clean(f"{type(e).__name__}: {e}"))


class AdminServer:
    """Every listener of admin.listen, served in threads until stop(); the connection slots are shared."""

    def __init__(self, addresses: list[str], port: int, tls: ssl.SSLContext, gate: Gate, sources: gather.Sources):
        self.addresses, self.port, self.tls, self.gate, self.sources = addresses, port, tls, gate, sources
        self.slots, self.throttle = Slots(), Throttle()
        self.listeners: list[Listener] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> list[tuple[str, int]]:
        """Bind every address (OSError naming the address when one cannot be bound: nothing left listening)."""
        port = self.port
        try:
            for a in self.addresses:
                try:
                    lst = Listener((a, port), self.tls, self.gate, self.sources, self.slots, self.throttle)
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
