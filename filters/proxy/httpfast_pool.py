"""The plain HTTP fast path's upstream keep-alive pool: idle origin connections per checked (address, port), bounded."""
from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import Any

PER_ORIGIN = 8  # idle connections kept per (address, port)
TOTAL = 256  # idle connections kept per worker
IDLE = 30.0  # seconds an idle connection is kept (origins commonly close theirs after 5-120 s)


def alive(sock: socket.socket) -> bool:
    """An idle upstream connection can take a request: nothing to read and no EOF (the origin has not closed it
    nor sent anything unasked)."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    return False


class Pool:
    """Idle upstream sockets, keyed by the checked address and port they were connected to (a request reuses one only
    after its own name resolved to that address and passed the guard). Each idle socket holds one socket of the
    worker's budget (gate.Slots.take_extra); none free: it is closed instead of kept. A timer closes what idles
    longer than IDLE."""

    def __init__(self, slots: Any = None, per_origin: int = PER_ORIGIN, total: int = TOTAL, idle: float = IDLE):
        self.slots, self.per_origin, self.total, self.idle = slots, per_origin, total, idle
        self.conns: dict[tuple[str, int], deque] = {}
        self.count = 0
        self.timer: asyncio.TimerHandle | None = None

    def get(self, addrs: list[str], port: int) -> socket.socket | None:
        """An idle, still open connection to one of `addrs` on `port`, taken out of the pool; None if there is none."""
        now = time.monotonic()
        for ip in addrs:
            dq = self.conns.get((ip, port))
            while dq:
                sock, since = dq.pop()  # the newest first: the least likely to have been closed by the origin
                self._taken(ip, port, dq)
                if now - since < self.idle and alive(sock):
                    return sock
                sock.close()
        return None

    def put(self, sock: socket.socket, ip: str, port: int) -> None:
        """Keep an idle connection whose last response ended cleanly; closed when the pool or the budget is full."""
        dq = self.conns.setdefault((ip, port), deque())
        if len(dq) >= self.per_origin or self.count >= self.total or not self._take_slot():
            if not dq:
                del self.conns[(ip, port)]
            sock.close()
            return
        dq.append((sock, time.monotonic()))
        self.count += 1
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.idle / 2, self.sweep)

    def _take_slot(self) -> bool:
        return self.slots is None or self.slots.take_extra()

    def _taken(self, ip: str, port: int, dq: deque) -> None:
        self.count -= 1
        if self.slots is not None:
            self.slots.give_extra()
        if not dq:
            del self.conns[(ip, port)]

    def sweep(self) -> None:
        """Close connections idle longer than IDLE or closed by their origin; again in IDLE/2 while any is kept."""
        self.timer = None
        now = time.monotonic()
        for key in list(self.conns):
            dq = self.conns[key]
            keep = deque(x for x in dq if now - x[1] < self.idle and alive(x[0]))
            for x in dq:
                if x not in keep:
                    x[0].close()
                    self.count -= 1
                    if self.slots is not None:
                        self.slots.give_extra()
            if keep:
                self.conns[key] = keep
            else:
                del self.conns[key]
        if self.count:
            self.timer = asyncio.get_running_loop().call_later(self.idle / 2, self.sweep)

    def close(self) -> None:
        for dq in self.conns.values():
            for sock, _ in dq:
                sock.close()
                if self.slots is not None:
                    self.slots.give_extra()
        self.conns.clear()
        self.count = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
