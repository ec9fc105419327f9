"""The plain HTTP fast path against the mitmproxy path: two real proxies (proxy.http_fast_path on and off) over one
config and one origin get the same raw requests (allowed, blocked, denied, refused, local pages, bodies both ways,
chunked, keep-alive and pipelined sequences, and the hardening cases), and must answer and log them alike."""
from __future__ import annotations

import http.server
import re
import socket
import time

import pytest

from tests.support.proxy import Proxy, make_tree, read_to_close, start_origin
from tests.support.wait import Timeout, wait_until

pytestmark = [pytest.mark.timeout(300)]
LIMITS = {"workers": 1, "max_header_size": 8192, "max_url_length": 2048, "header_timeout": 5}


class _Origin(http.server.BaseHTTPRequestHandler):
    """Bodies of every framing: /len (Content-Length), /chunked, /close (until close), /empty (204), /echo."""

    protocol_version = "HTTP/1.1"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if not size:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self) -> None:
        got = self._body()
        path = self.path
        if path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"first ", b"second " * 50, f"path {path}".encode()):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if path.startswith("/empty"):
            self.send_response(204)
            self.end_headers()
            return
        body = (b"echo %d bytes: " % len(got) + got) if path.startswith("/echo") else f"origin: {path}\n".encode() * 40
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if path.startswith("/close"):
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *a) -> None:
        pass


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    srv, port = start_origin()
    srv.RequestHandlerClass = _Origin
    proxies = []
    try:
        for fast in (True, False):
            root = tmp_path_factory.mktemp("fast" if fast else "mitm")
            (root / "state").mkdir()
            proxies.append(Proxy(make_tree(root, proxy={**LIMITS, "http_fast_path": fast}), root / "state"))
            proxies[-1].log_path = root / "access.log"
        for p in proxies:
            p.wait_ready()
        yield proxies[0], proxies[1], port
    finally:
        for p in proxies:
            p.stop()
        srv.shutdown()


def exchange(p: Proxy, data: list[bytes], source: str = "127.0.0.1") -> bytes:
    """Send each piece (a short pause between them), then read everything until the proxy closes."""
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10, source_address=(source, 0))
    try:
        for piece in data:
            s.sendall(piece)
            time.sleep(0.05)
        return read_to_close(s, (ConnectionResetError, socket.timeout))
    finally:
        s.close()


