"""The outside review's attacks on the status page (issue 14), each failing now, on a real loopback server with fake
sources: the node's own sync address as source (F1), trickled and piled-up connections (F2), parallel guessing
(F3), a peer's hostile answer (F5), the metrics port's answer (F6), the log (F7), the stdlib's error pages (F8)."""
from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import threading
import time
from pathlib import Path

import bcrypt
import pytest

from appliance.admin import access, gather, limits, page, probe, server as srv, tls
from appliance.admin.server import AdminServer
from appliance.admin.traffic import Traffic
from appliance.core.paths import Paths

PASSWORD = "hunter2 hunter2"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10))  # the lowest cost the config takes (~0.1 s, once)
OWN, PEER = "127.0.0.2", "127.0.0.3"  # this node's "sync address" and its peer's, both on loopback
STATUS = {"node": "fw1", "role": "MASTER", "sync_generation": 7}


class NoPeers(gather.Peers):
    start = lambda self: None  # noqa: E731 - never asks anyone


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(srv, "HEAD_DEADLINE", 1.5)  # the tests' trickles end sooner; the rule is the same
    paths = Paths(tmp_path / "state")
    paths.state.mkdir()
    cert, key = tls.ensure_cert(paths, "fw1", ["127.0.0.1", OWN])
    gate = access.Gate(allow=[], sync_nets=[], peers={PEER}, own_sync=OWN, user="ops", password_hash=HASH,
                       clock=Clock())
    src = gather.Sources(paths=paths, status=lambda: STATUS, metrics=lambda: "appliance_proxy_workers 2\n",
                         traffic=Traffic(tmp_path / "access.log"), peers=NoPeers({}, 0, None))
    s = AdminServer(["127.0.0.1", OWN], 0, tls.server_context(cert, key), gate, src)
    s.slots = limits.Slots(total=6, per_source=3)
    port = s.start()[0][1]
    yield s, port
    s.stop()


def _ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def request(port: int, raw: bytes, to: str = "127.0.0.1", source: str | None = None) -> bytes:
    """Send raw bytes over TLS, read the answer until the server closes (bounded)."""
    with socket.create_connection((to, port), timeout=10, source_address=(source, 0) if source else None) as s:
        with _ctx().wrap_socket(s) as t:
            t.sendall(raw)
            out = b""
            for _ in range(1000):
                try:
                    chunk = t.recv(65536)
                except (ssl.SSLError, OSError):
                    break
                if not chunk:
                    break
                out += chunk
            return out


def get(port: int, path: str = "/", auth: str | None = None, **kw) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if auth:
        head += "Authorization: Basic " + base64.b64encode(auth.encode()).decode() + "\r\n"
    return request(port, (head + "\r\n").encode(), **kw)


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0  # 0: no HTTP answer


# F1 ---------------------------------------------------------------------------------------------------------------

def test_own_sync_address_as_source_needs_the_password(served) -> None:
    _, port = served
    for to in ("127.0.0.1", OWN):
        for path in ("/", "/status.json", "/metrics"):
            assert status(get(port, path, to=to, source=OWN)) == 401, (to, path)


def test_a_peer_reads_status_json_on_our_sync_listener_only(served) -> None:
    _, port = served
    assert status(get(port, "/status.json", to=OWN, source=PEER)) == 200
    assert status(get(port, "/status.json", to="127.0.0.1", source=PEER)) == 401
    assert status(get(port, "/", to=OWN, source=PEER)) == 401
    assert status(get(port, "/metrics", to=OWN, source=PEER)) == 401


# F2 ---------------------------------------------------------------------------------------------------------------

def _closed_within(sock: socket.socket, rounds: int, send: bytes | None = None) -> bool:
    """Whether the server closes sock within `rounds` steps of 0.3 s (sending `send` at each step)."""
    sock.settimeout(0.3)
    for _ in range(rounds):
        try:
            if send is not None:
                sock.send(send)
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            return True
    return False


def test_connections_past_the_slots_are_closed_at_once(served) -> None:
    s, port = served
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        for _ in range(20):  # bounded: until the server took the three slots
            if s.slots.in_use() == 3:
                break
            time.sleep(0.05)
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert _closed_within(extra, 3), "a 4th connection from one address was kept"
        extra.close()
        # another address still gets in while one address is at its cap
        assert status(get(port, "/status.json", to=OWN, source=PEER)) == 200
    finally:
        for h in held:
            h.close()


def test_threads_stay_bounded_under_a_pile_of_idle_connections(served) -> None:
    s, port = served
    before = threading.active_count()
    socks = []
    try:
        for i in range(40):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5,
                                                      source_address=(f"127.0.1.{i % 5 + 1}", 0)))
            except OSError:
                break
        time.sleep(0.5)
        assert threading.active_count() - before <= s.slots.total
        assert s.slots.in_use() <= s.slots.total
    finally:
        for x in socks:
            x.close()


