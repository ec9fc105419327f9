"""Hypothesis fuzz of the proxy's own readers in front of every decision: the ClientHello verdict (gate.hello_verdict),
the request-head limits and checks (gate.head_end / check_head) and the mitmproxy path's front gate
(front.GateReader's framing scan). Any input gives a clean answer (or HeadError with a known reason), never another
exception; a split never changes the answer. FUZZ_EXAMPLES=N runs more (default 2000 each); counts print with -s."""
from __future__ import annotations

import asyncio
import os
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filters.proxy import gate, sni
from filters.proxy.front import GateReader
from tests.support.proxy import client_hello

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 2000))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
HELLO = client_hello("fuzz.example")
LIM = gate.Limits(max_header_size=2048, max_url_length=512)


def report(capsys, name: str, stats: Counter) -> None:
    with capsys.disabled():
        print(f"\nfuzz {name}: {sum(stats.values())} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))


# ---------------------------------------------------------------- ClientHello verdict


def test_fuzz_hello_verdict(capsys):
    stats: Counter = Counter()
    big = b"\x16\x03\x01\x40\x00\x01\x01\x00\x00" + b"\x00" * 20  # a handshake that says it is 64 KiB + 1

    @FUZZ
    @given(st.one_of(st.binary(max_size=64), st.integers(0, len(HELLO)).map(lambda n: HELLO[:n]),
                     st.tuples(st.integers(0, len(HELLO) - 1), st.integers(0, 255)).map(
                         lambda t: HELLO[:t[0]] + bytes([t[1]]) + HELLO[t[0] + 1:]),
                     st.just(big), st.binary(max_size=16).map(lambda b: HELLO + b)),
           st.booleans(), st.booleans(), st.sampled_from([sni.MAX_HELLO, 64, 200]))
    def run(buf, timed_out, eof, max_size):
        what, arg = gate.hello_verdict(buf, timed_out, max_size, eof)
        r = sni.parse(buf) if buf else sni.NEED_MORE
        assert what in ("need", "pass", "cut", "gone")
        if what == "pass":
            assert arg is None or isinstance(arg, str)
            assert r == arg  # passes only what the parser read whole
        if what == "cut":
            assert arg in gate.HELLO_REASONS
        if what == "need":  # waits only while there is time, the client is there and the size allows
            assert not timed_out and not eof and len(buf) < max_size and r is sni.NEED_MORE
        if timed_out and not eof:
            assert what in ("pass", "cut")  # the timeout never passes an unread hello
        stats[what if what != "cut" else f"cut {arg}"] += 1

    run()
    report(capsys, "hello_verdict", stats)
    assert stats["pass"] and stats["need"] and stats["cut hello-timeout"] and stats["cut not-tls"]
    assert gate.hello_verdict(big, False)[1] == "hello-too-large"


# ---------------------------------------------------------------- request heads

METHODS = [b"GET", b"POST", b"CONNECT", b"G\x00T", b"", b"GET /", b"get"]
TARGETS = [b"http://a.example/", b"/", b"http://a.example/" + b"x" * 600, b"http://a/\x01", b"http://a/ b", b"*"]
FIELDS = [b"Host: a.example", b"Content-Length: 5", b"Content-Length: 5, 5", b"Content-Length: 5, 6", b"Content-Length: -1",
          b"Content-Length: 0x5", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked, chunked",
          b" folded", b"\tfolded", b"X: a\rb", b"X: a\x00", b"X : y", b"X:", b"Bad Name: 1", b"X: " + b"v" * 900, b"Upgrade: ws",
          b"X: \x7f"]


@st.composite
def heads(draw) -> bytes:
    line = draw(st.sampled_from(METHODS)) + b" " + draw(st.sampled_from(TARGETS)) + b" " + draw(
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 x"]))
    fields = draw(st.lists(st.one_of(st.sampled_from(FIELDS), st.binary(max_size=12)), max_size=5))
    sep = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]))
    return sep.join([line, *fields]) + b"\r\n\r\n"


