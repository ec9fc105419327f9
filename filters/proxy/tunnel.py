"""The `tls: sni` CONNECT fast path in plain asyncio: decide on the CONNECT host and the SNI, then splice the sockets."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from filters.hosts import BadHost, Host, host_port, shown
from filters.proxy import gate, sni, verdict
from filters.proxy.guard import Refusal, bad_host

log = logging.getLogger("filters.proxy.tunnel")
CONNECT_TIMEOUT = 15.0
HIGH_WATER = 256 * 1024  # per direction: reading pauses while the other side has this much unsent
# The CONNECT head's size and time, the ClientHello's time and the idle tunnel come from proxy.* (gate.Limits):
# state.limits, set by the worker (lean.make_state) and on reload; gate.Limits() defaults when a state has none.


def limits(state: Any) -> gate.Limits:
    return getattr(state, "limits", None) or gate.DEFAULTS


def refused(state: Any, reason: str) -> None:
    """Count a refusal of the fast path's own (gate reasons) in appliance_proxy_refused_total{reason}."""
    refuse = getattr(state.counters, "refuse", None)
    if refuse is not None:
        refuse(reason)


async def readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _recv(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, deadline: float) -> bytes:
    """One recv of up to n bytes, waiting at most until `deadline` (loop time); raises TimeoutError."""
    while True:
        try:
            return sock.recv(n)
        except (BlockingIOError, InterruptedError):
            pass
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError
        await asyncio.wait_for(readable(loop, sock), left)