def test_a_trickled_request_head_is_cut_at_the_deadline(served) -> None:
    _, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with _ctx().wrap_socket(raw) as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            # one header byte every 0.3 s: each read gets data, only a total deadline ends it (1.5 s here)
            assert _closed_within(t, 20, send=b"X"), "the trickled head was still read after 6 s"


def test_a_trickled_tls_handshake_is_cut_at_the_deadline(served) -> None:
    _, port = served
    hello = _client_hello()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.settimeout(0.3)
        closed = False
        for i in range(min(len(hello), 20)):
            try:
                raw.send(hello[i:i + 1])
                if raw.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        assert closed, "a ClientHello trickled over 6 s was still being read"


def _client_hello() -> bytes:
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _ctx().wrap_bio(inc, out)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


# F3 ---------------------------------------------------------------------------------------------------------------

def test_parallel_guesses_get_429_without_bcrypt_then_the_right_password_after_the_window(served, monkeypatch) -> None:
    s, port = served
    s.slots.total = s.slots.per_source = 16  # all 12 at once from one address (F2's cap is not what is tested)
    runs = []
    real = bcrypt.checkpw
    monkeypatch.setattr(access.bcrypt, "checkpw", lambda pw, h: runs.append(1) or real(pw, h))
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(status(get(port, auth="ops:guess"))))
               for _ in range(12)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert len(answers) == 12 and set(answers) <= {401, 429} and 429 in answers
    # the lock is checked again behind the semaphore: at most one check per slot past the budget
    assert len(runs) <= access.FREE_FAILURES + access.CHECKS_AT_ONCE - 1
    before = len(runs)
    assert status(get(port, auth=f"ops:{PASSWORD}")) == 429 and len(runs) == before  # no bcrypt while locked
    s.gate.clock.now += access.FAIL_WINDOW + 1
    assert status(get(port, auth=f"ops:{PASSWORD}")) == 200


