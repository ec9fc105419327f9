"""Access log in Squid's native format (fields escaped: one record is one line), one os.write per line (O_APPEND, shared by workers), reopened on SIGUSR1."""
from __future__ import annotations

import os
import time


def field(value: str) -> str:
    """One log field that can never split a line or a field: spaces, control characters (CR, LF, tab, NUL, DEL) and
    non-ASCII are percent-encoded (UTF-8, lone surrogates kept as their bytes); '%' itself is left as written."""
    if value.isascii() and value.isprintable() and " " not in value:
        return value or "-"
    raw = value.encode("utf-8", "surrogateescape") if value else b"-"
    return "".join(chr(b) if 0x20 < b < 0x7F else f"%{b:02X}" for b in raw)


def block_tag(category: str | None) -> str:
    """The trailing tag of a request blocked by a list category (docs/report.md)."""
    return f"block:{category or 'none'}"


def refusal_tag(reason: str) -> str:
    """The trailing tag of a request the appliance refused whatever the lists say (a guard, gate or limit reason)."""
    return f"refused:{reason}"


DENIED_TAG = "denied:client"  # a client outside proxy.clients


def squid_line(start: float, elapsed_ms: int, client: str, code: str, status: int, size: int, method: str,
               url: str, peer: str, mime: str, user: str = "-", tag: str = "") -> str:
    """`%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`; every text field through field(). A refused
    request gets one more field, ` [tag]` (block:CATEGORY, refused:REASON, denied:client), bracketed as Squid's
    log_mime_hdrs extras are, so calamaris -f squid-extended and sarg still read the line (docs/report.md)."""
    hier = "HIER_NONE/-" if not peer or peer == "-" else f"HIER_DIRECT/{field(peer)}"
    extra = f" [{field(tag).replace('[', '%5B').replace(']', '%5D')}]" if tag else ""
    return (f"{int(start)}.{int(start * 1000) % 1000:03d} {elapsed_ms:6d} {field(client)} {field(code)}/{status:03d} "
            f"{size} {field(method)} {field(url)} {field(user)} {hier} {field(mime or '-')}{extra}\n")


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
