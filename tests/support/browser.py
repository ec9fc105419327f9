"""The shared headless browser: Debian's chromium driven over --remote-debugging-pipe (CDP), one page per load()."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

BROWSER = "chromium"
REQUIRE_ENV = "CARPGUARD_REQUIRE_BROWSER"
SCREENSHOT_ENV = "CARPGUARD_SCREENSHOT_DIR"
VIEWPORT = (1280, 900)
MAX_SHOT_HEIGHT = 6000
SETTLE_MS = 150  # after the load event: lets a page's setTimeout(0)/rAF work (charts drawn by script) finish
# flags that keep chromium from talking to anything but the URL (tests never leave loopback or their namespace)
QUIET = ["--no-first-run", "--no-default-browser-check", "--disable-background-networking", "--disable-sync",
         "--disable-component-update", "--disable-default-apps", "--disable-domain-reliability",
         "--disable-client-side-phishing-detection", "--disable-crash-reporter", "--disable-breakpad",
         "--no-pings", "--dns-prefetch-disable", "--no-proxy-server", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication,InterestFeedContentSuggestions",
         "--metrics-recording-only", "--mute-audio", "--hide-scrollbars"]


class BrowserError(AssertionError):
    """Chromium could not load the page (start failure, navigation error, timeout, a failed evaluate)."""


@dataclass
class Page:
    """What a person would see after the load, plus what went wrong in the page's JavaScript."""
    url: str
    status: int | None
    text: str
    errors: list[str] = field(default_factory=list)
    values: list = field(default_factory=list)


def available() -> bool:
    return shutil.which(BROWSER) is not None


def require() -> None:
    """Skip when chromium is absent, unless $CARPGUARD_REQUIRE_BROWSER is set (make test): then fail."""
    if available():
        return
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{BROWSER} is not installed and ${REQUIRE_ENV} is set (apt-get install chromium)")
    pytest.skip(f"needs {BROWSER} (apt-get install chromium)")


