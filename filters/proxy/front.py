"""The mitmproxy path's front gate: every client request head within proxy.* limits and unambiguous before mitmproxy parses it."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from filters.proxy.gate import HeadError, Limits, check_head, head_end

log = logging.getLogger("filters.proxy.front")
GATES: dict[tuple, "GateReader"] = {}  # client (ip, port) -> its gate, for the addon's response hook (one worker)
MAX_CHUNK_LINE = 4096  # a chunk-size line (size, extensions) longer than this is refused
RECHECK = 1.0  # seconds between looks at a connection whose request waits for the origin (is it idle now?)
MAX_CHUNK = 1 << 40  # no chunk is larger than a TiB: more hex digits are refused before int() grows


class GateReader:
    """Stands in for the StreamReader mitmproxy reads a client from (it only calls read(n)). Follows the client's
    HTTP/1 framing (heads, Content-Length bodies, chunked bodies) and, before passing bytes on, refuses with its own
    answer and a close: a head over proxy.max_header_size (431) or with a target over max_url_length (414), an
    ambiguous head (gate.check_head: 400), an invalid chunk size (400), a head not complete within header_timeout
    (408). A client idle between requests longer than idle_timeout (or than header_timeout before its first byte)
    is closed. A CONNECT or Upgrade request makes the rest opaque (mitmproxy's tunnel; idle after
    tunnel_idle_timeout). `refuse(reason, status, why)` counts and logs a refusal."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: Limits,
                 refuse: Callable[[str, int, str, bytes], None], key: tuple | None = None):
        self.r, self.w, self.lim, self.refuse = reader, writer, limits, refuse
        self.loop = asyncio.get_running_loop()
        self.state = "head"
        self.buf = b""  # the current head (or chunk line / trailer) so far
        self.head_start = 0.0
        self.idle_since = self.loop.time()
        self.first = True
        self.pending = 0  # requests read whose response has not been sent yet
        self.left = 0  # body bytes (or chunk data bytes) still to pass
        self.closed = False
        self.key = key
        if key is not None:
            GATES[key] = self

    def responded(self) -> None:
        """The addon saw a response (or error) for one of this client's requests."""
        self.pending = max(0, self.pending - 1)
        if self.pending == 0:
            self.idle_since = self.loop.time()

    def close(self) -> None:
        self.closed = True
        if self.key is not None and GATES.get(self.key) is self:
            del GATES[self.key]

    def _timeout(self) -> float | None:
        lim, now = self.lim, self.loop.time()
        if self.state == "head":
            if self.buf:
                return self.head_start + lim.header_timeout - now
            if self.pending:
                return None  # waiting for the origin: mitmproxy's own inactivity timer applies
            return self.idle_since + (lim.header_timeout if self.first else lim.idle_timeout) - now
        return lim.tunnel_idle_timeout  # inside a body or an opaque stream: bytes must keep coming

    async def read(self, n: int = -1) -> bytes:
        """The client's next bytes that passed the gate: a head only once it is whole and checked (mitmproxy never
        sees a head the gate has not read the same way), body bytes as they come. b"" at EOF, a refusal or a timeout."""
        while True:
            if self.closed:
                return b""
            data = await self._read_raw(n)
            if not data:
                return data
            try:
                out = self._scan(data)
            except HeadError as e:
                self._refuse(e)
                self.close()
                return b""
            if out:
                return out

    async def _read_raw(self, n: int) -> bytes:
        while True:
            timeout = self._timeout()
            try:
                if timeout is None:  # a request waits for its answer: look again every RECHECK s (it may come)
                    data = await asyncio.wait_for(self.r.read(n), RECHECK)
                else:
                    data = await asyncio.wait_for(self.r.read(n), max(0.0, timeout))
                break
            except asyncio.TimeoutError:  # StreamReader.read keeps what it had: a cancelled read loses nothing
                if timeout is None or self._timeout() is None or self._timeout() > 0:
                    continue
                if self.state == "head" and self.buf:
                    self._refuse(HeadError("header-timeout", f"no whole request head within {self.lim.header_timeout:g} s"))
                else:
                    log.debug("closing an idle client connection (%s)", self.state)
                    self.w.close()
                self.close()
                return b""
        if not data:
            self.close()
        return data

    def _refuse(self, e: HeadError) -> None:
        head = self.buf
        self.refuse(e.reason, e.status, e.why, head)
        if not self.w.is_closing():
            from filters.proxy.tunnel import answer_bytes

            self.w.write(answer_bytes(e.status, e.why))
            self.w.close()

    def _scan(self, data: bytes) -> bytes:
        """Follow the framing over `data`; returns what may pass now (partial heads and chunk lines are held)."""
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            st = self.state
            if st == "opaque":
                out += data[i:]
                return bytes(out)
            if st == "body" or st == "chunk-data":
                k = min(self.left, n - i)
                out += data[i:i + k]
                i += k
                self.left -= k
                if self.left == 0:
                    self.state = "head" if st == "body" else "chunk-crlf"
                    self.buf = b""
                continue
            if st == "head":
                if not self.buf:
                    self.head_start = self.loop.time()
                    if data[i:i + 2] == b"\r\n" and not self.pending:  # a CRLF between requests (RFC 9112 2.2)
                        out += b"\r\n"
                        i += 2
                        continue
                take = self.buf + data[i:]
                end = head_end(take, self.lim.max_header_size, self.lim.max_url_length)
                if end < 0:
                    self.buf = take
                    return bytes(out)
                i += end - len(self.buf)
                self._head(take[:end])
                out += take[:end]
                continue
            # chunked framing: a size line, data, CRLF, ... a zero size, trailers, an empty line
            j = data.find(b"\n", i)
            line_part = data[i:] if j < 0 else data[i:j + 1]
            self.buf += line_part
            i += len(line_part)
            limit = MAX_CHUNK_LINE if st != "trailer" else self.lim.max_header_size
            if len(self.buf) > limit:
                raise HeadError("bad-request", "chunk-size line or trailer too long")
            if j < 0:
                return bytes(out)
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
                    self.state = "head"
                elif line[:1] in (b" ", b"\t") or b":" not in line or b"\x00" in line:
                    raise HeadError("bad-request", "malformed trailer field")
        return bytes(out)

    def _head(self, head: bytes) -> None:
        method, _, headers = check_head(head, self.lim.max_header_size, self.lim.max_url_length)
        self.buf = b""
        self.first = False
        self.pending += 1
        names = {k: v for k, v in headers}
        if method == b"CONNECT" or b"upgrade" in names:
            self.state = "opaque"  # a tunnel or a protocol switch: mitmproxy's business from here on
        elif b"transfer-encoding" in names:
            self.state = "chunk-size"
        elif b"content-length" in names:
            self.left = int(names[b"content-length"].split(b",")[0].strip())
            self.state = "body" if self.left else "head"

    # what else a StreamReader offers that mitmproxy or asyncio may call
    def at_eof(self) -> bool:
        return self.closed or self.r.at_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.r, name)
