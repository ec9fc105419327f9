"""Abuse suite (issue 11 review, F8): the node's own interface addresses are never proxied, whether or not the config
names them (a WAN or management address, a docker bridge, a global IPv6 address), and a reload (SIGHUP) reads them
again. The real proxy runs in a network namespace the test makes, with an extra interface (dummy, else veth) the test adds addresses to;
the test's requests run in that namespace too (`ip netns exec`)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.support.env import APPLIANCE
from tests.support.proxy import make_tree
from tests.support.wait import wait_until

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2")]
PORT = 3128
CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    s.sendall(sys.argv[2].encode().decode("unicode_escape").encode("latin-1"))
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except OSError:
        pass
    sys.stdout.write(got.decode("latin-1"))
""")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def netns():
    name = f"cg11-{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        if sh("ip", "-n", name, "link", "add", "dummy0", "type", "dummy", check=False).returncode:
            # no dummy driver in this kernel: one end of a veth pair is an interface like any other
            sh("ip", "-n", name, "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1")
            sh("ip", "-n", name, "link", "set", "dummy1", "up")
        sh("ip", "-n", name, "link", "set", "dummy0", "up")
        sh("ip", "-n", name, "addr", "add", "10.123.45.67/32", "dev", "dummy0")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def ask(ns: str, raw: str) -> str:
    """Send `raw` (backslash escapes) to the proxy inside the namespace; what it answered."""
    return sh("ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, str(PORT), raw, check=False).stdout


def get(ns: str, url: str) -> str:
    host = url.split("://", 1)[1].split("/", 1)[0]
    return ask(ns, f"GET {url} HTTP/1.1\\r\\nHost: {host}\\r\\nAccept: text/plain\\r\\nConnection: close\\r\\n\\r\\n")


def test_every_interface_address_of_the_node_is_refused_and_reread_on_reload(netns, tmp_path):
    (tmp_path / "state").mkdir()
    cfg = make_tree(tmp_path, proxy={"workers": 1})
    env = {**os.environ, "APPLIANCE_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(["ip", "netns", "exec", netns, APPLIANCE, "-c", str(cfg), "proxy", "--listen",
                             f"127.0.0.1:{PORT}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "proxy.stderr", "wb"))
    try:
        wait_until(lambda: proc.poll() is None and get(netns, f"http://127.0.0.1:{PORT}/healthz").endswith("ok\n"),
                   30, "the proxy in the namespace answering /healthz")
        # an address no config names, on an interface of the node: refused by the appliance, never connected to
        got = get(netns, "http://10.123.45.67:8080/")
        assert got.startswith("HTTP/1.1 403 ") and "refused by the appliance (cluster-address)" in got, got[:600]
        assert "an address of this node" in got
        # added later: only a reload reads the interfaces again
        sh("ip", "-n", netns, "addr", "add", "10.123.45.68/32", "dev", "dummy0")
        sh("ip", "-n", netns, "addr", "add", "fd99::5/128", "dev", "dummy0", "nodad")
        assert "refused by the appliance" not in get(netns, "http://10.123.45.68:8080/")
        proc.send_signal(signal.SIGHUP)
        for url in ("http://10.123.45.68:8080/", "http://[fd99::5]:8080/"):
            got = wait_until(lambda: (g := get(netns, url)) and "refused by the appliance" in g and g, 15,
                             f"{url} refused after the reload")
            assert got.startswith("HTTP/1.1 403 ") and "(cluster-address)" in got, got[:600]
        assert get(netns, "http://10.123.45.99:8080/").startswith("HTTP/1.1 502 ")  # not ours: tried (nothing there)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
