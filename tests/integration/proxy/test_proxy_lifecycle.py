"""The proxy process: intercept mode with its CA, reload under load, failed reload, bad list lines, workers, explain."""
from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.env import APPLIANCE
from tests.support.proxy import Proxy, connect_tunnel, fetch, get_local, make_tree
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)


def _proxy(tmp_path, **kw):
    (tmp_path / "state").mkdir(exist_ok=True)
    cfg = make_tree(tmp_path, **kw)
    return Proxy(cfg, tmp_path / "state")


def test_intercept_block_page_over_tls_and_ca(tmp_path):
    p = _proxy(tmp_path, proxy={"tls": "intercept"}, filt={"intercept_exempt": ["exempt"]}).wait_ready()
    try:
        ca_dir = tmp_path / "etc" / "ca"
        key = ca_dir / "mitmproxy-ca.pem"
        assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
        status, pem = get_local(p.port, "/ca.pem")
        assert status == 200 and pem.startswith(b"-----BEGIN CERTIFICATE-----")
        assert b"PRIVATE KEY" not in pem
        status, s = connect_tunnel(p.port, "www.blocked.test:443")
        assert status == 200  # intercept: the block page is shown inside TLS
        ctx = ssl.create_default_context(cadata=pem.decode())  # the client trusts the appliance CA
        with ctx.wrap_socket(s, server_hostname="www.blocked.test") as t:
            t.sendall(b"GET /inside HTTP/1.1\r\nHost: www.blocked.test\r\nAccept: text/html\r\nConnection: close\r\n\r\n")
            data = b""
            for _ in range(100):
                chunk = t.recv(65536)
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 403")
        assert b"https://www.blocked.test/inside" in data and b"<html" in data and b"helpdesk@test" in data
        # denied clients are refused at CONNECT, even in intercept mode
        status, s = connect_tunnel(p.port, "www.allowed.test:443", client="127.0.0.9")
        s.close()
        assert status == 403
    finally:
        p.stop()


def test_reload_under_load_without_failures(tmp_path, origin):
    p = _proxy(tmp_path).wait_ready()
    try:
        errors: list[str] = []
        done = threading.Event()
        count = [0]

        def load() -> None:
            deadline = time.monotonic() + 8
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    status, body, _ = fetch(p.port, f"http://127.0.0.1:{origin}/load", timeout=5)
                    if status != 200:
                        errors.append(f"status {status}")
                except OSError as e:
                    errors.append(repr(e))
                count[0] += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        assert fetch(p.port, "http://newly.test/")[0] != 403
        lists = tmp_path / "etc" / "lists" / "blocked" / "domains"
        for i in range(3):  # three reloads in a row under load, each waited for until it applies
            name = f"newly{i}.test" if i else "newly.test"
            with open(lists, "a") as f:
                f.write(f"{name}\n")
            p.signal(signal.SIGHUP)
            wait_until(lambda: fetch(p.port, f"http://{name}/")[0] == 403, 10, f"reload {i + 1} blocking {name}")
        done.set()
        for t in threads:
            t.join(15)
        assert not errors, errors[:5]
        assert count[0] >= 20
        assert fetch(p.port, "http://newly.test/")[0] == 403
        assert fetch(p.port, "http://newly2.test/")[0] == 403
        # `appliance reload` (the command) does the same through the pidfile
        with open(lists, "a") as f:
            f.write("bycommand.test\n")
        r = subprocess.run([APPLIANCE, "-c", str(p.cfg_path), "reload"], env=p.env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: fetch(p.port, "http://bycommand.test/")[0] == 403, 10, "`appliance reload` blocking bycommand.test")
    finally:
        p.stop()