def read_connect(head: bytes) -> tuple[str, str | None]:
    """b"CONNECT target HTTP/1.1\\r\\nAccept: ...\\r\\n\\r\\n" -> (target as written, accept header); ValueError for
    a request line that is not a CONNECT. The target is not yet a host: connect_target() reads it."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "CONNECT" or not parts[2].startswith("HTTP/1.") or not parts[1]:
        raise ValueError("bad CONNECT request line")
    accept = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    return parts[1], accept


def connect_target(target: str) -> tuple[Host, int]:
    """A CONNECT target through the one host model (hosts.host_port): (canonical Host, port); BadHost if unreadable
    or without a port."""
    host, port = host_port(target)
    if port is None:
        raise BadHost(target, "a CONNECT target needs a port")
    return host, port


def parse_connect(head: bytes) -> tuple[str, int, str | None]:
    """read_connect + connect_target: (canonical host name, port, accept header); ValueError (BadHost) if bad."""
    target, accept = read_connect(head)
    host, port = connect_target(target)
    return host.name, port, accept


class _Pipe(asyncio.Protocol):
    """One side of a spliced tunnel: what it reads goes to the peer; pauses when the peer is slow (bounded)."""

    def __init__(self, tun: "_Tunnel", down: bool):
        self.tun, self.down, self.peer, self.transport = tun, down, None, None
        self.closed = self.eof = False
        self.held: list[bytes] | None = []  # what arrived before both sides were linked (None once linked)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER)
        transport.pause_reading()  # until both sides are linked (uvloop may still deliver data first: held)

    def data_received(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
            return
        self.tun.active = True
        if self.peer.transport.is_closing():
            return
        if self.down:
            self.tun.down_bytes += len(data)
        else:
            self.tun.up_bytes += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.held is not None:
            return True  # half-closed; link() passes it on after what was held
        pt = self.peer.transport
        if self.peer.eof or pt.is_closing() or not pt.can_write_eof():
            pt.close()  # both directions are done: close both (each flushes what is still buffered)
            return False
        pt.write_eof()  # half close; the peer may still answer
        return True

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer.transport is None:
            self.tun.finish()
            return
        if not self.peer.transport.is_closing():
            self.peer.transport.close()  # flushes what is buffered, then closes
        if self.peer.closed or self.peer.transport.is_closing():
            self.tun.finish()


def _link(pipes: tuple["_Pipe", "_Pipe"]) -> None:
    """Both transports exist: forward what either side delivered early, in order, then an early EOF; start reading."""
    held = [(p, p.held) for p in pipes]
    for p in pipes:
        p.held = None
    for p, data in held:
        for chunk in data or ():
            p.data_received(chunk)
    for p in pipes:
        if p.eof and not p.closed and not p.transport.is_closing():
            if not p.eof_received():
                p.transport.close()
    for p in pipes:
        if not p.transport.is_closing():
            p.transport.resume_reading()


class _Tunnel:
    """One spliced CONNECT tunnel: counts the bytes both ways, logs one TCP_TUNNEL record when both sides are done."""

    def __init__(self, req: "_Request", peer_ip: str, idle: float = gate.Limits.tunnel_idle_timeout):
        self.req, self.peer_ip = req, peer_ip
        self.up_bytes = self.down_bytes = 0
        self.done = self.active = False
        self.idle, self.timer, self.pipes, self.idle_since = idle, None, (), 0.0

    def start(self, loop: asyncio.AbstractEventLoop, pipes: tuple) -> None:
        """Both sides linked: watch for proxy.tunnel_idle_timeout without a byte either way (checked 4 times in it)."""
        self.loop, self.pipes, self.idle_since = loop, pipes, loop.time()
        if not self.done:
            self.timer = loop.call_later(max(0.05, self.idle / 4), self._tick)

    def _tick(self) -> None:
        if self.done:
            return
        now = self.loop.time()
        if self.active:
            self.active, self.idle_since = False, now
        elif now - self.idle_since >= self.idle:
            log.info("tunnel to %s idle for %.0f s: closed", self.req.hostport, now - self.idle_since)
            for p in self.pipes:
                if p.transport is not None and not p.transport.is_closing():
                    p.transport.close()
            return
        self.timer = self.loop.call_later(max(0.05, self.idle / 4), self._tick)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.req.log("TCP_TUNNEL", 200, self.down_bytes, peer=self.peer_ip)
        if self.req.done is not None:
            self.req.done()


@dataclass
class _Request:
    """The CONNECT being served: who asked, for what, since when."""

    state: Any
    start: float
    client: str
    host: str = ""
    port: int = 0
    done: Any = None  # called once when the client connection is over (the worker's connection slot)

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self, code: str, status: int, size: int, url: str | None = None, peer: str = "-") -> None:
        verdict.log_connect(self.state.access, self.start, self.client, code, status, size, url or self.hostport, peer)


async def _connect(loop: asyncio.AbstractEventLoop, addrs: list[str], port: int, deadline: float) -> socket.socket:
    """A connection to the first of `addrs` (checked addresses, no names: nothing is resolved here) that answers."""
    err: Exception = OSError("no address")
    for ip in addrs:
        v6 = ":" in ip
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        s.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(s, (ip, port, 0, 0) if v6 else (ip, port)),
                                   max(0.1, deadline - loop.time()))
            return s
        except (OSError, asyncio.TimeoutError) as e:
            s.close()
            err = e
    raise err


async def handle(conn: socket.socket, state: Any, done: Any = None) -> None:
    """Serve one client connection that starts with CONNECT (tls: sni); always closes or hands on `conn`.
    `done()` is called once when the connection is over (now, or when a spliced tunnel closes)."""
    loop = asyncio.get_running_loop()
    tun = None
    try:
        tun = await _handle(loop, conn, state, done)
        conn = None  # closed, or owned by the transports now
    except (OSError, TimeoutError, asyncio.TimeoutError, ValueError) as e:
        log.debug("tunnel: %s", e)
    finally:
        if conn is not None:
            conn.close()
        if tun is None and done is not None:
            done()


async def _handle(loop: asyncio.AbstractEventLoop, conn: socket.socket, state: Any, done: Any = None) -> "_Tunnel | None":
    req = _Request(state, time.time(), conn.getpeername()[0])
    head, rest = await _read_head(loop, conn, req)
    try:
        target, accept = read_connect(head)
    except ValueError:
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        raise
    state.counters.requests += 1
    state.counters.connects += 1
    # the target through the one check the mitmproxy path makes too: host model, client ACL, guard, lists
    try:
        host, req.port = connect_target(target)
    except BadHost as e:
        req.host = shown(target, 200)[1:-1]
        return await _refuse(loop, conn, req, bad_host(e), accept)
    req.host = host.authority
    d = state.engine.decide(req.client, host.name)
    r = None if d.verdict == "deny" else state.dest.check_target(host, req.port, True)
    if r is not None:
        return await _refuse(loop, conn, req, r, accept)
    if d.blocked:
        resp = verdict.refuse(state, d, req.hostport, req.client, accept).http11()
        await loop.sock_sendall(conn, resp)
        req.log("TCP_DENIED", 403, len(resp))
        return _close_soon(conn)
    up = await _open_upstream(loop, conn, req, host, accept)
    if up is None:
        return _close_soon(conn)
    try:
        await loop.sock_sendall(conn, b"HTTP/1.1 200 Connection established\r\n\r\n")
        rest = await _check_hello(loop, conn, up, req, rest)
        if rest is None:
            return None
        req.done = done
        return await _splice(loop, conn, up, req, rest)
    except BaseException:
        req.done = None
        up.close()
        raise


async def _splice(loop: asyncio.AbstractEventLoop, conn: socket.socket, up: socket.socket, req: _Request,
                  rest: bytes) -> "_Tunnel":
    """Link client and upstream. What the client sent so far goes upstream first, written to the upstream socket before
    either transport exists, so nothing the client sends later (data or EOF) can overtake it; data a transport
    delivers before both are linked is held and forwarded in order (_link)."""
    lim = limits(req.state)
    if rest:
        await asyncio.wait_for(loop.sock_sendall(up, rest), lim.tunnel_idle_timeout)
    tun = _Tunnel(req, up.getpeername()[0], lim.tunnel_idle_timeout)
    tun.up_bytes += len(rest)
    a, b = _Pipe(tun, down=False), _Pipe(tun, down=True)
    a.peer, b.peer = b, a
    await loop.connect_accepted_socket(lambda: b, sock=up)
    try:
        await loop.connect_accepted_socket(lambda: a, sock=conn)
    except BaseException:
        b.transport.close()
        raise
    _link((a, b))
    tun.start(loop, (a, b))
    return tun


async def _read_head(loop: asyncio.AbstractEventLoop, conn: socket.socket, req: _Request) -> tuple[bytes, bytes]:
    """(the CONNECT head up to its blank line, what the client sent behind it), within proxy.header_timeout and
    proxy.max_header_size / max_url_length. Over a limit or out of time: answered (431, 414, 400, 408), counted,
    ValueError."""
    lim = limits(req.state)
    deadline = loop.time() + lim.header_timeout
    buf = b""
    try:
        while (end := gate.head_end(buf, lim.max_header_size, lim.max_url_length)) < 0:
            try:
                chunk = await _recv(loop, conn, 65536, deadline)
            except (TimeoutError, asyncio.TimeoutError):
                raise gate.HeadError("header-timeout", f"no whole CONNECT head within {lim.header_timeout:g} s") from None
            if not chunk:
                raise ValueError("client closed before the CONNECT header ended")
            buf += chunk
    except gate.HeadError as e:
        refused(req.state, e.reason)
        log.info("CONNECT from %s refused: %s", req.client, e)
        await _answer(loop, conn, e.status, e.why)
        req.log("TCP_DENIED", e.status, 0, url="-")
        raise
    return buf[:end], buf[end:]


REASON_PHRASE = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large",
                 503: "Service Unavailable"}


def answer_bytes(status: int, why: str) -> bytes:
    """A short plain-text answer of the proxy's own that closes the connection."""
    body = f"{status} {REASON_PHRASE.get(status, 'Error')}: {why}\n".encode("ascii", "replace")
    return (f"HTTP/1.1 {status} {REASON_PHRASE.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


async def _answer(loop: asyncio.AbstractEventLoop, conn: socket.socket, status: int, why: str) -> None:
    try:
        await asyncio.wait_for(loop.sock_sendall(conn, answer_bytes(status, why)), 5.0)
    except (OSError, asyncio.TimeoutError):
        pass


async def _refuse(loop: asyncio.AbstractEventLoop, conn: socket.socket, req: _Request, r: Refusal,
                  accept: str | None) -> None:
    """A guard refusal: the block page with the Refusal's status, counted by reason, logged TCP_DENIED/<status>."""
    resp = verdict.refuse_guard(req.state, r, req.hostport, req.client, accept).http11()
    log.info("CONNECT %s from %s refused: %s", req.hostport, req.client, r.text)
    await loop.sock_sendall(conn, resp)
    req.log("TCP_DENIED", r.status, len(resp))
    return _close_soon(conn)


async def _open_upstream(loop: asyncio.AbstractEventLoop, conn: socket.socket, req: _Request, host: Host,
                         accept: str | None = None) -> socket.socket | None:
    """The connection to the CONNECT target: every address the name resolves to passes the guard, and only those are
    connected to (DNS rebinding cannot slip another in). None after answering: the block page for a refused address,
    502 when nothing answers (counted, logged)."""
    deadline = loop.time() + CONNECT_TIMEOUT
    try:
        addrs, r = await asyncio.wait_for(req.state.dest.resolve(host, req.port), CONNECT_TIMEOUT)
        if r is not None:
            await _refuse(loop, conn, req, r, accept)
            return None
        return await _connect(loop, addrs, req.port, deadline)
    except (OSError, asyncio.TimeoutError, UnicodeError) as e:
        req.state.counters.errors += 1
        msg = f"cannot connect to {req.hostport}: {e or type(e).__name__}\n".encode()
        await loop.sock_sendall(conn, b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                                      b"Content-Length: %d\r\n\r\n" % len(msg) + msg)
        req.log("TCP_MISS", 502, 0)
        return None


async def _check_hello(loop: asyncio.AbstractEventLoop, conn: socket.socket, up: socket.socket, req: _Request,
                       rest: bytes) -> bytes | None:
    """Read the ClientHello and decide again on its SNI (a client may CONNECT to an allowed host and name a blocked
    one). Fails closed (gate.hello_verdict): no ClientHello, a partial one at proxy.hello_timeout, one over
    sni.MAX_HELLO, or bytes that are not one: cut, counted and logged with the reason. Returns what the client sent so
    far, to forward; None when the tunnel ended here (client gone, or cut)."""
    deadline = loop.time() + limits(req.state).hello_timeout
    timed_out = eof = False
    while (v := gate.hello_verdict(rest, timed_out, sni.MAX_HELLO, eof))[0] == "need":
        try:
            chunk = await _recv(loop, conn, max(1, sni.MAX_HELLO + 1 - len(rest)), deadline)
        except (TimeoutError, asyncio.TimeoutError):
            timed_out = True
            continue
        if not chunk:
            eof = True
        rest += chunk
    what, name = v
    if what == "gone":
        up.close()
        req.log("TCP_TUNNEL", 200, 0)
        _close_soon(conn)
        return None
    if what == "cut":
        refused(req.state, name)
        log.info("cut tunnel to %s from %s: %s (%d bytes read)", req.hostport, req.client, name, len(rest))
        up.close()
        req.log("TCP_DENIED", 403, 0)
        conn.close()
        return None
    d = verdict.sni_block(req.state.engine, req.client, req.host, name) if isinstance(name, str) else None
    if d is None:
        return rest
    verdict.cut(req.state, d, req.hostport, name, log)
    up.close()
    req.log("TCP_DENIED", 403, 0, f"{name}:{req.port}")
    conn.close()
    return None


def _close_soon(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    conn.close()
