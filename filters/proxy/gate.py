"""What a client may send and hold before the proxy decides: request heads, ClientHellos, connections per address."""
from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from typing import Any

from filters.proxy import sni

FD_RESERVE = 64  # descriptors kept free per worker for the access log, metrics files, DNS, accept() itself


@dataclass(frozen=True)
class Limits:
    """proxy.* timeouts and limits as one worker applies them (defaults = the model's defaults)."""

    header_timeout: float = 30.0
    idle_timeout: float = 120.0
    tunnel_idle_timeout: float = 900.0
    hello_timeout: float = 10.0
    max_header_size: int = 65536
    max_url_length: int = 8192
    per_client: int = 256  # this worker's share of proxy.max_client_connections
    per_worker: int = 4096

    @classmethod
    def from_config(cls, cfg: Any, workers: int = 1, nofile: int | None = None) -> "Limits":
        p = cfg.proxy
        d = cls()

        def get(name: str, default: Any) -> Any:
            v = getattr(p, name, None)
            return default if v is None else v

        per_client = math.ceil(int(get("max_client_connections", 256)) / max(1, workers))
        mw = get("max_worker_connections", "auto")
        ceiling = worker_ceiling(nofile)
        per_worker = ceiling if mw == "auto" else min(int(mw), ceiling)
        return cls(float(get("header_timeout", d.header_timeout)), float(get("idle_timeout", d.idle_timeout)),
                   float(get("tunnel_idle_timeout", d.tunnel_idle_timeout)),
                   float(get("hello_timeout", d.hello_timeout)), int(get("max_header_size", d.max_header_size)),
                   int(get("max_url_length", d.max_url_length)), max(1, per_client), per_worker)


DEFAULTS = Limits()