def test_at_most_two_checks_at_a_time(monkeypatch) -> None:
    g = access.Gate(allow=[], sync_nets=[], peers=set(), user="ops", password_hash=HASH)
    lock, running, most = threading.Lock(), [0], [0]

    def slow_check(pw, h) -> bool:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1
        return False

    monkeypatch.setattr(access.bcrypt, "checkpw", slow_check)
    auth = "Basic " + base64.b64encode(b"ops:x").decode()
    threads = [threading.Thread(target=g.check, args=(f"10.0.0.{i}", auth)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert most[0] == access.CHECKS_AT_ONCE


def test_the_global_budget_locks_every_address(monkeypatch) -> None:
    g = access.Gate(allow=[], sync_nets=[], peers=set(), user="ops", password_hash=HASH, clock=Clock())
    monkeypatch.setattr(access.bcrypt, "checkpw", lambda pw, h: False)
    auth = "Basic " + base64.b64encode(b"ops:x").decode()
    for i in range(access.GLOBAL_FAILURES):
        g.check(f"10.1.{i // 200}.{i % 200}", auth)  # one failure each: no address over its own budget
    assert g.verdict("10.9.9.9", auth) == "locked"
    g.clock.now += access.FAIL_WINDOW + 1
    assert g.verdict("10.9.9.9", auth) == "denied"


# F5 ---------------------------------------------------------------------------------------------------------------

def test_a_peer_sending_deep_json_is_an_error_not_a_dead_thread(monkeypatch) -> None:
    deep = "[" * 200000 + "]" * 200000
    p = gather.Peers({"fw2": "192.0.2.2"}, 8443, None, fetch=lambda *a: json.loads(deep))
    answer = p.ask("fw2", "192.0.2.2")
    assert answer["error"].startswith("RecursionError")
    for bad in ({"role": "<b>", "sync": [1]}, {"role": 5, "sync": {"generation": "<b>99</b>"}}):
        a = gather.Peers({"fw2": "x"}, 1, None, fetch=lambda *a, b=bad: b).ask("fw2", "x")
        assert a.get("generation") is None and a.get("role") in ("<b>", None)


def test_the_peers_loop_outlives_a_failing_round(monkeypatch) -> None:
    monkeypatch.setattr(gather, "PEER_EVERY", 0.01)
    calls = []

    def ask(self, name, address):
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return {"sync": address, "role": "MASTER", "at": time.time()}

    monkeypatch.setattr(gather.Peers, "ask", ask)
    p = gather.Peers({"fw2": "192.0.2.2"}, 8443, None)
    p.start()
    try:
        for _ in range(200):  # bounded: 2 s at most
            if p.answers.get("fw2", {}).get("role") == "MASTER":
                break
            time.sleep(0.01)
    finally:
        p.stop.set()
    assert p.answers["fw2"]["role"] == "MASTER" and len(calls) >= 2


def test_old_answers_are_shown_with_their_age_and_marked_stale() -> None:
    p = gather.Peers({"fw2": "192.0.2.2"}, 8443, None)
    p.answers["fw2"] = {"sync": "192.0.2.2", "role": "MASTER", "generation": 3, "at": 1000.0}
    fresh, old = p.snapshot(now=1005.0)["fw2"], p.snapshot(now=1000.0 + 10 * gather.PEER_EVERY)["fw2"]
    assert (fresh["age"], fresh["stale"]) == (5, False) and old["stale"]
    snap = {"node": "fw1", "role": "BACKUP", "vhids": [], "peers": {"fw2": old},
            "sync": {"generation": None, "last": []}, "transitions": [], "engine": {}, "proxy": {},
            "traffic": {"chart": [[60 * i, 0, 0] for i in range(60)], "today": {
                "requests": 0, "blocked": 0, "blocked_share": 0, "clients": 0, "categories": [],
                "blocked_domains": [], "errors": []}}, "at": 0}
    html = page.render(snap)
    assert f"({old['age']} s ago)" in html and "stale" in html


def _tcp_server(answer: bytes, drip: float = 0.0):
    """A loopback TCP server that answers every connection with `answer` (one byte per `drip` s if set)."""
    ls = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        ls.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except OSError:
                continue
            with c:
                try:
                    c.recv(65536)
                    if drip:
                        for i in range(min(len(answer), 100)):
                            if stop.wait(drip):
                                break
                            c.sendall(answer[i:i + 1])
                    else:
                        c.sendall(answer)
                except OSError:
                    pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return ls.getsockname()[1], stop, ls


@pytest.mark.parametrize("answer, drip, ok", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nx_total 1", 0.0, True),
    (b"HTTP/1.1 302 Found\r\nLocation: http://192.0.2.1/metrics\r\nContent-Length: 0\r\n\r\n", 0.0, False),
    (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (probe.METRICS_BYTES + 10), 0.0, False),
    (b"HTTP/1.1 200 OK\r\n\r\nx_total 1\n", 0.2, False),
])
def test_proxy_metrics_bounded_and_no_redirect(answer: bytes, drip: float, ok: bool) -> None:
    port, stop, ls = _tcp_server(answer, drip)
    try:
        text = probe.proxy_metrics(port, timeout=1.0)
    finally:
        stop.set()
        ls.close()
    assert (text is not None) == ok and (not ok or text == "x_total 1")


# F7 ---------------------------------------------------------------------------------------------------------------

def test_failed_logins_and_refusals_are_warnings_one_line_a_minute(served, caplog) -> None:
    s, port = served
    caplog.set_level(logging.WARNING, logger="appliance.admin")
    for _ in range(3):
        get(port, auth="ops:wrong-guess")
    lines = [r.getMessage() for r in caplog.records if "failed login" in r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "wrong-guess" not in caplog.text
    lst = s.listeners[0]
    for _ in range(200):
        lst.verify_request(None, ("192.0.2.7", 1))
    assert sum("refused" in r.getMessage() for r in caplog.records) == 1
    s.throttle.clock = lambda: time.monotonic() + 61  # a minute later: one more line, with the count
    lst.verify_request(None, ("192.0.2.7", 1))
    assert "(200 since the last such line)" in caplog.records[-1].getMessage()


def test_control_characters_are_escaped_in_the_log(served, caplog) -> None:
    _, port = served
    caplog.set_level(logging.DEBUG, logger="appliance.admin")
    request(port, b"GET /\x1b[2J\x1b[1;31mFAKE\rINJ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "\\x1b[2J" in text and "\x1b" not in text and "\r" not in text


def test_an_aborted_connection_is_one_log_line_not_a_traceback(served, caplog, capsys) -> None:
    s, _ = served
    caplog.set_level(logging.INFO, logger="appliance.admin")
    try:
        raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    except ssl.SSLError:
        s.listeners[0].handle_error(None, ("127.0.0.1", 4242))
    assert capsys.readouterr().err == ""
    assert [r.getMessage().count("\n") for r in caplog.records] == [0] and "SSLEOFError" in caplog.text


# F8 ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, code", [
    (b"GET / aaaa HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(150)) + b"\r\n", 431),
])
def test_the_stdlib_error_pages_carry_the_security_headers(served, raw: bytes, code: int) -> None:
    answer = request(served[1], raw)
    head = answer.split(b"\r\n\r\n", 1)[0].decode()
    assert status(answer) == code
    assert "Content-Security-Policy: default-src 'none'" in head and "Cache-Control: no-store" in head
    assert "aaaa" not in answer.decode(errors="replace")
