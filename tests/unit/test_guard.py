"""filters.proxy.guard: each refusal reason, on every spelling of an address, before and after DNS; ports; Host mismatch."""
from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv6Address, IPv4Network
from types import SimpleNamespace

import pytest

try:
    from appliance.core import loader as c  # where validate() lives after the appliance/core split
except ImportError:  # before the split is committed (drop this fallback then)
    from appliance.core import config as c
from filters.hosts import BadHost, canonical_host
from filters.proxy import blockpage
from filters.proxy.guard import (
    DEFAULT_SAFE_PORTS,
    REASONS,
    STATUS,
    Guard,
    PortSet,
    Refusal,
    bad_host,
    refusal,
)

CLUSTER = {
    "cluster": {"vip": "192.168.1.50/24", "password": "pw", "extra_vhids": [{"vhid": 2, "vip": "192.168.1.51/24"}]},
    "nodes": {"fw1": {"lan": "192.168.1.2/24", "sync": "192.168.200.1/30", "advskew": 0},
              "fw2": {"lan": "192.168.1.3/24", "sync": "192.168.200.2/30", "advskew": 100}},
    "proxy": {"clients": ["192.168.1.0/24"], "listen": "192.168.1.50"},
}


@pytest.fixture(scope="module")
def cfg():
    return c.validate(CLUSTER)


@pytest.fixture(scope="module")
def guard(cfg):
    return Guard.from_config(cfg, local=())  # this host's own addresses: test_local_interface_addresses


def reason(g: Guard, raw: str, port: int = 80, connect: bool = False) -> str | None:
    _, r = g.check_raw(raw, port, connect)
    return r and r.reason


# (target as a client writes it, reason): every spelling from the issue and each never-proxied network
TARGETS = [
    *[(s, "loopback") for s in ("127.0.0.1", "127.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.000.000.001",
                               "[::ffff:127.0.0.1]", "127.0.0.2", "0177.0.0.2", "127.000.000.002", "2130706434",
                               "127.2", "0x7f.0.0.2", "[::ffff:127.0.0.2]", "127.255.255.254", "[::1]", "::1",
                               "localhost", "localhost.", "LOCALHOST", "ip6-localhost", "localhost.localdomain",
                               "foo.localhost", "１２７。０。０。１", "[::127.0.0.1]", "[::7f00:1]", "[64:ff9b::7f00:1]",
                               "[::ffff:0:127.0.0.1]", "[::ffff:0:7f00:2]")],
    *[(s, "unspecified") for s in ("0.0.0.0", "0", "0.1.2.3", "[::]", "0x0.0")],
    *[(s, "link-local") for s in ("169.254.169.254", "0251.0376.0251.0376", "2852039166", "169.254.1.1",
                                 "[fe80::1]", "[febf::1]", "[::ffff:169.254.169.254]")],
    *[(s, "multicast") for s in ("224.0.0.1", "239.255.255.250", "[ff02::1]", "[ff0e::1]")],
    *[(s, "broadcast") for s in ("255.255.255.255", "0xffffffff", "4294967295")],
    *[(s, "cluster-address") for s in ("192.168.1.50", "192.168.1.51", "192.168.1.2", "192.168.1.3",
                                      "192.168.200.1", "192.168.200.2", "192.168.200.0", "192.168.200.3",
                                      "3232235826", "0xc0.0xa8.0x1.0x32", "[::ffff:192.168.1.50]",
                                      "[64:ff9b::c0a8:132]", "[::ffff:0:192.168.1.2]")],
    *[(s, "bad-host") for s in ("a\nb", "evil.example\t1.2.3.4", "", "a..b", "x" * 300, "[fe80::1%eth0]",
                                "foo.123", "1.2.3.256", "a b")],
    *[(s, None) for s in ("example.com", "192.168.1.4", "192.168.1.255", "10.0.0.1", "8.8.8.8", "[2001:db8::1]",
                          "128.0.0.1", "169.253.0.1", "223.255.255.255", "localhost.example.com", "[fe7f::1]",
                          "[2002:7f00:1::]", "192.168.200.4")],
]


