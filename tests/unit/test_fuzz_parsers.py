"""Hypothesis fuzz of the hand-written parsers (host model, ClientHello, CONNECT head): a clean answer or the documented
exception, never another; FUZZ_EXAMPLES=N runs more (default 2000 each), the case counts print with -s."""
from __future__ import annotations

import os
import random
import socket
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filters.hosts import BadHost, Host, canonical_host, host_port
from filters.proxy import sni
from filters.proxy.tunnel import parse_connect

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 2000))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
HOST_CHARS = "abcxyzABCXYZ0123456789.-_:[]%@/ \t\r\n\x00\x7f\u00ad\u3002\uff10\uff41\u00fc\u00df\ud800"
NUMERIC_CHARS = "0123456789abcdefxABCDEFX."


def report(capsys, name: str, stats: Counter) -> None:
    total = sum(v for k, v in stats.items() if not k.startswith("~"))
    with capsys.disabled():
        print(f"\nfuzz {name}: {total} cases: " + ", ".join(f"{k.lstrip('~')} {v}" for k, v in sorted(stats.items())))


LABELS = ["a", "www", "example", "com", "xn--bcher-kva", "B\u00fccher", "LOCALHOST", "0x7f", "0X7F", "127", "0177", "1",
          "0", "255", "256", "08", "0x", "a" * 63, "a" * 64, "a-b", "-a", "a_b", "", "\uff11\uff12\uff17", "exa\u00admple"]
ODD = ["::1", "::ffff:127.0.0.1", "::ffff:7f00:1", "fe80::1%eth0", "[::1]", "[::ffff:127.0.0.2]", "[127.0.0.1]", "[::1",
       "a\nb", "a\tb", "a b", "a\x00b", "a%2eb", "a/b", "u@h", "a..b", ".", "", "\ud800", "64:ff9b::7f00:1"]


def hostish() -> st.SearchStrategy[str]:
    """Text that looks like hosts often enough to reach every branch: labels, numbers, brackets, odd characters."""
    dotted = st.lists(st.sampled_from(LABELS), min_size=1, max_size=5).map(".".join)
    return st.one_of(dotted, dotted.map(lambda s: s + "."), st.sampled_from(ODD), st.text(HOST_CHARS, max_size=20),
                     st.text(max_size=8), dotted.map(lambda s: (s + ".") * 12))  # the last: over 253 characters


HOSTISH = hostish()  # strategies built once: building one per example costs more than the example


def check_host(h: Host) -> None:
    """What every Host promises: a printable ASCII canonical name that is its own canonical form."""
    assert h.name and h.name.isascii() and h.name.isprintable() and " " not in h.name
    assert len(h.name) <= 253
    assert canonical_host(h.authority) == h
    if h.version == 4:
        assert socket.inet_ntoa(socket.inet_aton(h.name)) == h.name


def test_fuzz_canonical_host_and_host_port(capsys):
    stats: Counter = Counter()

    @FUZZ
    @given(HOSTISH, st.sampled_from(["", "", ":443", ":80", ":", ":0", ":65536", ":\u00b2", ": 1", ":08080"]))
    def run(raw, port):
        try:
            h = canonical_host(raw)
        except BadHost as e:
            assert e.why and str(e).isascii() and str(e).isprintable()
            stats["refused"] += 1
        else:
            check_host(h)
            stats[f"ipv{h.version}" if h.is_ip else "name"] += 1
        try:
            h, p = host_port(raw + port, 80)
        except BadHost:
            stats["~host_port refused"] += 1
        else:
            check_host(h)
            assert isinstance(p, int) and 0 < p < 65536
            stats["~host_port parsed"] += 1

    run()
    report(capsys, "canonical_host + host_port", stats)
    assert stats["refused"] and stats["name"] and stats["ipv4"] and stats["ipv6"] and stats["~host_port parsed"]


def test_fuzz_ipv4_agrees_with_inet_aton(capsys):
    """Every numeric spelling means to canonical_host what it means to the C library's inet_aton."""
    stats: Counter = Counter()

    @FUZZ
    @given(st.text(NUMERIC_CHARS, min_size=1, max_size=24))
    def run(raw):
        try:
            libc = socket.inet_ntoa(socket.inet_aton(raw))
        except OSError:
            libc = None
        try:
            h = canonical_host(raw)
        except BadHost:
            h = None
        if raw.endswith(".") and h is not None and h.version == 4:
            stats["~root dot read as an address (libc: no)"] += 1  # stricter than libc: refused as that address
            return
        if libc is not None:
            assert h is not None and h.name == libc, (raw, libc, h)
            stats["address"] += 1
        else:
            assert h is None or h.version is None, (raw, h)  # a name ('abc.def') is fine, another address is not
            stats["not an address"] += 1

    run()
    report(capsys, "inet_aton agreement", stats)
    assert stats["address"] and stats["not an address"]


# ---------------------------------------------------------------- TLS ClientHello (filters/proxy/sni.py)


