"""The small programs the lab runs inside its namespaces (`python -m appliance.lab origin|get|probe`): the origin
web server, one client GET through a proxy, and the client probe loop printing one JSON line per request."""
from __future__ import annotations

import http.server
import json
import signal
import socket
import sys
import threading
import time

import click


def argv(command: str, *args: str) -> list[str]:
    """The command line of one helper program, for `ip netns exec`."""
    return [sys.executable, "-m", "appliance.lab", command, *args]


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802
        body = f"served-by {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve_origin(host: str, port: int) -> None:
    """The lab's web server: answers every GET with the address that connected (which node's proxy)."""
    srv = http.server.ThreadingHTTPServer((host, port), _Origin)
    srv.daemon_threads = True
    srv.serve_forever()


def _get(proxy: tuple[str, int], url: str, timeout: float, limit: int) -> bytes:
    """GET url through the proxy (Connection: close); the answer's first `limit`-odd bytes."""
    with socket.create_connection(proxy, timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while len(data) <= limit:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


def probe_once(proxy: tuple[str, int], url: str, timeout: float) -> tuple[bool, str]:
    """One request: (True, the address the origin saw) or (False, what went wrong)."""
    try:
        data = _get(proxy, url, timeout, 65536)
    except OSError as e:
        return False, type(e).__name__
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0] + b" ":
        return False, head.split(b"\r\n")[0].decode(errors="replace")[:60] or "empty"
    text = body.decode(errors="replace").strip()
    return (True, text.split()[-1]) if text.startswith("served-by") else (False, "unexpected body")


def get_status(proxy: tuple[str, int], url: str, timeout: float) -> str:
    """One GET through the proxy; the HTTP status code, or the error's name when nothing came back."""
    try:
        with socket.create_connection(proxy, timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(4096)
    except OSError as e:
        return type(e).__name__
    parts = data.split(b"\r\n", 1)[0].split()
    return parts[1].decode() if len(parts) > 1 and parts[0].startswith(b"HTTP/1.") else "no-http-answer"


def run_probe(proxy_host: str, port: int, url: str, interval: float, timeout: float, duration: float,
              inflight: int = 0) -> None:
    """Client loop (inside the client namespace): one request every `interval`, each on its own thread;
    one JSON line per request: start/end on CLOCK_MONOTONIC (shared by all processes), ok, which node's address.
    With `inflight` > 0 a tick is skipped while that many requests are open: a slow proxy is sampled, not buried
    (requests it cannot answer in time still fail and open an outage)."""
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(inflight) if inflight > 0 else None
    end = time.monotonic() + duration
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def one() -> None:
        t0 = time.monotonic()
        ok, what = probe_once((proxy_host, port), url, timeout)
        if slots is not None:
            slots.release()
        line = json.dumps({"t0": round(t0, 4), "t1": round(time.monotonic(), 4), "ok": ok, "by": what})
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    nxt = time.monotonic()
    while not stop.is_set() and time.monotonic() < end:
        if slots is None or slots.acquire(blocking=False):
            threading.Thread(target=one, daemon=True).start()
        nxt += interval
        stop.wait(max(0.0, nxt - time.monotonic()))
    time.sleep(timeout + 0.1)  # the last requests' answers (each bounded by timeout)


@click.group()
def cli() -> None:
    """Helper programs the lab runs inside its namespaces."""


@cli.command("origin")
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
def origin_cmd(host: str, port: int) -> None:
    """Serve HTTP on HOST:PORT, answering every GET with the address that connected."""
    serve_origin(host, port)


@cli.command("get")
@click.argument("proxy_host")
@click.argument("port", type=click.IntRange(1, 65535))
@click.argument("url")
@click.argument("timeout", type=float)
def get_cmd(proxy_host: str, port: int, url: str, timeout: float) -> None:
    """One GET of URL through PROXY_HOST:PORT; prints the status code (or the error's name)."""
    click.echo(get_status((proxy_host, port), url, timeout))


@cli.command("probe")
@click.argument("proxy_host")
@click.argument("port", type=click.IntRange(1, 65535))
@click.argument("url")
@click.argument("interval", type=float)
@click.argument("timeout", type=float)
@click.argument("duration", type=float)
@click.option("--inflight", type=click.IntRange(0, 1000), default=0, help="skip a tick while this many are open (0: never)")
def probe_cmd(proxy_host: str, port: int, url: str, interval: float, timeout: float, duration: float,
              inflight: int) -> None:
    """A GET of URL through PROXY_HOST:PORT every INTERVAL seconds for DURATION; one JSON line per request."""
    run_probe(proxy_host, port, url, interval, timeout, duration, inflight)
