"""The shared headless chromium driver (tests/support/browser.py) on its own: errors seen, clean pages clean, status
and Basic auth over a loopback HTTP server, a screenshot written."""
from __future__ import annotations

import base64
import http.server
import threading
from pathlib import Path

import pytest

from tests.support import browser

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _need_browser() -> None:
    browser.require()


def test_an_inline_script_error_is_reported(tmp_path: Path) -> None:
    page_file = tmp_path / "bad.html"
    page_file.write_text("<html><body><h1>Broken</h1><script>notDefinedAnywhere();</script></body></html>")
    page = browser.load(page_file.as_uri(), timeout=60)
    assert page.text.strip() == "Broken"
    assert len(page.errors) == 1 and "notDefinedAnywhere" in page.errors[0], page.errors
    assert page.status is None


def test_a_console_error_is_reported(tmp_path: Path) -> None:
    page_file = tmp_path / "console.html"
    page_file.write_text("<body><script>console.error('chart is blank')</script></body>")
    page = browser.load(page_file.as_uri(), timeout=60)
    assert any("chart is blank" in e for e in page.errors), page.errors


def test_a_clean_page_gives_no_errors_and_its_script_ran(tmp_path: Path) -> None:
    page_file = tmp_path / "good.html"
    page_file.write_text("<html><body><h1>Clean</h1><p id=x></p>"
                         "<script>document.getElementById('x').textContent = 'drawn ' + (6 * 7);</script></body></html>")
    shot = tmp_path / "shots" / "good.png"
    page = browser.load(page_file.as_uri(), screenshot=shot,
                        evaluate=["document.querySelectorAll('h1').length", "({a: [1, 'b']})"], timeout=60)
    assert page.errors == []
    assert "drawn 42" in page.text
    assert page.values == [1, {"a": [1, "b"]}]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_evaluate_fails_the_load(tmp_path: Path) -> None:
    page_file = tmp_path / "p.html"
    page_file.write_text("<body>x</body>")
    with pytest.raises(browser.BrowserError, match="nope"):
        browser.load(page_file.as_uri(), evaluate=["nope.nope"], timeout=60)


class _Guarded(http.server.BaseHTTPRequestHandler):
    """200 for user:secret (HTTP Basic), 401 with a challenge otherwise."""
    good = "Basic " + base64.b64encode(b"user:secret").decode()

    def do_GET(self) -> None:
        if self.path != "/favicon.ico" and self.headers.get("Authorization") == self.good:
            body, code = b"<html><body><p>welcome in</p></body></html>", 200
        else:
            body, code = b"<html><body><p>who are you</p></body></html>", 401
        self.send_response(code)
        if code == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def guarded_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Guarded)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=5)


def test_basic_auth_and_status_over_http(guarded_url: str) -> None:
    page = browser.load(guarded_url, basic_auth=("user", "secret"), timeout=60)
    assert (page.status, page.text.strip(), page.errors) == (200, "welcome in", [])


def test_a_wrong_password_shows_the_401(guarded_url: str) -> None:
    page = browser.load(guarded_url, basic_auth=("user", "wrong"), timeout=60)
    assert page.status == 401
    assert "who are you" in page.text


def test_no_credentials_shows_the_401(guarded_url: str) -> None:
    page = browser.load(guarded_url, timeout=60)
    assert page.status == 401