def test_failed_reload_keeps_old_rules(tmp_path, origin):
    p = _proxy(tmp_path).wait_ready()
    try:
        cfg_path = tmp_path / "etc" / "appliance.yaml"
        good = cfg_path.read_text()
        cfg_path.write_text(good.replace("proxy:", "proxy:\n  bogus_key: 1", 1))
        r = subprocess.run([APPLIANCE, "-c", str(cfg_path), "reload"], env=p.env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "bogus_key" in r.stderr and "keeps its current rules" in r.stderr
        p.signal(signal.SIGHUP)  # the signal path too
        wait_until(lambda: "reload failed" in p.stderr(), 10, "the failed reload reported")
        assert "reload failed, keeping the old rules" in p.stderr() and "bogus_key" in p.stderr()
        assert fetch(p.port, "http://blocked.test/")[0] == 403
        assert fetch(p.port, f"http://127.0.0.1:{origin}/")[0] == 200
        assert get_local(p.port, "/healthz")[0] == 200
    finally:
        p.stop()


BAD_LIST = "good-one.test\nbad domain with spaces\n-leading-hyphen.test\nfine.test\nway..dots.test\n"


def test_list_with_bad_lines_is_skipped_and_reported(tmp_path, origin):
    p = _proxy(tmp_path, lists={"blocked/domains": BAD_LIST, "blocked/expressions": "ok-[0-9]+\n(unclosed\n"}).wait_ready()
    try:
        assert fetch(p.port, "http://good-one.test/")[0] == 403
        assert fetch(p.port, "http://www.fine.test/")[0] == 403
        assert fetch(p.port, f"http://127.0.0.1:{origin}/ok-12")[0] == 403
        err = p.stderr()
        assert "lists/blocked/domains:2" in err and "lists/blocked/domains:3" in err and "lists/blocked/domains:5" in err
        assert "lists/blocked/expressions:2" in err
    finally:
        p.stop()
    r = subprocess.run([APPLIANCE, "-c", str(p.cfg_path), "check", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    blocked = json.loads(r.stdout)["filter"]["lists"]["blocked"]
    assert blocked["files"]["domains"] == {"entries": 2, "bad_lines": 3}
    assert blocked["files"]["expressions"] == {"entries": 1, "bad_lines": 1}


def test_bad_lines_reject_refuses_to_start(tmp_path):
    p = _proxy(tmp_path, filt={"bad_lines": "reject"}, lists={"blocked/domains": BAD_LIST})
    assert p.proc.wait(60) == 2
    assert "lists/blocked/domains:2" in p.stderr()
    r = subprocess.run([APPLIANCE, "-c", str(p.cfg_path), "check", "--compile"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "lists/blocked/domains:2" in r.stderr


def test_bad_config_exits_2(tmp_path):
    cfg = make_tree(tmp_path)
    cfg.write_text(cfg.read_text().replace("workers: 1", "workers: 0"))
    env = {**os.environ, "APPLIANCE_STATE_DIR": str(tmp_path)}
    r = subprocess.run([APPLIANCE, "-c", str(cfg), "proxy", "--listen", "127.0.0.1:1"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "proxy.workers" in r.stderr
    r = subprocess.run([APPLIANCE, "-c", str(make_tree(tmp_path)), "proxy", "--listen", "nonsense"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--listen" in r.stderr


def test_two_workers_share_the_port(tmp_path, origin):
    p = _proxy(tmp_path, proxy={"workers": 2}).wait_ready()
    try:
        pidfile = tmp_path / "state" / "run" / "proxy.pid"
        assert int(pidfile.read_text()) == p.proc.pid
        kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(kids) == 2
        for i in range(40):
            assert fetch(p.port, f"http://127.0.0.1:{origin}/w{i}")[0] == 200
            assert fetch(p.port, f"http://w{i}.blocked.test/")[0] == 403
        from appliance.core import loader as cfgmod
        from filters.proxy import control as proxyctl

        c_cfg = cfgmod.load(p.cfg_path)

        def counted() -> dict | None:
            # a request is counted when its flow ends, which can be just after the client has read the response
            c = proxyctl.counters(c_cfg) or {}
            blocks = c.get('appliance_proxy_blocks_total{category="blocked"}', 0)
            return c if blocks >= 40 and c.get("appliance_proxy_requests_total", 0) >= 80 else None

        c = wait_until(counted, 5, "80 requests and 40 blocks summed over both workers in /metrics")
        assert c["appliance_proxy_workers"] == 2
        assert c['appliance_proxy_blocks_total{category="blocked"}'] == 40
        assert c["appliance_proxy_requests_total"] >= 80
        # SIGUSR1 fans out: every worker reopens the log after rotation
        log = tmp_path / "access.log"
        log.rename(tmp_path / "access.log.1")
        p.signal(signal.SIGUSR1)
        wait_until(lambda: all(_writes_to(int(k), log) for k in kids), 5, "every worker reopening the access log")
        for i in range(10):
            fetch(p.port, f"http://r{i}.blocked.test/")
        wait_until(lambda: log.exists() and log.read_text().count("TCP_DENIED") >= 10, 5, "10 blocks in the new log")
        assert log.read_text().count("TCP_DENIED") == 10
        # a killed worker is replaced
        os.kill(int(kids[0]), signal.SIGKILL)

        def replaced() -> bool:
            now = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.proc.pid)], capture_output=True, text=True).stdout.split()
            return len(now) == 2 and kids[0] not in now

        wait_until(replaced, 10, "the killed worker replaced")
        assert fetch(p.port, f"http://127.0.0.1:{origin}/after")[0] == 200
    finally:
        p.stop()
    assert not (tmp_path / "state" / "run" / "proxy.pid").exists()


def _writes_to(pid: int, path) -> bool:
    """Has process `pid` a descriptor open on `path` (by name: a renamed file no longer matches)?"""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd) == os.path.realpath(path) for fd in fds.iterdir())
    except FileNotFoundError:
        return False


def _explain(cfg, *args):
    r = subprocess.run([APPLIANCE, "-c", str(cfg), "explain", *args, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_explain_matches_proxy(tmp_path):
    cfg = make_tree(tmp_path)
    d = _explain(cfg, "http://www.blocked.test/x")
    assert (d["verdict"], d["category"], d["source"], d["policy"]) == ("block", "blocked", "lists/blocked/domains:2", None)
    d = _explain(cfg, "http://ok.blocked.test/")
    assert (d["verdict"], d["category"], d["source"]) == ("allow", "allowlist", "lists/allowlist/domains:2")
    d = _explain(cfg, "http://vm/", "--client", "127.0.0.2", "--at", "2024-01-03 10:00")
    assert (d["verdict"], d["category"], d["policy"]) == ("block", "social", "staff-hours")
    d = _explain(cfg, "http://vm/", "--client", "127.0.0.2", "--at", "2024-01-06 10:00")  # Saturday
    assert (d["verdict"], d["category"], d["policy"]) == ("allow", None, None)
    d = _explain(cfg, "http://vm/", "--client", "127.0.0.9")
    assert (d["verdict"], d["category"], d["source"]) == ("deny", None, "proxy.clients")
    d = _explain(cfg, "192.0.2.1:443", "--sni", "WWW.Blocked.Test.")
    assert (d["verdict"], d["category"], d["step"]) == ("block", "blocked", "TLS SNI")
    d = _explain(cfg, "http://127.0.0.1/private/x")  # the urls list names it, but loopback is refused before the lists
    assert (d["verdict"], d["category"], d["reason"], d["status"], d["step"]) == ("block", "appliance", "loopback", 403, "guard")
    d = _explain(cfg, "http://0xa.9.8.7/")  # a listed address in another spelling: the lists see the canonical one
    assert (d["verdict"], d["source"], d["host"]) == ("block", "lists/blocked/domains:7", "10.9.8.7")
    r = subprocess.run([APPLIANCE, "-c", str(cfg), "explain", "http://x/", "--at", "yesterday"], capture_output=True, text=True)
    assert r.returncode == 2 and "--at" in r.stderr
    r = subprocess.run([APPLIANCE, "-c", str(cfg), "explain", "http://x/", "--client", "300.1.1.1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--client" in r.stderr


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_workers_die_with_a_sigkilled_main_process(tmp_path, origin):
    """SIGKILL on the main PID only: every worker exits within seconds and the port stops accepting connections."""
    import socket

    p = _proxy(tmp_path, proxy={"workers": 2}).wait_ready()
    kids: list[int] = []
    try:
        kids = [int(k) for k in subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
        assert len(kids) == 2 and all(_alive(k) for k in kids)
        assert fetch(p.port, f"http://127.0.0.1:{origin}/before")[0] == 200
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.wait(5)
        wait_until(lambda: not any(_alive(k) for k in kids), 8, "every worker gone after its main process")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p.port), timeout=2).close()
    finally:
        for k in kids:  # only if the assertion above failed: never leave a worker serving
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        p.stop()


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="reads the request back with Linux prctl")
def test_die_with_parent_arms_pdeathsig_and_closes_the_fork_race():
    import ctypes

    from filters.proxy.worker import die_with_parent

    def child(parent: int) -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                armed = die_with_parent(parent)  # exits 0 here when `parent` is not our parent (already gone)
                sig = ctypes.c_int(0)
                ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
                code = 3 if armed and sig.value == signal.SIGTERM else 4
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert child(os.getpid()) == 3  # armed: SIGTERM when this process dies
    assert child(os.getpid() + 1_000_000) == 0  # the parent it was forked for is gone: exits at once


def _loads_mitmproxy(pid: int) -> bool:
    return "mitmproxy_rs" in Path(f"/proc/{pid}/maps").read_text()


def test_the_main_process_loads_the_workers_code_only_to_share_it(tmp_path, origin):
    """workers: 2: mitmproxy is imported before the fork (the workers share its pages); workers: 1: only the worker
    imports it (in the main process it would be shared with no one and only add to the resident set)."""
    for n in (1, 2):
        (tmp_path / str(n)).mkdir()
        p = _proxy(tmp_path / str(n), proxy={"workers": n}).wait_ready()
        try:
            assert fetch(p.port, f"http://127.0.0.1:{origin}/m{n}")[0] == 200
            kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
            assert len(kids) == n and all(_loads_mitmproxy(int(k)) for k in kids), kids
            assert _loads_mitmproxy(p.proc.pid) == (n > 1), n
        finally:
            p.stop()
