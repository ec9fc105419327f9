"""The plain HTTP fast path's pure parts: which heads it takes or hands to mitmproxy, chunked framing, response heads."""
from __future__ import annotations

import pytest

from filters.proxy.gate import HeadError
from filters.proxy.httpfast_io import Chunked, ResponseHead
from filters.proxy.httpfast_req import Handover, parse


def head(line: str, *headers: str) -> bytes:
    return (line + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


def test_an_absolute_form_request_is_taken():
    r = parse(head("GET http://example.com:8080/a?b=1 HTTP/1.1", "Host: example.com:8080", "Proxy-Connection: x"),
              8192, 2048)
    assert (r.raw_host, r.port, r.path, r.origin_form) == ("example.com", 8080, "/a?b=1", False)
    assert r.upstream_head() == b"GET /a?b=1 HTTP/1.1\r\nHost: example.com:8080\r\n\r\n"


@pytest.mark.parametrize("h", [
    head("GET http://e.com/ HTTP/1.0", "Host: e.com"),
    head("CONNECT e.com:443 HTTP/1.1", "Host: e.com:443"),
    head("GET http://e.com/ HTTP/1.1", "Host: e.com", "Upgrade: websocket"),
    head("POST http://e.com/ HTTP/1.1", "Host: e.com", "Expect: 100-continue", "Content-Length: 1"),
    head("POST http://e.com/ HTTP/1.1", "Host: e.com", "Transfer-Encoding: gzip, chunked"),
    head("GET http://e.com/ HTTP/1.1", "Host: e.com", "Host: f.com"),
    head("GET https://e.com/ HTTP/1.1", "Host: e.com"),
    head("GET http://u@e.com/ HTTP/1.1", "Host: e.com"),
    head("GET http://E.com/ HTTP/1.1", "Host: e.com"),
    head("GET http://e.com HTTP/1.1", "Host: e.com"),
    head("GET http://e.com/ HTTP/1.1", "Host: e.com", "X: a", " b"),  # obs-fold: the gate refuses it
    head("POST http://e.com/ HTTP/1.1", "Content-Length: 1", "Transfer-Encoding: chunked"),
    b"GET http://e.com/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
])
def test_what_it_does_not_serve_exactly_goes_to_mitmproxy(h):
    with pytest.raises(Handover):
        parse(h, 8192, 2048)


def test_a_canonical_host_replaces_the_written_one_upstream():
    from filters.proxy.httpfast_req import canonical

    r = parse(head("GET http://0x7f.1:81/ HTTP/1.1", "Host: 0x7f.1:81"), 8192, 2048)
    assert canonical(r).name == "127.0.0.1"
    assert b"\r\nHost: 127.0.0.1:81\r\n" in r.upstream_head()


def test_chunked_framing_follows_the_body_and_counts_its_data():
    ch = Chunked(8192)
    data = b"5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nT: 1\r\n\r\nGET next"
    end = 0
    for i in range(len(data)):  # byte by byte: every state boundary split
        end += ch.advance(data[i:i + 1]) if not ch.done else 0
    assert ch.done and ch.size == 11 and data[end:] == b"GET next"


@pytest.mark.parametrize("body", [b"zz\r\n", b"5\r\nhello!\r\n", b"5\nhello\r\n", b"1" * 11 + b"\r\n",
                                  b"0\r\n bad\r\n\r\n"])
def test_chunked_framing_refuses_what_the_gate_refuses(body):
    with pytest.raises(HeadError) as e:
        Chunked(8192).advance(body)
    assert e.value.status == 400


def test_response_heads_and_their_framing():
    r = ResponseHead(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=x\r\nContent-Length: 12\r\n\r\n")
    assert (r.status, r.mime(), r.framing(b"GET"), r.framing(b"HEAD"), r.closes()) == \
        (200, "text/html", ("length", 12), ("none", 0), False)
    assert ResponseHead(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").framing(b"GET") == ("chunked", 0)
    assert ResponseHead(b"HTTP/1.0 200 OK\r\n\r\n").framing(b"GET") == ("close", 0)
    assert ResponseHead(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n").closes()
    with pytest.raises(ValueError):
        ResponseHead(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").framing(b"GET")
    with pytest.raises(ValueError):
        ResponseHead(b"HTTP/1.1 2x0 OK\r\n\r\n")
