"""The plain HTTP fast path's origin side: a pooled or new connection, the request and its body, the response streamed back."""
from __future__ import annotations

import logging
import socket
from typing import Any

from filters.proxy.gate import HeadError, answer_bytes
from filters.proxy.httpfast_io import MAX_RESPONSE_HEAD, Chunked, ResponseHead
from filters.proxy.sockio import recv, sendall
from filters.proxy.httpfast_pool import Pool
from filters.proxy.httpfast_req import Handover, Request
from filters.proxy.splice import _connect
from filters.proxy.tunnel import CONNECT_TIMEOUT, limits

log = logging.getLogger("filters.proxy.httpfast")
CHUNK = 65536


class _Stale(Exception):
    """A pooled connection the origin had closed: the request (one without a body) is sent again on a new one."""


class _Aborted(Exception):
    """The exchange broke after the response began (origin or client gone, bad framing): both sides are closed."""


def pool_of(state: Any) -> Pool:
    pool = getattr(state, "http_pool", None)
    if pool is None:
        pool = state.http_pool = Pool(getattr(state, "slots", None))
    return pool


async def _open(c: Any, addrs: list[str], port: int) -> socket.socket:
    loop = c.loop
    sock = await _connect(loop, addrs, port, loop.time() + CONNECT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def exchange(c: Any, req: Request, addrs: list[str], url: str) -> bool:
    """Send `req` to one of its checked `addrs` and stream the answer back; True when the client connection goes on.
    No connection to be had: Handover (mitmproxy tries again and answers its own 502, before anything was sent)."""
    pool = pool_of(c.state)
    sock = pool.get(addrs, req.port)
    reused = sock is not None
    if sock is None:
        try:
            sock = await _open(c, addrs, req.port)
        except OSError:
            raise Handover from None
    c.state.counters.requests += 1
    head = req.upstream_head()
    del c.buf[:len(req.head)]
    peer = sock.getpeername()[0]
    try:
        try:
            resp, ubuf, end = await _send(c, req, sock, head)
        except _Stale:
            sock.close()
            if not reused:
                raise OSError("the origin closed the connection without an answer") from None
            sock = await _open(c, addrs, req.port)
            peer = sock.getpeername()[0]
            resp, ubuf, end = await _send(c, req, sock, head)
    except HeadError as e:  # a chunked request body the front gate refuses (400), nothing answered yet
        sock.close()
        await c.refused_head(e, c.chunk_line)
        return False
    except (OSError, TimeoutError, ValueError, _Stale) as e:
        sock.close()
        return await _bad_gateway(c, req, url, e)
    try:
        keep_up, keep, size = await _relay(c, req, sock, resp, ubuf, end)
    except (_Aborted, OSError, TimeoutError, HeadError, ValueError) as e:
        sock.close()
        c.state.counters.errors += 1
        c.log(req, "TCP_MISS_ABORTED", resp.status, 0, url, peer, resp.mime())
        log.debug("http fast path: %s aborted: %s", url, e)
        return False
    if keep_up:
        pool.put(sock, peer, req.port)
    else:
        sock.close()
    c.log(req, "TCP_MISS", resp.status, size + 100, url, peer, resp.mime())
    return keep


async def _bad_gateway(c: Any, req: Request, url: str, e: BaseException) -> bool:
    """The origin failed before answering (after the request was sent): 502, counted, logged, closed."""
    c.state.counters.errors += 1
    log.info("http fast path: %s for %s: %s", url, c.client, e or type(e).__name__)
    body = f"502 Bad Gateway: {e or type(e).__name__}\n".encode("ascii", "replace")
    await c.send(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    c.log(req, "TCP_MISS", 502, 0, url)
    return False


async def _send(c: Any, req: Request, sock: socket.socket, head: bytes) -> tuple[ResponseHead, bytearray, int]:
    """The head and body upstream, then the response head (1xx interim answers passed on to the client)."""
    loop, lim = c.loop, limits(c.state)
    try:
        await sendall(loop, sock, head, loop.time() + lim.tunnel_idle_timeout)
    except OSError:
        if req.length or req.chunked:
            raise
        raise _Stale from None
    if req.length:
        await _body_length(c, req, sock)
    elif req.chunked:
        await _body_chunked(c, sock)
    ubuf = bytearray()
    while True:
        while (end := ubuf.find(b"\r\n\r\n")) < 0:
            if len(ubuf) > MAX_RESPONSE_HEAD:
                raise ValueError("response head from the origin too large")
            data = await recv(loop, sock, CHUNK, loop.time() + lim.tunnel_idle_timeout)
            if not data:
                if not ubuf and not (req.length or req.chunked):
                    raise _Stale
                raise OSError("the origin closed the connection before its response head ended")
            ubuf += data
        resp = ResponseHead(bytes(ubuf[:end + 4]))
        if resp.status == 101:
            raise ValueError("the origin switched protocols unasked")
        if resp.status >= 200:
            return resp, ubuf, end + 4
        await sendall(loop, c.conn, ubuf[:end + 4], loop.time() + lim.tunnel_idle_timeout)
        del ubuf[:end + 4]


async def _body_length(c: Any, req: Request, sock: socket.socket) -> None:
    loop, lim = c.loop, limits(c.state)
    left = req.length
    have = min(left, len(c.buf))
    if have:
        await sendall(loop, sock, c.buf[:have], loop.time() + lim.tunnel_idle_timeout)
        del c.buf[:have]
        left -= have
    while left:
        data = await recv(loop, c.conn, min(left, CHUNK), loop.time() + lim.tunnel_idle_timeout)
        if not data:
            raise OSError("the client closed before its request body ended")
        await sendall(loop, sock, data, loop.time() + lim.tunnel_idle_timeout)
        left -= len(data)


async def _body_chunked(c: Any, sock: socket.socket) -> None:
    """A chunked request body through the front gate's chunk rules (HeadError: 400 before anything is answered)."""
    loop, lim = c.loop, limits(c.state)
    ch = Chunked(lim.max_header_size)
    c.chunk_line = b""
    data = bytes(c.buf)
    c.buf.clear()
    while True:
        try:
            i = ch.advance(data)
        except HeadError:
            c.chunk_line = ch.line  # what the gate logs: the partial line it was reading (b"" once it was whole)
            raise
        if i:
            await sendall(loop, sock, data[:i], loop.time() + lim.tunnel_idle_timeout)
        if ch.done:
            c.buf += data[i:]  # the next request, pipelined
            return
        data = await recv(loop, c.conn, CHUNK, loop.time() + lim.tunnel_idle_timeout)
        if not data:
            raise OSError("the client closed before its chunked request body ended")


async def _relay(c: Any, req: Request, sock: socket.socket, resp: ResponseHead, ubuf: bytearray,
                 end: int) -> tuple[bool, bool, int]:
    """The response to the client as the origin framed it; (upstream reusable, client goes on, body size)."""
    loop, lim = c.loop, limits(c.state)
    kind, n = resp.framing(req.method)
    deadline = lim.tunnel_idle_timeout
    extra = False
    if kind == "none":
        extra = len(ubuf) > end
        await sendall(loop, c.conn, ubuf[:end], loop.time() + deadline)
        size = 0
    elif kind == "length":
        size = n
        first = min(len(ubuf), end + n)
        extra = len(ubuf) > end + n
        await sendall(loop, c.conn, ubuf[:first], loop.time() + deadline)
        left = end + n - first
        while left:
            data = await recv(loop, sock, min(left, CHUNK), loop.time() + deadline)
            if not data:
                raise _Aborted("the origin closed before its response body ended")
            await sendall(loop, c.conn, data, loop.time() + deadline)
            left -= len(data)
    elif kind == "chunked":
        ch = Chunked(MAX_RESPONSE_HEAD)
        i = ch.advance(ubuf, end)
        extra = len(ubuf) > i
        await sendall(loop, c.conn, ubuf[:i], loop.time() + deadline)
        while not ch.done:
            data = await recv(loop, sock, CHUNK, loop.time() + deadline)
            if not data:
                raise _Aborted("the origin closed before its chunked response ended")
            i = ch.advance(data)
            extra = len(data) > i
            await sendall(loop, c.conn, data[:i], loop.time() + deadline)
        size = ch.size
    else:  # until the origin closes: the client connection ends with it
        size = len(ubuf) - end
        await sendall(loop, c.conn, ubuf, loop.time() + deadline)
        while data := await recv(loop, sock, CHUNK, loop.time() + deadline):
            size += len(data)
            await sendall(loop, c.conn, data, loop.time() + deadline)
        return False, False, size
    closes = resp.closes()
    return not closes and not extra, not closes and not req.close, size