def test_fuzz_head_checks_agree_with_mitmproxy(capsys):
    from mitmproxy.net.http import http1

    stats: Counter = Counter()

    @FUZZ
    @given(heads())
    def run(head):
        try:
            end = gate.head_end(head, LIM.max_header_size, LIM.max_url_length)
            if end < 0:
                stats["incomplete"] += 1
                return
            method, target, headers = gate.check_head(head[:end], LIM.max_header_size, LIM.max_url_length)
        except gate.HeadError as e:
            assert e.reason in gate.HEAD_REASONS and e.status == gate.HEAD_REASONS[e.reason]
            stats[f"refused {e.status}"] += 1
            return
        names = [n for n, _ in headers]
        assert b"\x00" not in head[:end] and not (b"content-length" in names and b"transfer-encoding" in names)
        assert len(target) <= LIM.max_url_length and end <= LIM.max_header_size + 4
        # what the gate lets through, mitmproxy reads the same way (no request the two frame differently)
        lines = [ln + b"\r\n" for ln in head[:end - 4].split(b"\r\n")]  # as h11 hands them over, no blank line
        try:
            req = http1.read_request_head(lines)
        except ValueError:  # mitmproxy answers 400 itself (e.g. CONNECT to a URL): refused, never forwarded
            stats["accepted, mitmproxy 400"] += 1
            return
        assert req.method.encode() == method.upper()  # mitmproxy upper-cases the method, nothing else
        try:
            size = http1.expected_http_body_size(req)
        except ValueError:  # stricter than the gate (e.g. "Content-Length: 5, 5"): mitmproxy answers 400
            stats["accepted, mitmproxy 400"] += 1
            return
        cl = [v for n, v in headers if n == b"content-length"]
        te = [v for n, v in headers if n == b"transfer-encoding"]
        assert size == (None if te else int(cl[0].split(b",")[0]) if cl else 0)  # both frame the body the same
        stats["accepted"] += 1

    run()
    report(capsys, "head_end + check_head (vs mitmproxy)", stats)
    assert stats["accepted"] and stats["refused 400"] and stats["refused 414"]


# ---------------------------------------------------------------- the front gate's framing scan


class _Reader:
    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)

    async def read(self, n: int = -1) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def at_eof(self) -> bool:
        return not self.chunks


class _Writer:
    def __init__(self):
        self.out, self.closed = b"", False

    def write(self, b: bytes) -> None:
        self.out += b

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def gate_verdict(stream: bytes, cuts: list[int]) -> tuple[str, bytes]:
    """Feed `stream` split at `cuts` through a GateReader: (refusal reason or "ok", the bytes passed on)."""
    pieces, last = [], 0
    for c in sorted(set(cuts)) + [len(stream)]:
        if c > last:
            pieces.append(stream[last:c])
            last = c
    refused: list[str] = []

    async def main() -> bytes:
        g = GateReader(_Reader(pieces), _Writer(), LIM, lambda reason, status, why, head: refused.append(reason))
        g.pending = 0
        got = b""
        while True:
            g.pending = 0  # as if every request was answered at once (no idle wait in a fuzz case)
            g.decide(False)  # a CONNECT / Upgrade answered without switching: the checks stay on
            b = await g.read(65536)
            if not b:
                return got
            got += b

    got = asyncio.run(main())
    return (refused[0] if refused else "ok"), got


BODY_PARTS = [b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"zz\r\nx\r\n", b"5\r\nhelloXX\r\n", b"3;ext=1\r\nabc\r\n0\r\nT: 1\r\n\r\n",
              b"ffffffffffffffff\r\n", b"5\nhello\n0\n\n", b"hello", b""]


@st.composite
def streams(draw) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        framing = draw(st.sampled_from(["none", "cl", "chunked"]))
        hdr = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n"
        if framing == "cl":
            body = draw(st.sampled_from([b"hello", b"", b"x" * 40]))
            out += hdr + b"Content-Length: %d\r\n\r\n" % len(body) + body
        elif framing == "chunked":
            out += hdr.replace(b"GET", b"POST") + b"Transfer-Encoding: chunked\r\n\r\n" + draw(st.sampled_from(BODY_PARTS))
        else:
            out += hdr + b"\r\n"
    if draw(st.booleans()):
        out += draw(st.one_of(heads(), st.binary(max_size=24)))
    return out


def test_fuzz_front_gate_scan_split_invariant(capsys):
    stats: Counter = Counter()

    @FUZZ
    @given(streams(), st.lists(st.integers(0, 400), max_size=6))
    def run(stream, cuts):
        whole = gate_verdict(stream, [])
        split = gate_verdict(stream, [c for c in cuts if c < len(stream)])
        assert whole[0] == split[0]  # where the chunks end never changes the verdict
        if whole[0] == "ok":
            # nothing passed is dropped or reordered; only an unfinished head at the end is held back
            assert whole[1] == split[1] and stream.startswith(whole[1])
        else:
            assert whole[0] in gate.HEAD_REASONS
        stats[whole[0]] += 1

    run()
    report(capsys, "front gate framing (whole vs split)", stats)
    assert stats["ok"] and stats["bad-request"]
