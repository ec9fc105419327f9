"""The rendered PAC in a real browser's PAC engine (headless chromium, --proxy-pac-url): it parses, the first PROXY
is used, a refused one falls back to the next, local names go DIRECT. Everything stays on loopback: the two "VIPs"
are 127.0.0.2 and 127.0.0.3, and no name is resolved (--host-resolver-rules)."""
from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from filters.proxy import pac

pytestmark = pytest.mark.slow

A, B = "127.0.0.2", "127.0.0.3"


def _chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None and not os.environ.get("CARPGUARD_REQUIRE_BROWSER"):
        pytest.skip("needs chromium (make test installs it)")
    assert exe, "chromium is required ($CARPGUARD_REQUIRE_BROWSER) but not on PATH"
    return exe


class Recorder(http.server.ThreadingHTTPServer):
    """A stand-in proxy on one loopback "VIP": serves the test's PAC and answers every proxied GET with its name."""

    daemon_threads = True

    def __init__(self, host: str, port: int, seen: list, pac_body: list):
        super().__init__((host, port), _Handler)
        self.name, self.seen, self.pac_body = host, seen, pac_body
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        srv: Recorder = self.server
        if self.path == "/proxy.pac":
            body, ctype = srv.pac_body[0], pac.CONTENT_TYPE
        else:
            # the pages the test asks for; chromium's own background fetches and favicons aside
            if (".test/" in self.path or "intranet" in self.path) and not self.path.endswith("/favicon.ico"):
                srv.seen.append((srv.name, self.path))
            body, ctype = f"<html><body>via {srv.name}</body></html>".encode(), "text/html"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recorders():
    seen: list = []
    body: list = [b""]
    a = Recorder(A, 0, seen, body)
    try:
        b = Recorder(B, a.server_address[1], seen, body)
    except OSError:
        a.stop()
        pytest.skip(f"port {a.server_address[1]} is taken on {B}")
    yield {A: a, B: b}, seen, body
    for r in (a, b):
        if r.thread.is_alive():
            r.stop()


def browse(exe: str, tmp: Path, pac_url: str, url: str) -> str:
    """chromium's DOM for url, with its proxies from pac_url; never resolves a name, never leaves loopback."""
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-features=NetworkTimeServiceQuerying",
                        f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {A}, EXCLUDE {B}",
                        f"--user-data-dir={tmp / 'profile'}",
                        f"--proxy-pac-url={pac_url}", "--dump-dom", url],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_chromium_uses_the_primary_then_the_fallback(recorders, tmp_path: Path) -> None:
    exe = _chromium()
    servers, seen, body = recorders
    port = servers[A].server_address[1]
    pac_url = f"http://{B}:{port}/proxy.pac"
    for first, second in ((A, B), (B, A)):
        body[0] = pac.render([first, second], port)
        seen.clear()
        assert f"via {first}" in browse(exe, tmp_path, pac_url, "http://www.example.test/p1")
        assert seen == [(first, "http://www.example.test/p1")]
    # the primary is down (connection refused): the browser goes on to the next PROXY of the same answer
    servers[A].stop()
    body[0] = pac.render([A, B], port)
    seen.clear()
    assert f"via {B}" in browse(exe, tmp_path, pac_url, "http://www.example.test/p2")
    assert seen == [(B, "http://www.example.test/p2")]


def test_chromium_sends_plain_host_names_direct(recorders, tmp_path: Path) -> None:
    exe = _chromium()
    servers, seen, body = recorders
    port = servers[A].server_address[1]
    body[0] = pac.Pacs([A, B], port, []).for_client("192.168.1.10")
    dom = browse(exe, tmp_path, f"http://{B}:{port}/proxy.pac", "http://intranet/x")
    assert "via " not in dom and seen == []  # DIRECT (and the name does not resolve here): no proxy saw it
