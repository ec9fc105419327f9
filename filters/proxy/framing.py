"""The client's HTTP/1 framing as the proxy follows it before mitmproxy parses anything: one state machine shared by the
front gate (front.GateReader, the plain client stream) and the inner gate (inner.InnerGate, HTTP/1 inside intercepted
TLS). Pure and synchronous: bytes in, the bytes that may pass out, or HeadError."""
from __future__ import annotations

from filters.proxy.gate import HeadError, Limits, check_head, head_end

MAX_CHUNK_LINE = 4096  # a chunk-size line (size, extensions) longer than this is refused
MAX_CHUNK = 1 << 40  # no chunk is larger than a TiB: more hex digits are refused before int() grows


class HeadScanner:
    """Follows heads, Content-Length bodies and chunked bodies. A head passes only once whole and checked
    (gate.check_head: 400/414/431), a chunk line only once valid. A CONNECT or an Upgrade request puts the scanner in
    "wait" after its head (and body): what follows is held, never scanned, until decide() says whether the answer switched protocols
    (a 2xx to CONNECT, a 101): then "opaque" (the rest passes untouched), else "head" again. So an Upgrade header
    alone never turns the checks off. `now` is any monotonic clock in seconds."""

    def __init__(self, limits: Limits, now: float):
        self.lim = limits
        self.state = "head"
        self.buf = b""  # the current head (or chunk line / trailer) so far; the whole head while it is checked
        self.head_start = 0.0
        self.idle_since = now
        self.first = True
        self.pending = 0  # requests read whose response has not been sent yet
        self.left = 0  # body bytes (or chunk data bytes) still to pass
        self.switch = False  # the request being read asked to switch protocols (CONNECT, Upgrade)
        self.held = b""  # bytes that arrived in "wait"

    def responded(self, now: float) -> None:
        """One request got its answer (or failed)."""
        self.pending = max(0, self.pending - 1)
        if self.pending == 0:
            self.idle_since = now

    def decide(self, switched: bool, now: float) -> bool:
        """The answer to a CONNECT / Upgrade request was sent: opaque from here if it switched, else HTTP/1 again.
        False when the scanner was not waiting for such an answer (nothing changes)."""
        if self.state != "wait":
            return False
        self.state = "opaque" if switched else "head"
        self.switch = False
        self.idle_since = now
        return True

    def timeout(self, now: float) -> float | None:
        """Seconds left before the current state times out; None while a request waits for its answer."""
        lim = self.lim
        if self.state == "head":
            if self.buf:
                return self.head_start + lim.header_timeout - now
            if self.pending:
                return None
            return self.idle_since + (lim.header_timeout if self.first else lim.idle_timeout) - now
        if self.state == "wait":
            return None
        return lim.tunnel_idle_timeout  # inside a body or an opaque stream: bytes must keep coming

    def _after_message(self) -> str:
        return "wait" if self.switch else "head"

    def scan(self, data: bytes, now: float) -> bytes:
        """Follow the framing over `data`; returns what may pass now (partial heads and chunk lines are held). In
        "wait" the bytes are held (take_held() after decide()); a caller bounds them (held_over())."""
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            st = self.state
            if st == "opaque":
                out += data[i:]
                return bytes(out)
            if st == "wait":  # bytes behind a CONNECT / Upgrade request, before its answer: held
                self.held += data[i:]
                return bytes(out)
            if st == "body" or st == "chunk-data":
                k = min(self.left, n - i)
                out += data[i:i + k]
                i += k
                self.left -= k
                if self.left == 0:
                    self.state = self._after_message() if st == "body" else "chunk-crlf"
                    self.buf = b""
                continue
            if st == "head":
                i, done = self._scan_head(data, i, now, out)
                if done:
                    return bytes(out)
                continue
            i = self._scan_chunk_line(data, i, out)
            if i < 0:
                return bytes(out)
        return bytes(out)

    def take_held(self) -> bytes:
        """What arrived while waiting for decide(): the caller scans it again (or passes it, once opaque)."""
        held, self.held = self.held, b""
        return held

    def held_over(self) -> bool:
        """More held in "wait" than a request head may be: a client that does not wait for the answer."""
        return len(self.held) > self.lim.max_header_size

    def _scan_head(self, data: bytes, i: int, now: float, out: bytearray) -> tuple[int, bool]:
        if not self.buf:
            self.head_start = now
            if data[i:i + 2] == b"\r\n" and not self.pending:  # a CRLF between requests (RFC 9112 2.2)
                out += b"\r\n"
                return i + 2, False
        take = self.buf + data[i:]
        end = head_end(take, self.lim.max_header_size, self.lim.max_url_length)
        if end < 0:
            self.buf = take
            return len(data), True
        i += end - len(self.buf)
        self.buf = take[:end]  # the whole head: what a refusal logs (method, URL)
        self._head(self.buf)
        out += take[:end]
        return i, False

    def _scan_chunk_line(self, data: bytes, i: int, out: bytearray) -> int:
        """Chunked framing: a size line, data, CRLF, ... a zero size, trailers, an empty line. -1: need more."""
        st = self.state
        j = data.find(b"\n", i)
        line_part = data[i:] if j < 0 else data[i:j + 1]
        self.buf += line_part
        i += len(line_part)
        limit = MAX_CHUNK_LINE if st != "trailer" else self.lim.max_header_size
        if len(self.buf) > limit:
            raise HeadError("bad-request", "chunk-size line or trailer too long")
        if j < 0:
            return -1
        line, self.buf = self.buf, b""
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise HeadError("bad-request", "bare LF or CR in chunked framing")
        out += line
        line = line[:-2]
        if st == "chunk-crlf":
            if line:
                raise HeadError("bad-request", "chunk data longer than its size")
            self.state = "chunk-size"
        elif st == "chunk-size":
            size = line.split(b";", 1)[0]
            if not size or len(size) > 10 or not all(c in b"0123456789abcdefABCDEF" for c in size):
                raise HeadError("bad-request", "invalid chunk size")
            self.left = int(size, 16)
            if self.left > MAX_CHUNK:
                raise HeadError("bad-request", "chunk size too large")
            self.state = "chunk-data" if self.left else "trailer"
        elif st == "trailer":
            if not line:
                self.state = self._after_message()
            elif line[:1] in (b" ", b"\t") or b":" not in line or b"\x00" in line:
                raise HeadError("bad-request", "malformed trailer field")
        return i

    def _head(self, head: bytes) -> None:
        method, _, headers = check_head(head, self.lim.max_header_size, self.lim.max_url_length)
        self.buf = b""
        self.first = False
        self.pending += 1
        names = {k: v for k, v in headers}
        # a tunnel or a protocol switch: decided by the answer (decide()), never by the request alone
        self.switch = method == b"CONNECT" or b"upgrade" in names
        if b"transfer-encoding" in names:
            self.state = "chunk-size"
        elif b"content-length" in names:
            self.left = int(names[b"content-length"].split(b",")[0].strip())
            self.state = "body" if self.left else self._after_message()
        else:
            self.state = self._after_message()