@pytest.mark.parametrize("raw,want", TARGETS)
def test_target_reason(guard, raw, want):
    assert reason(guard, raw) == want
    assert reason(guard, raw, 443, connect=True) == want  # both proxy paths, one check


@pytest.mark.parametrize("ip,want", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("fe80::1%eth0", "link-local"),
    ("169.254.169.254", "link-local"), ("192.168.1.50", "cluster-address"), ("192.168.200.2", "cluster-address"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.251", "multicast"), ("ff02::fb", "multicast"),
    (IPv4Address("127.0.0.5"), "loopback"), (IPv6Address("::ffff:192.168.1.2"), "cluster-address"),
    ("93.184.216.34", None), ("2606:2800:220:1::", None), (IPv4Address("192.168.1.9"), None),
    ("127.1", "bad-host"), ("localhost", "bad-host"), ("", "bad-host"), ("1.2.3.4\n", "bad-host"),
])
def test_check_address_after_dns(guard, ip, want):
    """The address the resolver returned: a name that resolves to loopback (or rebinds to it) is refused here."""
    r = guard.check_address(ip)
    assert (r and r.reason) == want


def test_details_name_what_was_hit(guard):
    assert guard.check_address("192.168.1.50").detail == "192.168.1.50 is the cluster VIP (192.168.1.50/32)"
    assert "the VIP of vhid 2" in guard.check_address("192.168.1.51").detail
    assert "fw2's sync address" in guard.check_address("192.168.200.2").detail
    assert "sync subnet" in guard.check_address("192.168.200.3").detail
    assert "fw1's LAN address" in guard.check_address("192.168.1.2").detail
    assert "embedded in 64:ff9b::7f00:1" in guard.check_address("64:ff9b::7f00:1").detail
    assert "localhost" in guard.check_raw("localhost.", 80, False)[1].detail


@pytest.mark.parametrize("port,connect,want", [
    (443, True, None), (80, True, "connect-port"), (22, True, "connect-port"), (8443, True, "connect-port"),
    (25, True, "connect-port"), (0, True, "connect-port"), (65536, True, "connect-port"),
    *[(p, False, None) for p in (80, 21, 443, 70, 210, 1025, 8080, 65535, 280, 488, 591, 777)],
    *[(p, False, "port") for p in (22, 25, 23, 110, 143, 1024, 1, 0, 65536, -1)],
])
def test_ports(guard, port, connect, want):
    _, r = guard.check_raw("example.com", port, connect)
    assert (r and r.reason) == want
    if r:
        assert str(port) in r.detail and ("connect_ports" if connect else "safe_ports") in r.detail


def test_address_refusal_wins_over_port(guard):
    assert reason(guard, "127.0.0.1", 22, connect=True) == "loopback"


@pytest.mark.parametrize("target,header,tport,want", [
    ("example.com", "example.com", None, None),
    ("example.com", "Example.COM.", None, None),
    ("example.com", "example.com:80", 80, None),
    ("example.com", "example.com", 80, None),
    ("example.com", "example.com:8080", 8080, None),
    ("127.0.0.1", "0x7f.1", None, None),
    ("example.com", None, 80, None),
    ("allowed.example", "blocked.example", None, "host-mismatch"),
    ("allowed.example", "blocked.example", 80, "host-mismatch"),
    ("example.com", "example.com:8080", 80, "host-mismatch"),
    ("example.com", "example.com", 8080, "host-mismatch"),
    ("example.com", "www.example.com", None, "host-mismatch"),
    ("example.com", "example.com\nX: y", None, "bad-host"),
    ("example.com", "", None, "bad-host"),
    ("example.com", "example.com:0", None, "bad-host"),
])
def test_host_header(guard, target, header, tport, want):
    r = guard.host_header_mismatch(canonical_host(target), header, tport)
    assert (r and r.reason) == want
    if r:
        assert r.detail.isascii() and r.detail.isprintable()


