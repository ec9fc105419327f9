"""The `tls: sni` CONNECT fast path in plain asyncio: decide on the CONNECT host and the SNI, then splice the sockets."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from filters.hosts import BadHost, Host, host_port, shown
from filters.proxy import gate, sni, sockio, verdict
from filters.proxy.accesslog import refusal_tag
from filters.proxy.gate import REASON_PHRASE, answer_bytes  # noqa: F401 - the worker and tests take them here
from filters.proxy.guard import Refusal, bad_host
from filters.proxy.splice import HIGH_WATER, _connect, _link, _Pipe, _splice, _Tunnel  # noqa: F401 - tests reach them here

log = logging.getLogger("filters.proxy.tunnel")
CONNECT_TIMEOUT = 15.0
# The CONNECT head's size and time, the ClientHello's time and the idle tunnel come from proxy.* (gate.Limits):
# state.limits, set by the worker (lean.make_state) and on reload; gate.Limits() defaults when a state has none.


def limits(state: Any) -> gate.Limits:
    return getattr(state, "limits", None) or gate.DEFAULTS


def refused(state: Any, reason: str) -> None:
    """Count a refusal of the fast path's own (gate reasons) in appliance_proxy_refused_total{reason}."""
    refuse = getattr(state.counters, "refuse", None)
    if refuse is not None:
        refuse(reason)


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
        """host:port; a target the host model could not read (port 0) as the client wrote it (escaped)."""
        return f"{self.host}:{self.port}" if self.port else self.host

    def log(self, code: str, status: int, size: int, url: str | None = None, peer: str = "-", tag: str = "") -> None:
        verdict.log_connect(self.state.access, self.start, self.client, code, status, size, url or self.hostport, peer,
                            tag)


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
        req.log("TCP_DENIED", 403, len(resp), tag=verdict.tag_of(d))
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
                chunk = await sockio.recv(loop, conn, 65536, deadline)
            except (TimeoutError, asyncio.TimeoutError):
                raise gate.HeadError("header-timeout", f"no whole CONNECT head within {lim.header_timeout:g} s") from None
            if not chunk:
                raise ValueError("client closed before the CONNECT header ended")
            buf += chunk
    except gate.HeadError as e:
        refused(req.state, e.reason)
        log.info("CONNECT from %s refused: %s", req.client, e)
        await _answer(loop, conn, e.status, e.why)
        req.log("TCP_DENIED", e.status, 0, url="-", tag=refusal_tag(e.reason))
        raise
    return buf[:end], buf[end:]


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
    req.log("TCP_DENIED", r.status, len(resp), tag=verdict.tag_of(r))
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
            chunk = await sockio.recv(loop, conn, max(1, sni.MAX_HELLO + 1 - len(rest)), deadline)
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
        req.log("TCP_DENIED", 403, 0, tag=refusal_tag(name))
        conn.close()
        return None
    d = verdict.sni_block(req.state.engine, req.client, req.host, name) if isinstance(name, str) else None
    if d is None:
        return rest
    verdict.cut(req.state, d, req.hostport, name, log)
    up.close()
    req.log("TCP_DENIED", 403, 0, f"{name}:{req.port}", tag=verdict.tag_of(d))
    conn.close()
    return None


def _close_soon(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    conn.close()
