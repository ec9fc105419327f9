"""Abuse suite for the proxy's timeouts and limits (issue 11), against the real proxy on loopback with short timeouts:
a slow or oversized ClientHello is cut, oversized heads get 431/414, ambiguous requests 400, a half request is closed
at the header timeout, an idle keep-alive or tunnel is closed, one client's connections are capped (503, counted)
while another client is served, pipelined requests are answered, and the worker serves on after every case."""
from __future__ import annotations

import re
import socket
import ssl
import time
import urllib.request

import pytest
import yaml

from tests.support.proxy import client_hello, connect_tunnel, fetch, proxy_and_origins, read_to_close
from tests.support.wait import wait_until

pytestmark = [pytest.mark.timeout(180), pytest.mark.timing]
LIMITS = {"workers": 1, "header_timeout": 1.5, "idle_timeout": 2, "tunnel_idle_timeout": 2, "hello_timeout": 1,
          "max_header_size": 8192, "max_url_length": 2048, "max_client_connections": 20}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    def proxy(tls_port: int) -> dict:
        return {**LIMITS, "connect_ports": [443, tls_port]}

    with proxy_and_origins(tmp_path_factory.mktemp("abuse"), proxy) as e:
        p = e[0]
        p.metrics_port = yaml.safe_load(p.cfg_path.read_text())["proxy"]["metrics_port"]
        yield e


def refused(p, reason: str) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(rf'appliance_proxy_refused_total{{reason="{re.escape(reason)}"}} (\d+)', text)
    return int(m.group(1)) if m else 0


def wait_refused(p, reason: str, at_least: int = 1) -> None:
    wait_until(lambda: refused(p, reason) >= at_least, 5, f"appliance_proxy_refused_total{{reason={reason}}} >= {at_least}")


def raw(p, data: bytes, source: str = "127.0.0.1", timeout: float = 5) -> bytes:
    """Send raw bytes, read until the proxy closes (or a reset); what came back."""
    s = socket.create_connection(("127.0.0.1", p.port), timeout=timeout, source_address=(source, 0))
    s.sendall(data)
    got = read_to_close(s, (ConnectionResetError, socket.timeout))
    s.close()
    return got


def serves(p, port: int, source: str = "127.0.0.1") -> None:
    status, body, _ = fetch(p.port, f"http://127.0.0.1:{port}/still-serving", client=source)
    assert status == 200 and b"/still-serving" in body


def closed_within(s: socket.socket, seconds: float) -> tuple[bytes, float]:
    t0 = time.monotonic()
    s.settimeout(seconds)
    got = read_to_close(s)
    return got, time.monotonic() - t0


def test_slow_client_hello_is_cut_at_the_timeout(env):
    p, tls_port, port = env
    status, s = connect_tunnel(p.port, f"127.0.0.1:{tls_port}")
    assert status == 200
    hello = client_hello("localhost")
    s.sendall(hello[:5])
    time.sleep(LIMITS["hello_timeout"] + 0.5)  # pacing: the rest arrives after the hello timeout
    try:
        s.sendall(hello[5:])
    except OSError:
        pass
    got, _ = closed_within(s, 5)
    s.close()
    assert got == b""  # no ServerHello: the tunnel was cut, never passed
    wait_refused(p, "hello-timeout")
    serves(p, port)


def test_oversized_client_hello_is_cut(env):
    p, tls_port, port = env
    status, s = connect_tunnel(p.port, f"127.0.0.1:{tls_port}")
    assert status == 200
    body = b"\x01" + (70000).to_bytes(3, "big") + b"\x03\x03" + b"\x00" * 2000  # says 70,000 bytes: over 64 KiB
    s.sendall(b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body)
    got, took = closed_within(s, 5)
    s.close()
    assert got == b"" and took < LIMITS["hello_timeout"]  # cut at once, not waited for
    wait_refused(p, "hello-too-large")
    # 64 KiB of records that never complete a hello: cut too
    status, s = connect_tunnel(p.port, f"127.0.0.1:{tls_port}")
    rec = b"\x01" + (65000).to_bytes(3, "big") + b"\x00" * 16000
    try:
        s.sendall(b"\x16\x03\x01" + len(rec).to_bytes(2, "big") + rec + (b"\x16\x03\x01\x3e\x80" + b"\x00" * 16000) * 4)
    except OSError:
        pass
    got, _ = closed_within(s, 5)
    s.close()
    assert got == b""
    serves(p, port)


def test_non_tls_in_a_tunnel_is_cut(env):
    p, tls_port, port = env
    status, s = connect_tunnel(p.port, f"127.0.0.1:{tls_port}")
    s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    got, _ = closed_within(s, 5)
    s.close()
    assert got == b""
    wait_refused(p, "not-tls")


