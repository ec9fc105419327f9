"""The plain HTTP/1.1 fast path (proxy.http_fast_path): the addon's checks and answers without mitmproxy; the rest goes to it."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Awaitable, Callable

from filters.proxy import httpfast_up, pac, verdict
from filters.proxy.front import refusal_logger
from filters.proxy.gate import HeadError, answer_bytes, head_end
from filters.proxy.guard import Refusal
from filters.proxy.sockio import recv, sendall
from filters.proxy.httpfast_req import Handover, Request, canonical, parse
from filters.proxy.tunnel import limits

log = logging.getLogger("filters.proxy.httpfast")
SEND_TIMEOUT = 30.0  # seconds a client may take to accept one of the proxy's own answers


class Conn:
    """One client connection on the fast path: reads heads within the front gate's limits and timers, answers the
    proxy's own pages, blocks and refusals, and passes the rest through filters.proxy.httpfast_up. `buf` holds what
    the client sent that is not answered yet: on Handover it all goes to mitmproxy, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, state: Any):
        self.loop, self.conn, self.state = loop, conn, state
        self.client = conn.getpeername()[0]
        self.sockname = conn.getsockname()[0]
        self.buf = bytearray()
        self.first = True
        self.start = 0.0  # wall time of the current request's first byte (the log's timestamp)
        self.refuse = refusal_logger(state, self.client)
        self.chunk_line = b""  # a refused chunked body: the line the gate logs (httpfast_up)

    async def run(self) -> None:
        """Requests one after another until the connection ends (or Handover: raised to serve())."""
        while True:
            head = await self.read_head()
            if head is None:
                return
            lim = limits(self.state)
            req = parse(head, lim.max_header_size, lim.max_url_length)
            keep = await self.local(req) if self.is_local(req) else await self.decide(req, httpfast_up.exchange)
            if not keep:
                return
            self.first = False

    async def read_head(self) -> bytes | None:
        """The next whole request head (left in `buf` until it is answered); None when the connection is over: the
        client closed, idled out (proxy.idle_timeout; header_timeout before its first request), or a partial head
        ran out of proxy.header_timeout (408, refused and logged as the front gate does). A head the gate refuses
        (431, 414, 400) is handed to mitmproxy, whose gate refuses it the same way."""
        lim = limits(self.state)
        loop = self.loop
        deadline = loop.time() + (lim.header_timeout if self.first else lim.idle_timeout)
        started = False
        while True:
            if self.buf and not started:
                started, deadline, self.start = True, loop.time() + lim.header_timeout, time.time()
            try:
                end = head_end(self.buf, lim.max_header_size, lim.max_url_length)
            except HeadError:
                raise Handover from None
            if end >= 0:
                return bytes(self.buf[:end])
            try:
                data = await recv(loop, self.conn, 65536, deadline)
            except TimeoutError:
                if self.buf:
                    await self.refused_head(HeadError("header-timeout",
                                                      f"no whole request head within {lim.header_timeout:g} s"))
                return None
            if not data:
                return None
            self.buf += data

    async def refused_head(self, e: HeadError, head: bytes | None = None) -> None:
        """The front gate's refusal: counted, logged TCP_DENIED with the head's method and URL, answered, closed."""
        self.refuse(e.reason, e.status, e.why, bytes(self.buf) if head is None else head)
        await self.send(answer_bytes(e.status, e.why))

    async def send(self, data: bytes | bytearray) -> None:
        try:
            await sendall(self.loop, self.conn, data, self.loop.time() + SEND_TIMEOUT)
        except (OSError, TimeoutError):
            pass

    def log(self, req: Request, code: str, status: int, size: int, url: str, peer: str = "-", mime: str = "-",
            tag: str = "") -> None:
        acc = self.state.access
        if acc.fd is not None:
            acc.log(start=self.start, elapsed_ms=int((time.time() - self.start) * 1000), client=self.client, code=code,
                    status=status, size=size, method=req.method.decode("latin-1"), url=url, peer=peer, mime=mime,
                    tag=tag)

    # ------------------------------------------------------------ the proxy's own pages

    def is_local(self, req: Request) -> bool:
        st = self.state
        if req.port == st.port and (req.raw_host in st.self_hosts or req.raw_host == self.sockname):
            return True
        if req.origin_form:
            raise Handover  # origin-form to another host: mitmproxy's reading of the Host header
        return False

    async def local(self, req: Request) -> bool:
        """/healthz, /proxy.pac, /wpad.dat, /ca.pem (intercept), else 404: as the addon answers them (TCP_MEM_HIT)."""
        st = self.state
        if req.length or req.chunked:
            raise Handover  # mitmproxy reads and drops the body first
        st.counters.requests += 1
        path = req.path.split("?", 1)[0]
        status, extra = 200, b""
        if path == "/healthz":
            body, ctype = b"ok\n", "text/plain"
        elif path in ("/proxy.pac", "/wpad.dat"):
            body, ctype = st.pacs.for_client(self.client), pac.CONTENT_TYPE
        elif path == "/ca.pem" and st.ca_pem:
            body, ctype = st.ca_pem, "application/x-x509-ca-cert"
            extra = b'Content-Disposition: attachment; filename="carpguard-ca.pem"\r\n'
        else:
            status, body, ctype = 404, b"not found\n", "text/plain"
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%scontent-length: %d\r\n\r\n"
                % (status, b"OK" if status == 200 else b"Not Found", ctype.encode(), extra, len(body)))
        del self.buf[:len(req.head)]
        await sendall(self.loop, self.conn, head + body, self.loop.time() + SEND_TIMEOUT)
        self.log(req, "TCP_MEM_HIT", status, len(body) + 100, req.pretty_url, mime=ctype.split(";")[0])
        return not req.close

    # ------------------------------------------------------------ the addon's request hook

    async def decide(self, req: Request, exchange: Callable[..., Awaitable[bool]]) -> bool:
        """The addon's order: canonical host (an unreadable one: Handover), client ACL, the guard's target rules and
        the Host header, the lists, every address the name resolves to; then the origin (httpfast_up.exchange)."""
        st = self.state
        host = canonical(req)
        url = f"http://{host.authority}{'' if req.port == 80 else f':{req.port}'}{req.path}"
        d = st.engine.decide(self.client, host.name, url)
        if d.verdict == "deny":
            return await self.answer(req, d, url)
        r = st.dest.check_target(host, req.port, False) or \
            st.dest.guard.host_header_mismatch(host, req.header(b"host"), req.port, 80)
        if r is None and d.blocked:
            return await self.answer(req, d, url)
        if r is None:
            try:
                addrs, r = await st.dest.resolve(host, req.port)
            except (OSError, TimeoutError, UnicodeError):
                raise Handover from None  # mitmproxy answers an unresolvable name with its own 502
        if r is not None:
            log.info("refused %s for %s: %s", url, self.client, r.text)
            return await self.answer(req, r, url)
        return await exchange(self, req, addrs, url)

    async def answer(self, req: Request, d: Any, url: str) -> bool:
        """The block page for a decision, or a Refusal's page, as the addon sends it (counted): Connection: close."""
        if req.length or req.chunked:
            raise Handover  # mitmproxy answers only once the whole body is read: never close on an unread body
        st = self.state
        st.counters.requests += 1
        if isinstance(d, Refusal):
            resp = verdict.refuse_guard(st, d, url, self.client, req.accept)
        else:
            resp = verdict.refuse(st, d, url, self.client, req.accept)
        await self.send(resp.http11())
        self.log(req, "TCP_DENIED", resp.status, len(resp.body) + 100, url, mime=resp.content_type.split(";")[0],
                 tag=verdict.tag_of(d))
        return False


async def serve(conn: socket.socket, state: Any, handover: Callable[[socket.socket, bytes], Awaitable[Any]]) -> None:
    """Serve a plain HTTP client connection (its first byte is there, it is not a CONNECT); always closes `conn` or
    hands it to `handover(conn, unanswered bytes)` (the mitmproxy path)."""
    loop = asyncio.get_running_loop()
    try:
        c = Conn(loop, conn, state)
    except OSError:
        conn.close()
        return
    try:
        await c.run()
    except Handover:
        await handover(conn, bytes(c.buf))
        return
    except (OSError, TimeoutError) as e:
        log.debug("http fast path: %s", e)
    except Exception:  # noqa: BLE001 - a bug here must cost one connection, never the worker
        log.exception("http fast path: connection from %s failed", c.client)
    _close(conn)


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    conn.close()
