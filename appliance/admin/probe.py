"""The server's two HTTP clients, both bounded in size and total time and never following a redirect: a peer's
/status.json over the sync link and the proxy's /metrics on its loopback port."""
from __future__ import annotations

import json
import socket
import ssl
import time

PEER_BYTES = 256 * 1024      # a peer's whole answer; /status.json is a few KiB
PEER_SECONDS = 3.0           # connect + TLS + answer, all together
METRICS_BYTES = 1024 * 1024  # the proxy's /metrics is a few KiB per worker
METRICS_SECONDS = 2.0


class TooBig(ValueError):
    """An answer past its size bound (nothing of it is used)."""


def _read_all(sock: socket.socket, deadline: float, limit: int) -> bytes:
    """Everything until EOF, within deadline and limit (TimeoutError, TooBig)."""
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete answer in time")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise TooBig(f"answer larger than {limit} bytes")


def fetch_peer(address: str, port: int, source: str | None, timeout: float = PEER_SECONDS) -> dict:
    """A peer's /status.json over the sync link (from our sync address); its certificate is not checked: the link
    is the cabled point-to-point one, and nothing secret is asked or sent."""
    deadline = time.monotonic() + timeout
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    src = (source, 0) if source else None
    with socket.create_connection((address, port), timeout=timeout, source_address=src) as raw:
        # the handshake's own deadline: whatever is left of the total
        raw.settimeout(max(deadline - time.monotonic(), 0.001))
        with ctx.wrap_socket(raw) as s:
            s.sendall(f"GET /status.json HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            data = _read_all(s, deadline, PEER_BYTES)
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b"?"
    if status != b"200":
        raise OSError(f"answered {status[:20].decode(errors='replace')}")
    answer = json.loads(body)
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a JSON object")
    return answer


def proxy_metrics(port: int, timeout: float = METRICS_SECONDS, limit: int = METRICS_BYTES) -> str | None:
    """The proxy's /metrics from 127.0.0.1:port, or None when nothing there answers 200 with a small enough body
    in time. Whatever listens on that port is what the page shows (docs/status-page.md)."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = _read_all(s, deadline, limit)
    except (OSError, TooBig):  # TimeoutError is an OSError
        return None
    head, sep, body = data.partition(b"\r\n\r\n")
    # a redirect is just not 200: nothing is followed
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or parts[1] != b"200":
        return None
    return body.decode("utf-8", "replace")