def worker_ceiling(nofile: int | None = None) -> int:
    """Client connections one worker may hold: each may need an upstream socket too, and FD_RESERVE stay free."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:
        nofile = 1 << 20
    return max(16, (nofile - FD_RESERVE) // 2)


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at start, before the fork); returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


class Slots:
    """Open client connections of one worker, per client address and in all; take() says why not when full. The
    worker's budget is in sockets: 2 per client connection (itself and its first upstream socket), plus one for each
    further upstream socket it holds (take_extra(), filters.proxy.upstream)."""

    def __init__(self, per_client: int, per_worker: int):
        self.per_client, self.per_worker = per_client, per_worker
        self.by_client: dict[str, int] = {}
        self.total = 0
        self.extra = 0  # upstream sockets beyond the first of their client connection

    def _free(self) -> int:
        return 2 * self.per_worker - 2 * self.total - self.extra

    def take(self, client: str) -> str | None:
        """None and the slot is held (give it back with give()); else the refusal reason and nothing is held."""
        if self.total >= self.per_worker or self._free() < 2:
            return "worker-connections"
        n = self.by_client.get(client, 0)
        if n >= self.per_client:
            return "client-connections"
        self.by_client[client] = n + 1
        self.total += 1
        return None

    def give(self, client: str) -> None:
        n = self.by_client.get(client, 0) - 1
        if n > 0:
            self.by_client[client] = n
        else:
            self.by_client.pop(client, None)
        self.total -= 1

    def take_extra(self) -> bool:
        """One more upstream socket for a client connection that has one already; False when the budget is spent."""
        if self._free() < 1:
            return False
        self.extra += 1
        return True

    def give_extra(self) -> None:
        self.extra = max(0, self.extra - 1)


# ---------------------------------------------------------------- the ClientHello (tls: sni)

HELLO_REASONS = ("hello-timeout", "hello-too-large", "not-tls", "no-hello")


def hello_verdict(buf: bytes, timed_out: bool, max_size: int = sni.MAX_HELLO, eof: bool = False) -> tuple[str, Any]:
    """What to do with the first bytes a client sent in a `tls: sni` tunnel. Fails closed:

    ("need", None): read more; ("pass", sni): decide on the SNI (None: the hello names no server); ("gone", None):
    the client closed first; ("cut", reason): anything else (reason in HELLO_REASONS): nothing within the time,
    a partial ClientHello at the timeout, one larger than max_size, or bytes that are not a TLS ClientHello."""
    r = sni.parse(buf) if buf else sni.NEED_MORE
    if isinstance(r, str) or r is None:
        return "pass", r
    if r is sni.TOO_LARGE or (r is sni.NEED_MORE and len(buf) >= max_size):
        return "cut", "hello-too-large"
    if r is sni.NOT_TLS:
        return "cut", "not-tls"
    if eof:
        return "gone", None
    if timed_out:
        return "cut", "hello-timeout" if buf else "no-hello"
    return "need", None


# ---------------------------------------------------------------- request heads

HEAD_REASONS = {"header-too-large": 431, "url-too-long": 414, "bad-request": 400, "header-timeout": 408}
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class HeadError(ValueError):
    """A request head the proxy answers itself and closes: `reason` (HEAD_REASONS), its `status`, `why` for the log."""

    def __init__(self, reason: str, why: str):
        self.reason, self.why, self.status = reason, why, HEAD_REASONS[reason]
        super().__init__(f"{reason}: {why}")


def head_end(buf: bytes, max_header: int, max_url: int) -> int:
    """Where the request head in `buf` ends (index after its blank line), or -1 when more is needed. Raises
    HeadError as soon as the bytes so far are over a limit (an unfinished request line longer than max_url: 414;
    more than max_header bytes without the blank line: 431) or cannot be a request (a NUL, a bare CR)."""
    end = buf.find(b"\r\n\r\n", 0, max_header + 4)
    part = buf[:end + 4] if end >= 0 else buf[:max_header + 4]
    crlf = part.count(b"\r\n")
    if part.count(b"\n") != crlf:  # lenient readers (h11) end a head at LF LF or LF CR LF: never let them disagree
        raise HeadError("bad-request", "bare LF in the request head")
    if part.count(b"\r") != crlf + part.endswith(b"\r"):  # a CR at the very end may be followed by its LF
        raise HeadError("bad-request", "bare CR in the request head")
    line_end = buf.find(b"\n", 0, max_url + 64)
    if line_end < 0 and len(buf) > max_url + 32:
        raise HeadError("url-too-long", f"request line over {max_url} bytes")
    if end < 0:
        if len(buf) > max_header:
            raise HeadError("header-too-large", f"request head over {max_header} bytes")
        return -1
    return end + 4


def check_head(head: bytes, max_header: int, max_url: int) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(method, target, headers) of a whole request head (through its blank line), or HeadError. Strict where a
    lenient reader could disagree with the origin about where a request ends (RFC 9112 section 11.2, smuggling):
    a NUL, a bare CR or LF, obs-fold continuation lines, a malformed or whitespace-padded field name, both
    Content-Length and Transfer-Encoding, conflicting or non-numeric Content-Length, a Transfer-Encoding other than
    one final `chunked`; and the limits: the head over max_header (431), the target over max_url (414)."""
    if len(head) > max_header + 4:
        raise HeadError("header-too-large", f"request head of {len(head)} bytes (proxy.max_header_size {max_header})")
    if b"\x00" in head:
        raise HeadError("bad-request", "NUL byte in the request head")
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else None
    if lines is None:
        raise HeadError("bad-request", "the request head does not end with CRLF CRLF")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise HeadError("bad-request", "bare CR or LF in the request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TCHAR or not parts[2].startswith(b"HTTP/1."):
        if len(lines[0]) > max_url:
            raise HeadError("url-too-long", f"request line over {max_url} bytes")
        raise HeadError("bad-request", "malformed request line")
    method, target = parts[0], parts[1]
    if len(target) > max_url:
        raise HeadError("url-too-long", f"request target of {len(target)} bytes (proxy.max_url_length {max_url})")
    if not target or any(c <= 0x20 or c == 0x7F for c in target):
        raise HeadError("bad-request", "control character or space in the request target")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HeadError("bad-request", "obs-fold (a header continued on the next line)")
        name, sep, value = line.partition(b":")
        if not sep or not name or not set(name) <= _TCHAR:
            raise HeadError("bad-request", "malformed header line")
        if any(c < 0x20 and c != 0x09 or c == 0x7F for c in value):
            raise HeadError("bad-request", "control character in a header value")
        headers.append((name.lower(), value.strip(b" \t")))
    cls = [v for n, v in headers if n == b"content-length"]
    tes = [v for n, v in headers if n == b"transfer-encoding"]
    if cls and tes:
        raise HeadError("bad-request", "both Content-Length and Transfer-Encoding")
    if cls:
        values = {x.strip() for v in cls for x in v.split(b",")}
        if len(values) != 1:
            raise HeadError("bad-request", "conflicting Content-Length values")
        v = values.pop()
        if not v.isdigit() or len(v) > 18:
            raise HeadError("bad-request", "invalid Content-Length")
    if tes:
        codings = [x.strip().lower() for v in tes for x in v.split(b",") if x.strip()]
        if not codings or codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
            raise HeadError("bad-request", "Transfer-Encoding without a final chunked")
    return method, target, headers


REASON_PHRASE = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large",
                 503: "Service Unavailable"}


def answer_bytes(status: int, why: str) -> bytes:
    """A short plain-text answer of the proxy's own that closes the connection."""
    body = f"{status} {REASON_PHRASE.get(status, 'Error')}: {why}\n".encode("ascii", "replace")
    return (f"HTTP/1.1 {status} {REASON_PHRASE.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