class _Pipe:
    """CDP over two pipes: JSON messages ended by NUL; a reader thread queues what chromium sends."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self._w = write_fd
        self._q: queue.Queue = queue.Queue()
        self._next = 0
        self.reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self.reader.start()

    def _read(self, fd: int) -> None:
        pending: list[bytes] = []
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._q.put(None)
                return
            while b"\0" in chunk:
                head, _, chunk = chunk.partition(b"\0")
                msg = b"".join(pending) + head
                pending = []
                if msg:
                    self._q.put(json.loads(msg))
            if chunk:
                pending.append(chunk)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next += 1
        msg: dict = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._w, data):]
        except OSError as e:
            raise BrowserError(f"{BROWSER} closed its end of the pipe ({e})") from None
        return self._next

    def receive(self, deadline: float, what: str) -> dict:
        left = deadline - time.monotonic()
        try:
            msg = self._q.get(timeout=max(left, 0.001))
        except queue.Empty:
            raise BrowserError(f"timed out waiting for {what}") from None
        if msg is None:
            raise BrowserError(f"{BROWSER} exited while waiting for {what}")
        return msg


class _Tab:
    """One page target: commands wait for their answer while the events in between are handled."""

    def __init__(self, pipe: _Pipe, deadline: float, basic_auth: tuple[str, str] | None) -> None:
        self.pipe, self.deadline, self.basic_auth = pipe, deadline, basic_auth
        self.session: str | None = None
        self.errors: list[str] = []
        self.loaded: set[str] = set()  # loaderIds whose load lifecycle event fired
        self.status: dict[str, int] = {}  # loaderId -> the main document's HTTP status
        self.answers: dict[int, dict] = {}
        self.auth_tries: dict[str, int] = {}

    def call(self, method: str, params: dict | None = None, browser_level: bool = False) -> dict:
        mid = self.pipe.send(method, params, None if browser_level else self.session)
        while mid not in self.answers:
            self.handle(self.pipe.receive(self.deadline, f"the answer to {method}"))
        answer = self.answers.pop(mid)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    def wait_load(self, loader: str, url: str) -> None:
        while loader not in self.loaded:
            self.handle(self.pipe.receive(self.deadline, f"the load event of {url}"))

    def handle(self, msg: dict) -> None:
        if "id" in msg:
            self.answers[msg["id"]] = msg
            return
        p = msg.get("params", {})
        method = msg.get("method")
        if method == "Runtime.exceptionThrown":
            self.errors.append(_exception_text(p["exceptionDetails"]))
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append(f"console.{p['type']}: " + " ".join(_arg_text(a) for a in p.get("args", [])))
        elif method == "Log.entryAdded":
            self._log_entry(p["entry"])
        elif method == "Page.lifecycleEvent" and p.get("name") == "load":
            self.loaded.add(p.get("loaderId", ""))
        elif method == "Network.responseReceived" and p.get("type") == "Document":
            self.status[p.get("loaderId", "")] = int(p["response"]["status"])
        elif method == "Fetch.requestPaused":
            self.pipe.send("Fetch.continueRequest", {"requestId": p["requestId"]}, self.session)
        elif method == "Fetch.authRequired":
            self._answer_auth(p)

    def _log_entry(self, entry: dict) -> None:
        # the browser asks for /favicon.ico on its own; a 404 there is not the page's fault
        if entry.get("level") == "error" and not entry.get("url", "").endswith("/favicon.ico"):
            where = f" ({entry['url']})" if entry.get("url") else ""
            self.errors.append(f"{entry.get('source', 'log')}: {entry.get('text', '')}{where}")

    def _answer_auth(self, p: dict) -> None:
        # credentials once per URL: a wrong password then shows the server's 401 instead of asking forever
        url = p.get("request", {}).get("url", "")
        self.auth_tries[url] = self.auth_tries.get(url, 0) + 1
        if self.basic_auth and self.auth_tries[url] == 1:
            reply = {"response": "ProvideCredentials", "username": self.basic_auth[0], "password": self.basic_auth[1]}
        else:
            reply = {"response": "CancelAuth"}
        self.pipe.send("Fetch.continueWithAuth", {"requestId": p["requestId"], "authChallengeResponse": reply},
                       self.session)


def _exception_text(d: dict) -> str:
    exc = d.get("exception") or {}
    text = exc.get("description") or d.get("text") or "exception"
    return f"{text.splitlines()[0]} ({d.get('url', '')}:{d.get('lineNumber', 0) + 1})"


def _arg_text(a: dict) -> str:
    for key in ("value", "unserializableValue", "description"):
        if key in a:
            return str(a[key])
    return a.get("type", "?")


def _command(user_data: Path, url: str, netns: str | None, ignore_cert: bool) -> list[str]:
    host = urlsplit(url).hostname or ""
    # every name but the URL's own host resolves to nothing: no lookups leave the test's network
    rules = "MAP * ~NOTFOUND" + (f", EXCLUDE {host}" if host else "")
    cmd = [shutil.which(BROWSER) or BROWSER, "--headless=new", "--remote-debugging-pipe",
           f"--user-data-dir={user_data}", f"--host-resolver-rules={rules}",
           f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", *QUIET]
    if os.geteuid() == 0:
        cmd.append("--no-sandbox")  # chromium refuses to run as root with its sandbox
    if ignore_cert:
        cmd.append("--ignore-certificate-errors")
    cmd.append("about:blank")
    return (["ip", "netns", "exec", netns] if netns else []) + cmd


def _spawn(cmd: list[str], log: Path) -> tuple[subprocess.Popen, int, int]:
    """chromium with our pipes as its fds 3 (commands in) and 4 (answers out); its own process group."""
    cmd_r, cmd_w = os.pipe()
    out_r, out_w = os.pipe()
    # above 9 so `3<&N 4>&M` never overwrites one with the other (bash: dash takes single-digit fds only)
    hi_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
    hi_w = fcntl.fcntl(out_w, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(cmd_r)
    os.close(out_w)
    shell = f'exec 3<&{hi_r} 4>&{hi_w} {hi_r}<&- {hi_w}>&- "$@"'
    try:
        with open(log, "wb") as logf:
            proc = subprocess.Popen(["bash", "-c", shell, "bash", *cmd], stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=logf, pass_fds=(hi_r, hi_w), start_new_session=True)
    except BaseException:
        for fd in (hi_r, hi_w, cmd_w, out_r):
            os.close(fd)
        raise
    os.close(hi_r)
    os.close(hi_w)
    return proc, cmd_w, out_r


def _stop(proc: subprocess.Popen, pipe: _Pipe | None, fds: tuple[int, int]) -> None:
    """Browser.close, then the process group (pgid = chromium's PID, start_new_session) killed; fds closed."""
    if pipe is not None and proc.poll() is None:
        try:
            pipe.send("Browser.close")
            proc.wait(timeout=5)
        except (BrowserError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its renderer/GPU/zygote children share the group
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if pipe is not None:
        pipe.reader.join(timeout=5)  # it ends at EOF, once chromium is gone; only then is its fd closed
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _open_tab(tab: _Tab) -> None:
    target = tab.call("Target.createTarget", {"url": "about:blank"}, browser_level=True)["targetId"]
    tab.session = tab.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                           browser_level=True)["sessionId"]
    for domain in ("Page", "Runtime", "Network", "Log"):
        tab.call(f"{domain}.enable")
    tab.call("Page.setLifecycleEventsEnabled", {"enabled": True})
    tab.call("Emulation.setDeviceMetricsOverride",
             {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
    # always: without a handler headless chromium turns a 401 into net::ERR_INVALID_AUTH_CREDENTIALS instead of
    # showing the server's 401 page (which a test may want to look at)
    tab.call("Fetch.enable", {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]})


def _evaluate(tab: _Tab, expression: str) -> object:
    r = tab.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
    if "exceptionDetails" in r:
        raise BrowserError(f"evaluate {expression!r}: {_exception_text(r['exceptionDetails'])}")
    return r.get("result", {}).get("value")


def _screenshot(tab: _Tab, path: Path) -> None:
    size = tab.call("Page.getLayoutMetrics").get("cssContentSize") or {}
    width = max(int(size.get("width", VIEWPORT[0])), 1)
    height = min(max(int(size.get("height", VIEWPORT[1])), 1), MAX_SHOT_HEIGHT)
    shot = tab.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                               "clip": {"x": 0, "y": 0, "width": width, "height": height,
                                                        "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    if os.environ.get(SCREENSHOT_ENV):
        dst = Path(os.environ[SCREENSHOT_ENV])
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / path.name)


def _visit(tab: _Tab, url: str, screenshot: Path | None, evaluate: list[str]) -> Page:
    nav = tab.call("Page.navigate", {"url": url})
    if nav.get("errorText"):
        raise BrowserError(f"navigating to {url}: {nav['errorText']}")
    loader = nav.get("loaderId", "")
    tab.wait_load(loader, url)
    _evaluate(tab, f"new Promise(r => setTimeout(r, {SETTLE_MS}))")
    text = _evaluate(tab, "document.body ? document.body.innerText : ''") or ""
    values = [_evaluate(tab, e) for e in evaluate]
    if screenshot is not None:
        _screenshot(tab, Path(screenshot))
    status = None if urlsplit(url).scheme == "file" else tab.status.get(loader)
    return Page(url=url, status=status, text=text, errors=list(tab.errors), values=values)


def load(url: str, screenshot: Path | None = None, netns: str | None = None, ignore_cert: bool = False,
         basic_auth: tuple[str, str] | None = None, evaluate: list[str] | tuple[str, ...] = (),
         timeout: float = 60) -> Page:
    """Open url in a fresh headless chromium, wait for its load event, collect text, errors and values; the whole
    call (start, load, evaluate, screenshot) is bounded by timeout seconds; chromium is always killed after."""
    if not available():
        raise BrowserError(f"{BROWSER} is not installed")
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="carpguard-browser-") as tmp:
        log = Path(tmp) / "chromium.log"
        proc, cmd_w, out_r = _spawn(_command(Path(tmp) / "profile", url, netns, ignore_cert), log)
        pipe = None
        try:
            pipe = _Pipe(cmd_w, out_r)
            tab = _Tab(pipe, deadline, basic_auth)
            _open_tab(tab)
            return _visit(tab, url, screenshot, list(evaluate))
        except BrowserError as e:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BrowserError(f"{e}\n--- {BROWSER} output (tail) ---\n{tail}") from None
        finally:
            _stop(proc, pipe, (cmd_w, out_r))
