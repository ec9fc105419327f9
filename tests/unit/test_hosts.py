"""filters.hosts: every spelling of a host to one canonical Host; what the normaliser cannot read is BadHost."""
from __future__ import annotations

import socket
import time
from ipaddress import IPv4Address, IPv6Address

import pytest

from filters.hosts import BadHost, Host, canonical_host, host_port, parse_port, shown

# (spelling, canonical name): the abuse suite's spellings of 127.0.0.2 and 127.0.0.1, and their relatives
SPELLINGS = [
    ("127.0.0.2", "127.0.0.2"),
    ("0177.0.0.2", "127.0.0.2"),
    ("127.000.000.002", "127.0.0.2"),
    ("2130706434", "127.0.0.2"),
    ("127.2", "127.0.0.2"),
    ("0x7f.0.0.2", "127.0.0.2"),
    ("0X7F.0.0.2", "127.0.0.2"),
    ("0x7f000002", "127.0.0.2"),
    ("017700000002", "127.0.0.2"),
    ("127.0.2", "127.0.0.2"),
    ("[::ffff:127.0.0.2]", "127.0.0.2"),
    ("::ffff:127.0.0.2", "127.0.0.2"),
    ("[::ffff:7f00:2]", "127.0.0.2"),
    ("[0:0:0:0:0:FFFF:7F00:0002]", "127.0.0.2"),
    ("127.0.0.2.", "127.0.0.2"),
    ("127.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("0177.1", "127.0.0.1"),
    ("127.000.000.001", "127.0.0.1"),
    ("0x7f.0x0.0x0.0x1", "127.0.0.1"),
    ("0x00007f.1", "127.0.0.1"),
    ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ("１２７。０。０。１", "127.0.0.1"),  # full-width digits and ideographic dots: IDNA maps them to ASCII
    ("0", "0.0.0.0"),
    ("0xffffffff", "255.255.255.255"),
    ("169.254.169.254", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"),
    ("[::1]", "::1"),
    ("::1", "::1"),
    ("[0:0:0:0:0:0:0:1]", "::1"),
    ("[FE80::1]", "fe80::1"),
    ("[::]", "::"),
    ("localhost", "localhost"),
    ("localhost.", "localhost"),
    ("LOCALHOST", "localhost"),
    ("LocalHost.", "localhost"),
    ("Example.COM", "example.com"),
    ("www.example.com.", "www.example.com"),
    ("Bücher.de", "xn--bcher-kva.de"),
    ("xn--bcher-kva.de", "xn--bcher-kva.de"),
    ("ＥＸＡＭＰＬＥ.com", "example.com"),
    ("exa\u00admple.com", "example.com"),  # nameprep drops a soft hyphen: the name it spells
    ("a_b.example", "a_b.example"),
    ("a-b.example", "a-b.example"),
    ("a" * 63 + ".com", "a" * 63 + ".com"),
    (".".join(["a" * 63] * 3 + ["b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61])),  # 253 characters
    ("1.2.3.example", "1.2.3.example"),
    ("0xg", "0xg"),  # not a number (inet_aton refuses it too): a one-label name
]

# (input, a word of the reason)
BAD = [
    ("", "empty"),
    (".", "empty"),
    ("a\nb", "label"),
    ("evil.example\n1.2.3.4 TCP_MISS", "label"),
    ("a\tb", "label"),
    ("a b", "label"),
    ("a\rb", "label"),
    ("a\x00b", "label"),
    ("a\x7fb", "label"),
    ("a%2eb", "label"),
    ("a/b", "label"),
    ("user@host", "label"),
    ("a..b", "empty label"),
    (".a", "empty label"),
    ("a..", "empty label"),
    ("-a.com", "label"),
    ("a-.com", "label"),
    ("a" * 64 + ".com", "label"),
    (".".join(["a" * 63] * 3 + ["b" * 62]), "longer than 253"),
    ("x" * 2000, "longer than 1024"),
    ("foo.123", "ends in a number"),
    ("08", "ends in a number"),
    ("1.2.3.08", "ends in a number"),
    ("0x", "ends in a number"),
    ("256.1.1.1", "ends in a number"),
    ("1.2.3.256", "ends in a number"),
    ("1.2.65536", "ends in a number"),
    ("4294967296", "ends in a number"),
    ("1.2.3.4.5", "ends in a number"),
    (" 127.0.0.1", "ends in a number"),
    ("127.0.0.1 ", "label"),
    ("[127.0.0.1]", "IPv6"),
    ("[::1", "'['"),
    ("[fe80::1%eth0]", "zone"),
    ("fe80::1%25eth0", "zone"),
    ("::ffff:0127.0.0.1", "IPv6"),
    ("1:2:3", "IPv6"),
    ("a:80", "IPv6"),  # canonical_host takes no port: host_port() does
    ("\udc80.com", "international"),
    ("a\u3000b", "label"),
]


@pytest.mark.parametrize("raw,want", SPELLINGS)
def test_spelling_is_canonical(raw, want):
    h = canonical_host(raw)
    assert h.name == want and str(h) == want
    assert canonical_host(h.authority) == h  # the canonical form is a fixed point


@pytest.mark.parametrize("raw,why", BAD)
def test_bad_host_is_refused_with_a_reason(raw, why):
    with pytest.raises(BadHost) as e:
        canonical_host(raw)
    assert why in e.value.why
    assert e.value.raw == raw
    msg = str(e.value)
    assert msg.isascii() and msg.isprintable()  # safe inside one log line


def test_host_fields():
    v4, v6, name = canonical_host("127.1"), canonical_host("[::1]"), canonical_host("Example.org.")
    assert (v4.ip, v4.version, v4.is_ip, v4.authority) == (IPv4Address("127.0.0.1"), 4, True, "127.0.0.1")
    assert (v6.ip, v6.version, v6.authority, v6.with_port(443)) == (IPv6Address("::1"), 6, "[::1]", "[::1]:443")
    assert (name.ip, name.version, name.is_ip, name.with_port(80)) == (None, None, False, "example.org:80")
    assert canonical_host("[::ffff:127.0.0.1]") == v4
    assert isinstance(v4, Host) and hash(v4) == hash(canonical_host("2130706433"))


def test_not_a_string():
    with pytest.raises(BadHost, match="not a string"):
        canonical_host(b"example.com")  # type: ignore[arg-type]


@pytest.mark.parametrize("raw,host,port", [
    ("example.com:443", "example.com", 443),
    ("Example.com", "example.com", None),
    ("example.com:", "example.com", None),
    ("127.1:0443", "127.0.0.1", 443),
    ("[::1]:8080", "::1", 8080),
    ("[::ffff:127.0.0.2]:443", "127.0.0.2", 443),
    ("[::1]", "::1", None),
    ("localhost.:80", "localhost", 80),
    ("h:65535", "h", 65535),
    ("h:1", "h", 1),
])
def test_host_port(raw, host, port):
    h, p = host_port(raw)
    assert (h.name, p) == (host, port)


def test_host_port_default():
    assert host_port("example.com", 80) == (canonical_host("example.com"), 80)
    assert host_port("example.com:8080", 80)[1] == 8080


@pytest.mark.parametrize("raw,why", [
    ("h:0", "port"), ("h:65536", "port"), ("h:99999", "port"), ("h:-1", "port"), ("h:+80", "port"),
    ("h:80 ", "port"), ("h:\u00b2", "port"), ("h:\u0664\u0664\u0663", "port"), ("h:000443", "port"),
    ("::1:443", "brackets"), ("::1", "brackets"), ("[::1]443", "junk"), ("[::1", "'['"),
    ("[fe80::1%eth0]:443", "zone"), ("a\nb:443", "label"), (":443", "empty"), ("", "empty"),
    ("x" * 1100 + ":80", "longer"),
])
def test_host_port_bad(raw, why):
    with pytest.raises(BadHost) as e:
        host_port(raw)
    assert why in e.value.why


def test_parse_port():
    assert [parse_port(x) for x in ("443", "1", "65535", "00080")] == [443, 1, 65535, 80]
    assert [parse_port(x) for x in ("", "0", "65536", "-1", " 1", "1e3", "\u00b9")] == [None] * 7


def test_shown_is_one_printable_line():
    s = shown("a\r\nb\x00\u202e" + "z" * 200)
    assert s.isascii() and s.isprintable() and len(s) <= 80 and "\n" not in s


@pytest.mark.parametrize("raw", ["127.1", "2130706433", "0x7f.1", "0177.0.0.2", "127.000.000.002", "0x7f000001",
                                 "1.2.3", "255.255.255.255", "0", "0xffffffff", "017777777777"])
def test_agrees_with_libc_inet_aton(raw):
    assert canonical_host(raw).name == socket.inet_ntoa(socket.inet_aton(raw))


def test_speed(capsys):
    """Per-request cost (cached and uncached); printed with -s, bounded loosely so a slow CI does not flake."""
    names = [f"host{i}.example.com" for i in range(2000)]
    t0 = time.perf_counter_ns()
    for n in names:
        canonical_host(n)
    cold = (time.perf_counter_ns() - t0) / len(names)
    t0 = time.perf_counter_ns()
    for _ in range(50):
        for n in names:
            canonical_host(n)
    warm = (time.perf_counter_ns() - t0) / (50 * len(names))
    with capsys.disabled():
        print(f"\ncanonical_host: {cold:.0f} ns/call uncached, {warm:.0f} ns/call cached")
    assert warm < 20_000 and cold < 200_000
