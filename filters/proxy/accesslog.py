"""Access log in Squid's native format, one os.write per line (O_APPEND, shared by workers), reopened on SIGUSR1."""
from __future__ import annotations

import os
import time


def squid_line(start: float, elapsed_ms: int, client: str, code: str, status: int, size: int, method: str,
               url: str, peer: str, mime: str, user: str = "-") -> str:
    """`%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`"""
    hier = "HIER_NONE/-" if not peer or peer == "-" else f"HIER_DIRECT/{peer}"
    return (f"{int(start)}.{int(start * 1000) % 1000:03d} {elapsed_ms:6d} {client} {code}/{status:03d} {size} "
            f"{method} {url.replace(' ', '%20')} {user} {hier} {mime or '-'}\n")


class AccessLog:
    def __init__(self, path: str | None):
        self.path = path
        self.fd: int | None = None
        self.reopen()

    def reopen(self) -> None:
        old = self.fd
        if not self.path or self.path == "none":
            self.fd = None
        elif self.path == "-":
            self.fd = 1
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if old not in (None, 1) and old != self.fd:
            os.close(old)

    def write(self, line: str) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, line.encode("utf-8", "replace"))
            except OSError:
                pass  # a full disk must not take the proxy down

    def log(self, **kw) -> None:
        if self.fd is not None:
            self.write(squid_line(**kw))

    def close(self) -> None:
        if self.fd not in (None, 1):
            os.close(self.fd)
        self.fd = None


def now() -> float:
    return time.time()