def test_oversized_header_431_and_long_url_414(env):
    p, _, port = env
    got = raw(p, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Big: {'a' * 9000}\r\n\r\n".encode())
    assert got.startswith(b"HTTP/1.1 431 ")
    got = raw(p, f"GET http://127.0.0.1:{port}/{'u' * 3000} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert got.startswith(b"HTTP/1.1 414 ")
    # a CONNECT head over the limit: the fast path answers the same
    got = raw(p, b"CONNECT a.example:443 HTTP/1.1\r\n" + b"X: " + b"a" * 9000 + b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 431 ")
    wait_refused(p, "header-too-large", 2)
    wait_refused(p, "url-too-long")
    line = wait_until(lambda: next((x for x in (p.root / "access.log").read_text().splitlines()
                                    if " TCP_DENIED/414 " in x), None), 5, "a TCP_DENIED/414 log line")
    assert len(line) < 1200  # the URL is cut short in the log
    serves(p, port)


@pytest.mark.parametrize("name,head", [
    ("cl+te", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two content-lengths", b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
    ("content-length list", b"Content-Length: 5, 6\r\n\r\nhello!"),
    ("bad chunk size", b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ("chunk size overflow", b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n"),
    ("te not chunked", b"Transfer-Encoding: gzip\r\n\r\n"),
    ("obs-fold", b"X-A: 1\r\n folded\r\n\r\n"),
    ("bare LF", b"X-A: 1\n\r\n"),
    ("bare CR", b"X-A: 1\rX-B: 2\r\n\r\n"),
    ("NUL", b"X-A: a\x00b\r\n\r\n"),
    ("space before colon", b"Content-Length : 5\r\n\r\nhello"),
])
def test_ambiguous_requests_get_400_and_the_worker_serves_on(env, name, head):
    p, _, port = env
    got = raw(p, f"POST http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode() + head)
    assert got.startswith(b"HTTP/1.1 400 "), (name, got[:200])
    serves(p, port)


def test_header_timeout_closes_a_half_request(env):
    p, _, port = env
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
    got, took = closed_within(s, 10)
    s.close()
    assert got.startswith(b"HTTP/1.1 408 ") and LIMITS["header_timeout"] - 0.2 < took < LIMITS["header_timeout"] + 3
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)  # nothing at all: closed too
    got, took = closed_within(s, 10)
    s.close()
    assert took < LIMITS["header_timeout"] + 3
    wait_refused(p, "header-timeout")
    serves(p, port)


def test_pipelined_requests_then_idle_keepalive_closed(env):
    p, _, port = env
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(b"".join(f"GET http://127.0.0.1:{port}/pipe{i} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
                       for i in range(3)))
    got = b""
    end = time.monotonic() + 10
    while got.count(b"origin says") < 3 and time.monotonic() < end:
        got += s.recv(65536)
    assert [m.decode() for m in re.findall(rb"origin says hello: (/pipe\d)", got)] == ["/pipe0", "/pipe1", "/pipe2"]
    rest, took = closed_within(s, 10)  # then idle: closed after idle_timeout
    s.close()
    assert rest == b"" and took < LIMITS["idle_timeout"] + 2.5


def test_idle_tunnel_is_closed(env):
    p, tls_port, _ = env
    status, s = connect_tunnel(p.port, f"127.0.0.1:{tls_port}")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    t = ctx.wrap_socket(s, server_hostname="localhost")
    t0 = time.monotonic()
    t.settimeout(15)
    try:
        assert t.recv(100) == b""
    except (ssl.SSLError, ConnectionResetError, OSError):
        pass
    took = time.monotonic() - t0
    t.close()
    assert LIMITS["tunnel_idle_timeout"] - 0.2 < took < LIMITS["tunnel_idle_timeout"] + 3


def test_per_client_connection_cap_503_while_another_client_is_served(env):
    p, _, port = env
    before = refused(p, "client-connections")
    held = []
    try:
        for _ in range(LIMITS["max_client_connections"]):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            s.sendall(b"GET ")  # a slow client: within the header timeout
            held.append(s)
        time.sleep(0.2)  # pacing: the worker accepts them all
        extra = raw(p, b"GET / HTTP/1.1\r\n\r\n")
        assert extra.startswith(b"HTTP/1.1 503 "), extra[:100]
        serves(p, port, source="127.0.0.2")  # another address is served while the first is at its cap
    finally:
        for s in held:
            s.close()
    assert refused(p, "client-connections") > before or wait_refused(p, "client-connections", before + 1) is None
    line = wait_until(lambda: next((x for x in (p.root / "access.log").read_text().splitlines()
                                    if " TCP_DENIED/503 " in x), None), 5, "a TCP_DENIED/503 log line")
    assert " 127.0.0.1 " in line
    wait_until(lambda: _served(p, port), 5, "slots given back when the connections close")


def _served(p, port) -> bool:
    try:
        serves(p, port)
        return True
    except AssertionError:
        return False
