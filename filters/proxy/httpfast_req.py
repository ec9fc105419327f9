"""The plain HTTP fast path's request heads: the front gate's checks, httptools' URL parser, and what it takes or hands on."""
from __future__ import annotations

from dataclasses import dataclass

import httptools

from filters.hosts import BadHost, Host, canonical_host, host_port
from filters.proxy.gate import HeadError, check_head

_AUTH = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789.-:[]")
_HOP = (b"proxy-connection",)  # a proxy's own header: not for the origin


class Handover(Exception):
    """A request the fast path does not serve exactly as the mitmproxy path would: the connection (with every byte
    of it not yet answered) goes to mitmproxy behind the front gate, which refuses or serves it as it always has."""


@dataclass
class Request:
    """One request head the fast path takes (HTTP/1.1, absolute-form http:// or a local page in origin-form)."""

    method: bytes
    head: bytes  # the raw head through its blank line
    headers: list  # (lower-cased name, value) pairs, values stripped (gate.check_head)
    raw_host: str  # the host as the client wrote it (what the local-page check reads, as mitmproxy's req.host)
    port: int
    path: str  # origin-form target: path and query as written
    origin_form: bool
    length: int = 0  # request body: Content-Length
    chunked: bool = False
    close: bool = False  # the client asked to close after this request
    host: Host | None = None  # canonical, once read (a name the host model cannot read: handed over)

    def header(self, name: bytes) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v.decode("latin-1")
        return None

    @property
    def accept(self) -> str | None:
        return self.header(b"accept")

    @property
    def pretty_url(self) -> str:
        """As mitmproxy's request.pretty_url: the absolute URL, the port only when not 80."""
        return f"http://{self.raw_host}{'' if self.port == 80 else f':{self.port}'}{self.path}"

    def upstream_head(self) -> bytes:
        """The head sent to the origin: origin-form request line, the client's header lines as written less the
        proxy's own; Host set to the canonical host when the client wrote another spelling (as the addon does)."""
        lines = self.head[:-4].split(b"\r\n")
        out = [b"%s %s HTTP/1.1" % (self.method, self.path.encode("utf-8", "surrogateescape"))]
        fix = self.host is not None and self.raw_host != self.host.name
        hostline = None
        if fix:
            hostline = b"Host: " + self.host.authority.encode() + (b"" if self.port == 80 else b":%d" % self.port)
        seen_host = False
        for line in lines[1:]:
            name = line.split(b":", 1)[0].lower()
            if name in _HOP:
                continue
            if name == b"host":
                seen_host = True
                if fix:
                    line = hostline
            out.append(line)
        if not seen_host:
            out.append(hostline or b"Host: " + self.raw_host.encode() + (b"" if self.port == 80 else b":%d" % self.port))
        return b"\r\n".join(out) + b"\r\n\r\n"


def parse(head: bytes, max_header: int, max_url: int) -> Request:
    """The head through the front gate's own checks (gate.check_head) and httptools' URL parser; Handover for anything
    the fast path does not serve itself: a head the gate refuses (it refuses it the same way), HTTP/1.0, CONNECT,
    Upgrade, Expect, a transfer coding other than chunked alone, several Host headers, a target that is not
    absolute-form http:// (origin-form only for the proxy's own pages: the caller checks), userinfo or an odd
    authority."""
    try:
        method, target, headers = check_head(head, max_header, max_url)
    except HeadError:
        raise Handover from None
    if not head.startswith(b"%s %s HTTP/1.1\r\n" % (method, target)) or method == b"CONNECT":
        raise Handover
    hosts, length, chunked, close, lengths = [], 0, False, False, 0
    for name, value in headers:
        if name in (b"upgrade", b"expect"):
            raise Handover
        if name == b"host":
            hosts.append(value)
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked" or chunked:
                raise Handover
            chunked = True
        elif name == b"content-length":
            # one plain number only: the gate lets a repeated equal value, a list of it or leading zeros through, and
            # mitmproxy refuses those 400; forwarded as written, an origin might frame them otherwise (outside review)
            lengths += 1
            if lengths > 1 or not value.isdigit() or (value[:1] == b"0" and len(value) > 1):
                raise Handover
            length = int(value)
        elif name == b"connection":
            close = close or b"close" in [t.strip() for t in value.lower().split(b",")]
    if len(hosts) > 1:
        raise Handover
    if target.startswith(b"http://"):
        authority, path = _absolute(target)
        origin_form = False
    elif target.startswith(b"/") and hosts:
        authority, path, origin_form = hosts[0], target, True
    else:
        raise Handover
    raw, port = _authority(authority)
    return Request(method, head, headers, raw, port, path.decode("utf-8", "surrogateescape"), origin_form, length,
                   chunked, close)


def _absolute(target: bytes) -> tuple[bytes, bytes]:
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise Handover from None
    if url.userinfo is not None or url.fragment is not None:
        raise Handover
    end = target.find(b"/", 7)
    if end < 0:
        raise Handover  # "http://host" without a path: mitmproxy's reading of it is its own
    return target[7:end], target[end:]


def _authority(authority: bytes) -> tuple[str, int]:
    """(host as written, port) of a plain authority: lower-case name or address, optional port; else Handover."""
    if not authority or not set(authority) <= _AUTH:
        raise Handover
    try:
        host, port = host_port(authority.decode("ascii"), 80)
    except BadHost:
        raise Handover from None
    raw = authority.decode("ascii")
    if raw.endswith(f":{port}"):
        raw = raw[:-len(f":{port}")]
    elif raw.endswith(":"):
        raise Handover
    raw = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    return raw, port


def canonical(req: Request) -> Host:
    """The canonical host of the request target (the lists and the guard decide on it); Handover if unreadable
    (mitmproxy's path refuses it bad-host, with its own rendering of the URL)."""
    try:
        req.host = canonical_host(req.raw_host)
    except BadHost:
        raise Handover from None
    return req.host
