"""The plain HTTP fast path's body and head parsing: chunked framing (the front gate's rules) and response heads (httptools)."""
from __future__ import annotations

import httptools

from filters.proxy.framing import MAX_CHUNK, MAX_CHUNK_LINE
from filters.proxy.gate import HeadError

MAX_RESPONSE_HEAD = 65536  # an origin's response head larger than this is a bad gateway (mitmproxy's h11 allows 64 KiB)
_HEX = frozenset(b"0123456789abcdefABCDEF")


class Chunked:
    """Follows one chunked body as the front gate does (framing.HeadScanner: the same limits and refusals, 400
    bad-request): advance() says how far the bytes given belong to this body; `size` counts the data bytes (the
    log's size, as mitmproxy's de-chunked raw_content)."""

    def __init__(self, max_trailer: int):
        self.state = "size"  # size | data | crlf | trailer | done
        self.left = 0
        self.line = b""
        self.size = 0
        self.max_trailer = max_trailer

    @property
    def done(self) -> bool:
        return self.state == "done"

    def advance(self, data: bytes | bytearray, i: int = 0) -> int:
        """Follow the framing from data[i:]; returns the index after the last byte that belongs to the body."""
        n = len(data)
        while i < n and self.state != "done":
            if self.state == "data":
                k = min(self.left, n - i)
                i += k
                self.left -= k
                if self.left == 0:
                    self.state = "crlf"
                continue
            j = data.find(b"\n", i)
            part = bytes(data[i:] if j < 0 else data[i:j + 1])
            self.line += part
            i += len(part)
            if len(self.line) > (MAX_CHUNK_LINE if self.state != "trailer" else self.max_trailer):
                raise HeadError("bad-request", "chunk-size line or trailer too long")
            if j < 0:
                return i
            line, self.line = self.line, b""
            self._line(line)
        return i

    def _line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise HeadError("bad-request", "bare LF or CR in chunked framing")
        line = line[:-2]
        if self.state == "crlf":
            if line:
                raise HeadError("bad-request", "chunk data longer than its size")
            self.state = "size"
        elif self.state == "size":
            size = line.split(b";", 1)[0]
            if not size or len(size) > 10 or not set(size) <= _HEX:
                raise HeadError("bad-request", "invalid chunk size")
            self.left = int(size, 16)
            if self.left > MAX_CHUNK:
                raise HeadError("bad-request", "chunk size too large")
            self.size += self.left
            self.state = "data" if self.left else "trailer"
        elif not line:  # trailer section over
            self.state = "done"
        elif line[:1] in (b" ", b"\t") or b":" not in line or b"\x00" in line:
            raise HeadError("bad-request", "malformed trailer field")


class ResponseHead:
    """An origin's response head read by httptools (llhttp): status, version, headers (names lower-cased)."""

    __slots__ = ("status", "version", "headers", "keep_alive", "complete")

    def __init__(self, head: bytes):
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        p = httptools.HttpResponseParser(self)
        try:
            p.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass  # a 101: the caller refuses it (nothing asked to switch)
        except httptools.HttpParserError as e:
            raise ValueError(f"malformed response head from the origin: {e}") from None
        if not self.complete:
            raise ValueError("incomplete response head from the origin")
        self.status = p.get_status_code()
        self.version = p.get_http_version()
        self.keep_alive = p.should_keep_alive()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True

    def get(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    def framing(self, method: bytes) -> tuple[str, int]:
        """("none", 0), ("length", n), ("chunked", 0) or ("close", 0): how the body after this head ends (RFC 9112
        6.3). ValueError for a framing a proxy must not guess (conflicting lengths, a non-final chunked)."""
        if method == b"HEAD" or 100 <= self.status < 200 or self.status in (204, 304):
            return "none", 0
        tes = [x.strip().lower() for v in self.get(b"transfer-encoding") for x in v.split(b",") if x.strip()]
        if tes:
            if tes[-1] != b"chunked" or b"chunked" in tes[:-1]:
                raise ValueError("a response Transfer-Encoding without a final chunked")
            return "chunked", 0
        cls = {x.strip() for v in self.get(b"content-length") for x in v.split(b",")}
        if not cls:
            return "close", 0
        if len(cls) != 1:
            raise ValueError("conflicting Content-Length values from the origin")
        v = cls.pop()
        if not v.isdigit() or len(v) > 18:
            raise ValueError("invalid Content-Length from the origin")
        return "length", int(v)

    def closes(self) -> bool:
        """The origin will not take another request on this connection (Connection: close, HTTP/1.0)."""
        return not self.keep_alive or any(b"close" in [t.strip() for t in v.lower().split(b",")]
                                          for v in self.get(b"connection"))

    def mime(self) -> str:
        ct = self.get(b"content-type")
        return (ct[0].decode("latin-1").split(";")[0] if ct else "-") or "-"