def test_refusal_fields_and_block_page():
    r = refusal("loopback", "127.0.0.1 is loopback (127.0.0.0/8)")
    assert (r.status, r.category, r.log_code, r.log_status) == (403, "appliance", "TCP_DENIED", "TCP_DENIED/403")
    assert refusal("bad-host", "x").log_status == "TCP_DENIED/400"
    assert refusal("host-mismatch", "x").status == 409
    assert set(STATUS) == set(REASONS)
    assert r.text == "refused by the appliance (loopback): 127.0.0.1 is loopback (127.0.0.0/8)"
    d = r.as_decision()
    assert (d.verdict, d.category, d.blocked) == ("block", "appliance", True)
    body, _ = blockpage.render(d, "http://127.1/", "192.168.1.9", "admin")
    assert b"appliance" in body and b"loopback" in body and b"127.0.0.0/8" in body
    with pytest.raises(ValueError):
        refusal("no-such-reason", "x")


def test_refusal_detail_is_one_safe_line():
    r = refusal("bad-host", "a\r\nb\x00\u202e")
    assert "\n" not in r.detail and r.detail.isascii() and r.detail.isprintable()
    assert isinstance(r, Refusal)


def test_bad_host_refusal():
    r = bad_host(BadHost("a\nb", "bad label"))
    assert (r.reason, r.status) == ("bad-host", 400) and "\\n" in r.detail and "\n" not in r.detail


def test_from_config_without_new_keys_uses_defaults(guard):
    assert str(guard.connect_ports) == "443"
    assert str(guard.safe_ports) == " ".join(map(str, DEFAULT_SAFE_PORTS))
    assert [x for x in guard.rules if x[1] == "denied-destination"] == []
    nets = {n for n, why, _ in guard.rules if why == "cluster-address"}
    assert nets == {"192.168.1.50/32", "192.168.1.51/32", "192.168.1.2/32", "192.168.1.3/32", "192.168.200.1/32",
                    "192.168.200.2/32", "192.168.200.0/30"}


def test_from_config_with_new_keys(cfg):
    proxy = SimpleNamespace(**{**dict(cfg.proxy), "deny_destinations": [IPv4Network("10.9.0.0/16"), "2001:db8::/32",
                                                                        "203.0.113.7"],
                               "connect_ports": [443, "8443-8444"], "safe_ports": [80]})
    g = Guard.from_config(SimpleNamespace(cluster=cfg.cluster, nodes=cfg.nodes, proxy=proxy))
    assert reason(g, "10.9.3.4") == reason(g, "[2001:db8::5]") == reason(g, "203.0.113.7") == "denied-destination"
    assert reason(g, "203.0.113.8") is None
    assert reason(g, "a.example", 8444, True) is None and reason(g, "a.example", 8445, True) == "connect-port"
    assert reason(g, "a.example", 8080) == "port"
    none = Guard.from_config(SimpleNamespace(cluster=cfg.cluster, nodes=cfg.nodes,
                                             proxy=SimpleNamespace(**{**dict(cfg.proxy), "connect_ports": []})))
    assert reason(none, "a.example", 443, True) == "connect-port"  # an empty list means no CONNECT, not the default


def test_the_model_keys_reach_the_guard():
    """proxy.deny_destinations / connect_ports / safe_ports as the config model reads and checks them."""
    data = {**CLUSTER, "proxy": {**CLUSTER["proxy"], "deny_destinations": ["10.9.0.0/16", "2001:db8::/32", "203.0.113.7"],
                                 "connect_ports": [443, "8443-8444"], "safe_ports": ["80", "1025-65535"]}}
    g = Guard.from_config(c.validate(data))
    assert reason(g, "10.9.3.4") == reason(g, "[2001:db8::5]") == reason(g, "203.0.113.7") == "denied-destination"
    assert reason(g, "a.example", 8444, True) is None and reason(g, "a.example", 8445, True) == "connect-port"
    assert reason(g, "a.example", 8080) is None and reason(g, "a.example", 25) == "port"
    d = c.validate(CLUSTER).proxy
    assert (d.deny_destinations, d.connect_ports) == ([], [443]) and list(g.safe_ports.specs) != list(DEFAULT_SAFE_PORTS)
    assert tuple(d.safe_ports) == DEFAULT_SAFE_PORTS


