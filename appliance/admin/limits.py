"""What keeps the server small under abuse: connection slots (total and per address), a total deadline for the
TLS handshake and request head, log lines rate-limited per address, and control characters escaped in the log."""
from __future__ import annotations

import io
import socket
import threading
import time
from typing import Callable

MAX_CONNECTIONS = 64     # connections served at once, all listeners together (each holds one thread)
MAX_PER_SOURCE = 8       # of which from one address (a browser opens up to 6)
HEAD_DEADLINE = 10.0     # seconds for the TLS handshake and the request head together (not per read)
CONN_TIMEOUT = 10.0      # one read or write once the head is in
LOG_EVERY = 60.0         # one log line per address and kind of event per minute, with the count
MAX_KEYS = 4096          # addresses remembered for that (memory stays bounded)


class Slots:
    """Connection slots: take() before a connection gets a thread, give() when its thread ends."""

    def __init__(self, total: int = MAX_CONNECTIONS, per_source: int = MAX_PER_SOURCE) -> None:
        self.total, self.per_source = total, per_source
        self.used: dict[str, int] = {}
        self.lock = threading.Lock()

    def take(self, ip: str) -> bool:
        with self.lock:
            if sum(self.used.values()) >= self.total or self.used.get(ip, 0) >= self.per_source:
                return False
            self.used[ip] = self.used.get(ip, 0) + 1
            return True

    def give(self, ip: str) -> None:
        with self.lock:
            n = self.used.get(ip, 0) - 1
            if n > 0:
                self.used[ip] = n
            else:
                self.used.pop(ip, None)

    def in_use(self) -> int:
        with self.lock:
            return sum(self.used.values())


class Throttle:
    """Whether a log line about (kind, address) is due: the first at once, then at most one per LOG_EVERY carrying
    how many events it stands for; 200 refused connections from one address make one line, not 200."""

    def __init__(self, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.clock = every, clock
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}
        self.lock = threading.Lock()

    def due(self, kind: str, ip: str) -> int | None:
        """None while a line for (kind, ip) went out less than `every` ago (the event is counted), else the
        number of events the line now due stands for."""
        key, now = (kind, ip), self.clock()
        with self.lock:
            last, count = self.seen.get(key, (None, 0))
            count += 1
            if last is not None and now - last < self.every:
                self.seen[key] = (last, count)
                return None
            if key not in self.seen and len(self.seen) >= MAX_KEYS:
                self.seen.pop(next(iter(self.seen)))
            self.seen[key] = (now, 0)
            return count


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}


def clean(text: str) -> str:
    """text with every control character (ESC, CR, LF, ...) written as \\xNN: a log line stays one honest line."""
    return text.translate(_CONTROL)


class DeadlineReader(io.RawIOBase):
    """A socket's reading side that fails (TimeoutError) once `deadline()` has passed, however the bytes trickle
    in: a client sending one byte every few seconds no longer holds its thread for ever."""

    def __init__(self, sock: socket.socket, deadline: Callable[[], float]) -> None:
        super().__init__()
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self.deadline() - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request head did not arrive in time")
        self.sock.settimeout(min(left, CONN_TIMEOUT))
        try:
            return self.sock.recv_into(buf)
        finally:
            self.sock.settimeout(CONN_TIMEOUT)  # what the writes of the answer then use