def responses(raw: bytes, methods: list[bytes]) -> list[tuple]:
    """(status, headers that matter, de-chunked body) of each response in a raw stream."""
    out, i = [], 0
    while i < len(raw) and methods:
        end = raw.find(b"\r\n\r\n", i)
        if end < 0:
            out.append(("partial", raw[i:]))
            break
        lines = raw[i:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs.setdefault(k.strip().lower(), v.strip())
        i = end + 4
        method = methods.pop(0) if status >= 200 else methods[0]
        if method == b"HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                j = raw.index(b"\r\n", i)
                size = int(raw[i:j].split(b";")[0], 16)
                i = j + 2
                if not size:
                    i = raw.index(b"\r\n\r\n", i - 2) + 4 if raw[i:i + 2] != b"\r\n" else i + 2
                    break
                body += raw[i:i + size]
                i += size + 2
        elif "content-length" in hdrs:
            body = raw[i:i + int(hdrs["content-length"])]
            i += len(body)
        else:
            body, i = raw[i:], len(raw)
        body = re.sub(rb"<dd>\d{4}-\d\d-\d\d [^<]*</dd>|time: [^\n]*", b"TIME", body)
        keep = {k: hdrs.get(k) for k in ("content-type", "cache-control", "content-disposition")}
        keep["close"] = "close" in hdrs.get("connection", "").lower()
        out.append((status, keep, body))
    return out


def log_lines(p: Proxy) -> list[str]:
    try:
        return p.log_path.read_text().splitlines()
    except FileNotFoundError:
        return []


def settle(p: Proxy, before: int) -> None:
    """Give the proxy up to 2 s to write the log line (some refusals, by mitmproxy itself, write none)."""
    try:
        wait_until(lambda: len(log_lines(p)) > before, 2, "a log line", step=0.05)
    except Timeout:
        pass
    time.sleep(0.1)


def norm(line: str, p: Proxy) -> str:
    """A log line without its time fields, the proxy's own port written PORT."""
    return " ".join(line.split()[2:]).replace(f":{p.port}", ":PORT")


def req(target: str, method: str = "GET", host: str | None = None, extra: str = "", body: bytes = b"",
        close: bool = True) -> bytes:
    host = host or target.split("/")[2]
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n{extra}"
    if body and "Transfer-Encoding" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def _post(u: str, lengths: bytes) -> bytes:
    """A POST of 'abc' to /echo with these Content-Length lines only."""
    host = u.split("/")[2].encode()
    return b"POST " + u.encode() + b"/echo HTTP/1.1\r\nHost: " + host + b"\r\n" + lengths + b"Connection: close\r\n\r\nabc"


def cases(o: int) -> dict:
    u = f"http://127.0.0.1:{o}"
    chunked_body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    return {
        "allowed": ([req(f"{u}/len")], [b"GET"]),
        "response chunked": ([req(f"{u}/chunked")], [b"GET"]),
        "response until close": ([req(f"{u}/close")], [b"GET"]),
        "response 204": ([req(f"{u}/empty")], [b"GET"]),
        "head": ([req(f"{u}/len", "HEAD")], [b"HEAD"]),
        "post content-length": ([req(f"{u}/echo", "POST", body=b"x" * 70000)], [b"POST"]),
        "post chunked": ([req(f"{u}/echo", "POST", extra="Transfer-Encoding: chunked\r\n", body=chunked_body)], [b"POST"]),
        "blocked": ([req("http://blocked.test/page")], [b"GET"]),
        "blocked url": ([req(f"{u}/private/x")], [b"GET"]),
        "blocked text accept": ([req("http://blocked.test/", extra="Accept: text/plain\r\n")], [b"GET"]),
        "refused loopback": ([req("http://127.0.0.1:9/")], [b"GET"]),
        "refused port": ([req("http://example.test:25/")], [b"GET"]),
        "host mismatch": ([req(f"{u}/len", host="other.test")], [b"GET"]),
        "bad host": ([req("http://a..b/")], [b"GET"]),
        "local healthz origin-form": ([b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nConnection: close\r\n\r\n"], [b"GET"]),
        "local pac": ([b"GET http://127.0.0.1:PORT/proxy.pac HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nConnection: close\r\n\r\n"], [b"GET"]),
        "local 404": ([b"GET http://127.0.0.1:PORT/nope HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nConnection: close\r\n\r\n"], [b"GET"]),
        "origin-form elsewhere": ([f"GET /len HTTP/1.1\r\nHost: 127.0.0.1:{o}\r\nConnection: close\r\n\r\n".encode()], [b"GET"]),
        "keep-alive sequence": ([req(f"{u}/len", close=False), req(f"{u}/chunked", close=False),
                                 req(f"{u}/echo", "POST", body=b"abc", close=False),
                                 b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n\r\n", req(f"{u}/len?last")],
                                [b"GET", b"GET", b"POST", b"GET", b"GET"]),
        "keep-alive then blocked": ([req(f"{u}/len", close=False), req("http://blocked.test/")], [b"GET", b"GET"]),
        "pipelined": ([req(f"{u}/len?a", close=False) + req(f"{u}/chunked?b")], [b"GET", b"GET"]),
        "http/1.0": ([f"GET {u}/len HTTP/1.0\r\nHost: 127.0.0.1:{o}\r\n\r\n".encode()], [b"GET"]),
        "expect 100-continue": ([req(f"{u}/echo", "POST", extra="Expect: 100-continue\r\n", body=b"hi")], [b"POST"]),
        "keep-alive then http/1.0": ([req(f"{u}/len", close=False), f"GET {u}/len HTTP/1.0\r\n\r\n".encode()],
                                     [b"GET", b"GET"]),
        # the hardening cases (docs/security.md): the gate's answer on both paths
        "obs-fold": ([f"GET {u}/len HTTP/1.1\r\nHost: 127.0.0.1:{o}\r\nX-A: a\r\n b\r\n\r\n".encode()], [b"GET"]),
        "nul": ([f"GET {u}/len HTTP/1.1\r\nHost: 127.0.0.1:{o}\r\nX-A: a\x00b\r\n\r\n".encode()], [b"GET"]),
        "bare cr": ([f"GET {u}/len HTTP/1.1\r\nHost: 127.0.0.1:{o}\r\nX-A: a\rb\r\n\r\n".encode()], [b"GET"]),
        "duplicate content-length": ([req(f"{u}/echo", "POST", extra="Content-Length: 3\r\nContent-Length: 4\r\n",
                                          body=b"abcd")], [b"POST"]),
        # exactly as an outside review sent them (one Content-Length header set, no other): mitmproxy refuses 400
        "repeated equal content-length": ([_post(u, b"Content-Length: 3\r\nContent-Length: 3\r\n")], [b"POST"]),
        "content-length list": ([_post(u, b"Content-Length: 3, 3\r\n")], [b"POST"]),
        "content-length leading zeros": ([_post(u, b"Content-Length: 0003\r\n")], [b"POST"]),
        "cl and te": ([req(f"{u}/echo", "POST", extra="Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                           body=b"0\r\n\r\n")], [b"POST"]),
        "te gzip chunked": ([req(f"{u}/echo", "POST", extra="Transfer-Encoding: gzip, chunked\r\n", body=b"0\r\n\r\n")],
                            [b"POST"]),
        "oversized head": ([req(f"{u}/len", extra="X-Big: " + "b" * 9000 + "\r\n")], [b"GET"]),
        "oversized url": ([req(f"{u}/" + "u" * 3000)], [b"GET"]),
        "bad chunk size": ([req(f"{u}/echo", "POST", extra="Transfer-Encoding: chunked\r\n", body=b"zz\r\nhello\r\n0\r\n\r\n")],
                           [b"POST"]),
        "chunk data too long": ([req(f"{u}/echo", "POST", extra="Transfer-Encoding: chunked\r\n",
                                     body=b"2\r\nhello\r\n0\r\n\r\n")], [b"POST"]),
        "upgrade": ([req(f"{u}/len", extra="Upgrade: websocket\r\nConnection: Upgrade\r\n", close=False)], [b"GET"]),
    }


NAMES = list(cases(1))


@pytest.mark.parametrize("name", NAMES)
def test_both_paths_answer_and_log_alike(pair, name):
    fast, mitm, o = pair
    data, methods = cases(o)[name]
    got_fast, got_mitm = None, None
    for p in (fast, mitm):
        pieces = [d.replace(b"PORT", str(p.port).encode()) for d in data]
        before = len(log_lines(p))
        raw = exchange(p, pieces)
        settle(p, before)
        res = (responses(raw.replace(str(p.port).encode(), b"PORT"), list(methods)),
               [norm(x, p) for x in log_lines(p)[before:]])
        if p is fast:
            got_fast = res
        else:
            got_mitm = res
    assert got_fast[0] == got_mitm[0], f"{name}: answers differ"
    assert got_fast[1] == got_mitm[1], f"{name}: log lines differ"


def test_denied_client_alike(pair):
    fast, mitm, o = pair
    got = []
    for p in (fast, mitm):
        before = len(log_lines(p))
        raw = exchange(p, [req(f"http://127.0.0.1:{o}/len")], source="127.0.0.5")
        wait_until(lambda: len(log_lines(p)) > before, 5, "a log line", step=0.05)
        got.append((responses(raw, [b"GET"]), [norm(x, p) for x in log_lines(p)[before:]]))
    assert got[0] == got[1]
    assert got[0][0][0][0] == 403 and "[denied:client]" in got[0][1][0]


def test_fast_path_reuses_one_upstream_connection(pair):
    """Keep-alive to the origin: sequential requests from new client connections share a pooled upstream socket."""
    fast, _, o = pair

    def origin_side() -> int:
        rows = [r.split() for r in open("/proc/net/tcp").read().splitlines()[1:]]
        return sum(1 for r in rows if r[1].endswith(f":{o:04X}") and r[3] == "01")

    before = origin_side()
    for i in range(6):
        s = socket.create_connection(("127.0.0.1", fast.port), timeout=10)
        s.sendall(req(f"http://127.0.0.1:{o}/len?reuse{i}", close=False))
        got = b""
        while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + int(
                re.search(rb"Content-Length: (\d+)", got).group(1)):
            got += s.recv(65536)
        s.close()
        assert got.startswith(b"HTTP/1.1 200 ")
    assert origin_side() - before <= 1  # one pooled connection, not one per request
