"""The `tls: sni` fast path's splice: client and upstream sockets linked in asyncio, bytes in order, idle tunnels closed."""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from filters.proxy import gate

log = logging.getLogger("filters.proxy.tunnel")
HIGH_WATER = 256 * 1024  # per direction: reading pauses while the other side has this much unsent


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

    def __init__(self, req: Any, peer_ip: str, idle: float = gate.Limits.tunnel_idle_timeout):
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


async def _splice(loop: asyncio.AbstractEventLoop, conn: socket.socket, up: socket.socket, req: Any,
                  rest: bytes) -> "_Tunnel":
    """Link client and upstream. What the client sent so far goes upstream first, written to the upstream socket before
    either transport exists, so nothing the client sends later (data or EOF) can overtake it; data a transport
    delivers before both are linked is held and forwarded in order (_link)."""
    lim = getattr(req.state, "limits", None) or gate.DEFAULTS
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