def u16(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


SEED = st.integers(0, 2**32 - 1)  # one draw drives a case's shape: far fewer hypothesis choices, same replay
SNI_NAMES = st.one_of(st.none(), st.binary(min_size=1, max_size=40), st.text("abcXYZ019.-", min_size=1, max_size=60).map(str.encode))


@st.composite
def client_hello(draw) -> tuple[bytes, bytes | None]:
    """(the bytes a client sends: records carrying one ClientHello, the server_name it names or None)."""
    name = draw(SNI_NAMES)
    rnd = random.Random(draw(SEED))
    exts = [(rnd.randrange(1, 65536), b"\x00" * rnd.randrange(31)) for _ in range(rnd.randrange(4))]
    if name is not None:
        exts.insert(rnd.randrange(len(exts) + 1), (0, u16(b"\x00" + u16(name))))
    ext = b"".join(t.to_bytes(2, "big") + u16(d) for t, d in exts)
    session = b"\x5a" * rnd.randrange(33)  # the parser skips these fields: their length is what matters
    body = b"\x03\x03" + b"\x11" * 32 + bytes([len(session)]) + session + u16(b"\x13\x01\x13\x02") + b"\x01\x00"
    if ext or rnd.random() < 0.5:
        body += u16(ext)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    out, pos = b"", 0
    for size in [rnd.randrange(1, 200) for _ in range(rnd.randrange(4))] + [len(hs)]:  # split over 1-4 records
        chunk = hs[pos:pos + size]
        if chunk:
            out += b"\x16\x03\x01" + u16(chunk)
        pos += len(chunk)
    return out, name


HELLOS = client_hello()


def check_sni_result(r: object) -> str:
    assert r is None or r is sni.NEED_MORE or r is sni.NOT_TLS or r is sni.TOO_LARGE or isinstance(r, str), r
    return ("no sni" if r is None else "need more" if r is sni.NEED_MORE else "not tls" if r is sni.NOT_TLS
            else "too large" if r is sni.TOO_LARGE else "sni")


def test_fuzz_sni(capsys):
    """Per example, five cases: a whole ClientHello gives its SNI; a cut of it asks for more; flipped bytes, random
    bytes and random bytes behind a TLS record header give one of the four documented answers, never an exception."""
    stats: Counter = Counter()

    @FUZZ
    @given(HELLOS, SEED, st.binary(max_size=120))
    def run(hello, seed, noise):
        rnd = random.Random(seed)
        raw, name = hello
        r = sni.parse(raw)
        if name is None:
            assert r is None
        else:
            try:
                want = name.decode("ascii").lower().rstrip(".") or None
            except UnicodeDecodeError:
                want = sni.NOT_TLS
            assert r == want or r is want, (r, want)
        stats["whole: " + check_sni_result(r)] += 1
        if isinstance(r, str):
            try:
                canonical_host(r)
            except BadHost:
                stats["~whole: an SNI that is not a host (the caller must refuse it)"] += 1
        cut = rnd.randrange(len(raw))
        assert sni.parse(raw[:cut]) is sni.NEED_MORE
        stats["cut: need more"] += 1
        buf = bytearray(raw)
        for _ in range(rnd.randrange(1, 4)):
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        stats["flipped: " + check_sni_result(sni.parse(bytes(buf)))] += 1
        stats["random: " + check_sni_result(sni.parse(noise))] += 1
        stats["record+random: " + check_sni_result(sni.parse(b"\x16\x03\x01" + noise))] += 1

    run()
    report(capsys, "sni.parse", stats)
    assert stats["whole: sni"] and stats["whole: no sni"] and stats["flipped: not tls"]


# ---------------------------------------------------------------- CONNECT head (filters/proxy/tunnel.py)


METHODS = ["CONNECT"] * 6 + ["connect", "GET", "CONNECT "]
PORTS = [":443", ":443", ":80", ":0", ":65536", ":", "", ":\u00b2", ":443 x", ":4\t43"]
VERSIONS = ["HTTP/1.1"] * 4 + ["HTTP/1.0", "HTTP/2", "HTTP/1.1 x", ""]
HEADERS = ["Accept: text/html", "accept:*/*", "Host: x", "X", ":", "Accept", "a\nb: c"]
CONNECT_HOSTS = st.one_of(HOSTISH, HOSTISH.map(lambda h: f"[{h}]"))


@st.composite
def connect_head(draw) -> bytes:
    """A CONNECT head, mostly well-formed around a fuzzed host: method, port, version and headers from one seed."""
    host = draw(CONNECT_HOSTS)
    rnd = random.Random(draw(SEED))
    line = f"{rnd.choice(METHODS)} {host}{rnd.choice(PORTS)} {rnd.choice(VERSIONS)}\r\n"
    headers = "".join(rnd.choice(HEADERS) + "\r\n" for _ in range(rnd.randrange(4)))
    return (line + headers + "\r\n").encode("utf-8", "surrogatepass")


CONNECT_HEADS = connect_head()


def test_fuzz_parse_connect(capsys):
    """parse_connect: (host, port, accept) or ValueError. What it returns is not yet a host the logs may see:
    the count of accepted hosts that canonical_host refuses is what the wiring must refuse (bad-host)."""
    stats: Counter = Counter()

    @FUZZ
    @given(CONNECT_HEADS, st.binary(max_size=120))
    def run(head, noise):
        try:
            parse_connect(noise)
            stats["~random bytes parsed"] += 1
        except ValueError:
            stats["~random bytes refused"] += 1
        try:
            host, port, accept = parse_connect(head)
        except ValueError:
            stats["refused"] += 1
            return
        assert isinstance(host, str) and host and isinstance(port, int) and 0 < port < 65536
        assert accept is None or isinstance(accept, str)
        stats["parsed"] += 1
        try:
            check_host(canonical_host(host))
        except BadHost:
            stats["~parsed, but not a host (bad-host)"] += 1

    run()
    report(capsys, "parse_connect", stats)
    assert stats["parsed"] and stats["refused"]
