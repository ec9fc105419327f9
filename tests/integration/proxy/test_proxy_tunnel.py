"""The `tls: sni` CONNECT fast path: SNI parser, CONNECT parsing, and a real proxy splicing to a real TLS origin."""
from __future__ import annotations

import random
import re
import socket
import ssl
import time

import pytest

from filters.proxy import sni
from filters.proxy.tunnel import parse_connect
from tests.support.env import free_port
from tests.support.proxy import (Proxy, client_hello, connect_tunnel, fetch, make_tree, proxy_and_origins, read_to_close,
                                 start_origin)
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)


def test_sni_parser_real_hello_and_every_prefix():
    hello = client_hello("WWW.Blocked.Test")
    assert sni.parse(hello) == "www.blocked.test"
    assert sni.parse(hello + b"trailing application bytes") == "www.blocked.test"
    for n in range(len(hello)):  # every truncation asks for more, never guesses or raises
        assert sni.parse(hello[:n]) is sni.NEED_MORE


def test_sni_parser_no_sni_not_tls_and_garbage():
    assert sni.parse(client_hello(None)) is None
    assert sni.parse(b"GET / HTTP/1.1\r\n\r\n") is sni.NOT_TLS
    assert sni.parse(b"\x16\x03\x01\xff\xff" + b"\x00" * 10) is sni.NOT_TLS  # record longer than TLS allows
    assert sni.parse(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") is sni.NOT_TLS  # a ServerHello, not a ClientHello
    hello = client_hello("a.example")
    # a ClientHello split over two records is reassembled
    body = hello[5:]
    two = b"\x16\x03\x01" + (40).to_bytes(2, "big") + body[:40] + b"\x16\x03\x01" + (len(body) - 40).to_bytes(2, "big") + body[40:]
    assert sni.parse(two) == "a.example"
    rnd = random.Random(5)
    for _ in range(3000):  # corrupted hellos: an answer, never an exception
        b = bytearray(hello)
        for _ in range(rnd.randint(1, 8)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        r = sni.parse(bytes(b))
        assert r in (sni.NEED_MORE, sni.NOT_TLS, sni.TOO_LARGE, None) or isinstance(r, str)


def test_parse_connect():
    assert parse_connect(b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\n\r\n") == \
        ("example.com", 443, "text/html")
    assert parse_connect(b"CONNECT [::1]:8443 HTTP/1.0\r\n\r\n") == ("::1", 8443, None)
    for bad in (b"CONNECT example.com HTTP/1.1\r\n\r\n", b"CONNECT example.com:99999 HTTP/1.1\r\n\r\n",
                b"CONNECT :443 HTTP/1.1\r\n\r\n", b"CONNECT a:1 HTTP/2\r\n\r\n", b"CONNECTa:1 HTTP/1.1\r\n\r\n"):
        with pytest.raises(ValueError):
            parse_connect(bad)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with proxy_and_origins(tmp_path_factory.mktemp("tun")) as e:
        yield e


def _log_line(p, pattern: str, timeout: float = 5) -> str:
    def matching() -> str | None:
        return next((line for line in (p.root / "access.log").read_text().splitlines() if re.search(pattern, line)), None)

    return wait_until(matching, timeout, f"an access log line matching {pattern!r}")


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_tunnel_logs_real_bytes_and_origin_ip(env):
    p, tls_port, _ = env
    path = f"/bytes-{random.randrange(10**9)}"
    status, s = connect_tunnel(p.port, f"127.0.0.1:{tls_port}")
    assert status == 200
    with _insecure().wrap_socket(s, server_hostname="localhost") as t:
        t.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        got = read_to_close(t, ignore=())
    assert path.encode() in got
    line = _log_line(p, rf" TCP_TUNNEL/200 \d+ CONNECT 127\.0\.0\.1:{tls_port} ")
    size = int(line.split()[4])
    assert size > len(got)  # the response plus the TLS handshake (certificate) the origin sent
    assert "HIER_DIRECT/127.0.0.1" in line


def test_connect_and_hello_in_pieces_blocked_sni_cut(env):
    p, tls_port, _ = env
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    for piece in (b"CONN", b"ECT 127.0.0.1:", f"{tls_port} HTTP/1.1\r\nHost: x\r\n".encode(), b"\r\n"):
        s.sendall(piece)
        time.sleep(0.05)  # pacing, not waiting: each piece leaves in its own segment
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    hello = client_hello("www.blocked.test")
    s.sendall(hello[:30])
    time.sleep(0.2)  # pacing: the proxy reads a partial ClientHello first
    s.sendall(hello[30:])
    try:
        assert s.recv(4096) == b""  # cut: no ServerHello from the origin
    except ConnectionResetError:
        pass
    s.close()
    _log_line(p, rf" TCP_DENIED/403 0 CONNECT www\.blocked\.test:{tls_port} ")


def test_connect_upstream_refused_is_502(env):
    p, _, _ = env
    status, s = connect_tunnel(p.port, f"127.0.0.1:{p.closed_port}")
    s.close()
    assert status == 502


def test_non_tls_tunnel_is_cut_and_http_still_goes_to_mitmproxy(env):
    """tls: sni fails closed: bytes that are not a TLS ClientHello cannot be filtered, so the tunnel is cut."""
    p, _, port = env
    status, s = connect_tunnel(p.port, f"127.0.0.1:{port}")
    assert status == 200
    s.sendall(b"GET /plain-in-tunnel HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    got = read_to_close(s)
    s.close()
    assert got == b""
    _log_line(p, rf" TCP_DENIED/403 0 CONNECT 127\.0\.0\.1:{port} ")
    assert fetch(p.port, "http://www.blocked.test/")[0] == 403


def test_connect_denied_client_and_blocked_host(env):
    p, tls_port, _ = env
    status, s = connect_tunnel(p.port, f"127.0.0.1:{tls_port}", client="127.0.0.9")
    s.close()
    assert status == 403
    status, s = connect_tunnel(p.port, "www.blocked.test:443")
    s.close()
    assert status == 403
    _log_line(p, r" 127\.0\.0\.9 TCP_DENIED/403 \d+ CONNECT 127\.0\.0\.1:")
    _log_line(p, r" TCP_DENIED/403 \d+ CONNECT www\.blocked\.test:443 ")


def test_connect_pipelined_with_client_hello(env):
    """A client that sends its ClientHello right behind the CONNECT head (no wait for the 200) is still filtered."""
    p, tls_port, _ = env
    for name, cut in (("www.blocked.test", True), ("localhost", False)):
        got = _pipelined_hello(p.port, tls_port, name, lambda got: len(got) >= 200)
        assert got.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n")
        after = got.split(b"\r\n\r\n", 1)[1]
        if cut:
            assert after == b""
        else:
            assert after[:1] == b"\x16"  # the origin's ServerHello came through the tunnel


def _pipelined_hello(port: int, tls_port: int, name: str, enough) -> bytes:
    """CONNECT with a ClientHello for `name` right behind the head; read until `enough(got)`, EOF or a reset."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"CONNECT 127.0.0.1:{tls_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + client_hello(name))
    got = b""
    try:
        while not enough(got):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    s.close()
    return got


def _sni_passes(port: int, tls_port: int, name: str) -> bool:
    got = _pipelined_hello(port, tls_port, name, lambda got: b"\r\n\r\n" in got and len(got.split(b"\r\n\r\n", 1)[1]) >= 1)
    return got.split(b"\r\n\r\n", 1)[-1][:1] == b"\x16"


def test_reload_applies_to_the_fast_path(tmp_path):
    import signal

    tls_srv, tls_port = start_origin(tmp_path)
    (tmp_path / "state").mkdir()
    cfg = make_tree(tmp_path)
    p = Proxy(cfg, tmp_path / "state").wait_ready()
    try:
        assert _sni_passes(p.port, tls_port, "newly.test")
        lst = cfg.parent / "lists" / "blocked" / "domains"
        lst.write_text(lst.read_text() + "newly.test\n")
        p.signal(signal.SIGHUP)
        wait_until(lambda: not _sni_passes(p.port, tls_port, "newly.test"), 15, "the reloaded list cutting newly.test")
        assert _sni_passes(p.port, tls_port, "localhost")
    finally:
        p.stop()
        tls_srv.shutdown()