@pytest.mark.parametrize("key,value,message", [
    ("deny_destinations", ["10.0.0.1/8"], "has host bits set (did you mean 10.0.0.0/8?)"),
    ("deny_destinations", ["intranet"], "is not an IP address or network"),
    ("connect_ports", [0], "not within 1-65535"),
    ("connect_ports", ["9-3"], "must be low-high within 1-65535"),
    ("safe_ports", ["http"], "is not a port or a port range"),
    ("safe_ports", [True], "is not a port or a port range"),
])
def test_the_model_keys_are_checked_with_clear_errors(key, value, message):
    data = {**CLUSTER, "proxy": {**CLUSTER["proxy"], key: value}}
    with pytest.raises(Exception) as e:
        c.validate(data)
    assert f"proxy.{key}" in str(e.value) and message in str(e.value)


def test_plain_arguments():
    g = Guard(cluster=["10.0.0.1", ("10.0.1.0/24", "the lab")], deny=["::ffff:203.0.113.0/120"],
              connect_ports=[(443, 444)], safe_ports=["80"])
    assert reason(g, "10.0.0.1") == "cluster-address" and "the lab" in g.check_address("10.0.1.9").detail
    assert reason(g, "203.0.113.9") == "denied-destination"  # a mapped network is its IPv4 network
    assert reason(g, "h", 444, True) is None and reason(g, "h", 81) == "port"
    assert reason(Guard(), "127.1") == "loopback"  # the built-in rules need no config


@pytest.mark.parametrize("bad", ["0", "65536", "a", "3-1", (1,), None, True, "1-"])
def test_bad_port_spec(bad):
    with pytest.raises(ValueError):
        PortSet([bad])


@pytest.mark.parametrize("bad", ["not-a-net", "10.0.0.0/33", "1.2.3.4.5"])
def test_bad_network(bad):
    with pytest.raises(ValueError):
        Guard(deny=[bad])


def test_speed(guard, capsys):
    host = canonical_host("www.example.com")
    n = 20000
    t0 = time.perf_counter_ns()
    for _ in range(n):
        guard.check_target(host, 443, True)
    target = (time.perf_counter_ns() - t0) / n
    t0 = time.perf_counter_ns()
    for _ in range(n):
        guard.check_address("93.184.216.34")
    addr = (time.perf_counter_ns() - t0) / n
    with capsys.disabled():
        print(f"\nguard: check_target {target:.0f} ns/call, check_address(str) {addr:.0f} ns/call")
    assert target < 50_000 and addr < 100_000


def test_local_interface_addresses(cfg, tmp_path):
    """Every address of this host's interfaces is refused, named or not in the config (issue 11 review, F8)."""
    from filters.proxy import ifaddrs

    g = Guard.from_config(cfg, local=[("203.0.113.9", "wan0"), ("2001:db8:1::9", "wan0")])
    assert reason(g, "203.0.113.9") == reason(g, "[2001:db8:1::9]") == "cluster-address"
    assert "an address of this node (wan0)" in g.check_address("203.0.113.9").detail
    assert reason(g, "203.0.113.10") is None
    proc = tmp_path / "net"
    proc.mkdir()
    (proc / "fib_trie").write_text("Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.1.2.3\n        /32 host LOCAL\n"
                                    "     |-- 10.1.2.255\n        /32 link BROADCAST\nLocal:\n     |-- 10.1.2.3\n"
                                    "        /32 host LOCAL\n")
    (proc / "if_inet6").write_text("20010db8000000000000000000000005 02 40 00 80 eth1\n")
    assert ifaddrs.local_addresses(proc) == [("10.1.2.3", "local"), ("2001:0db8:0000:0000:0000:0000:0000:0005", "eth1")]
    g = Guard.from_config(cfg, local=ifaddrs.local_addresses(proc))
    assert reason(g, "10.1.2.3") == reason(g, "[2001:db8::5]") == "cluster-address" and reason(g, "10.1.2.255") is None
    assert Guard.from_config(cfg).check_address("127.0.0.1") is not None  # None reads this host's (loopback anyway)
