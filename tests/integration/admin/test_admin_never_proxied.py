"""The status page is never reachable through the proxy: the real proxy refuses the admin port on the node's own
addresses, loopback and an explicit admin.listen address, for plain HTTP and CONNECT, before connecting anywhere."""
from __future__ import annotations

from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.support.proxy import Proxy, connect_tunnel, fetch, make_tree

pytestmark = pytest.mark.slow
ADMIN_IP = "10.77.0.9"  # an admin.listen address no interface here has: refused by the config alone
PORT = 8443


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("never-proxied")
    cfg = make_tree(root)
    data = yaml.safe_load(cfg.read_text())
    data["admin"] = {"listen": ["loopback", "sync", ADMIN_IP], "port": PORT, "allow": ["10.77.0.0/24"],
                     "password_hash": bcrypt.hashpw(b"x", bcrypt.gensalt(10)).decode()}
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    (root / "state").mkdir()
    p = Proxy(cfg, root / "state").wait_ready()
    try:
        yield p
    finally:
        p.stop()


@pytest.mark.parametrize("host, reason", [(ADMIN_IP, "cluster-address"), ("192.168.1.2", "cluster-address"),
                                          ("192.168.200.1", "cluster-address"), ("127.0.0.1", "loopback")])
def test_plain_http_to_the_admin_port_is_refused(proxy: Proxy, host: str, reason: str) -> None:
    for path in ("/", "/metrics", "/status.json"):
        status, body, _ = fetch(proxy.port, f"http://{host}:{PORT}{path}")
        assert status == 403, (host, path, status)
        assert reason.encode() in body


def test_the_explicit_admin_address_is_named(proxy: Proxy) -> None:
    _, body, _ = fetch(proxy.port, f"http://{ADMIN_IP}:{PORT}/")
    assert b"admin.listen" in body


@pytest.mark.parametrize("host", [ADMIN_IP, "192.168.1.2", "192.168.200.2", "127.0.0.1"])
def test_connect_to_the_admin_port_is_refused(proxy: Proxy, host: str) -> None:
    status, s = connect_tunnel(proxy.port, f"{host}:{PORT}")
    s.close()
    assert status == 403


def test_a_node_address_stays_refused_on_any_port(proxy: Proxy) -> None:
    assert fetch(proxy.port, f"http://{ADMIN_IP}:9999/")[0] == 403
