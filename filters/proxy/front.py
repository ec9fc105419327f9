"""The mitmproxy path's front gate: every client request head within proxy.* limits and unambiguous before mitmproxy parses it."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from filters.proxy.accesslog import refusal_tag
from filters.proxy.framing import HeadScanner
from filters.proxy.gate import HeadError, Limits, answer_bytes

log = logging.getLogger("filters.proxy.front")
GATES: dict[tuple, "GateReader"] = {}  # client (ip, port) -> its gate, for the addon's response hook (one worker)
RECHECK = 1.0  # seconds between looks at a connection whose request waits for the origin (is it idle now?)


class GateReader:
    """Stands in for the StreamReader mitmproxy reads a client from (it only calls read(n)). Follows the client's
    HTTP/1 framing (framing.HeadScanner) and, before passing bytes on, refuses with its own answer and a close: a head
    over proxy.max_header_size (431) or with a target over max_url_length (414), an ambiguous head (gate.check_head:
    400), an invalid chunk size (400), a head not complete within header_timeout (408). A client idle between
    requests longer than idle_timeout (or than header_timeout before its first byte) is closed. After a CONNECT or
    an Upgrade request nothing more is read until the addon's hooks say how it was answered (decide()): a 2xx to
    CONNECT or a 101 makes the rest opaque (mitmproxy's tunnel; idle after tunnel_idle_timeout), anything else keeps
    the checks on. `refuse(reason, status, why, head)` counts and logs a refusal."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: Limits,
                 refuse: Callable[[str, int, str, bytes], None], key: tuple | None = None):
        self.r, self.w, self.lim, self.refuse = reader, writer, limits, refuse
        self.loop = asyncio.get_running_loop()
        self.scan = HeadScanner(limits, self.loop.time())
        self.closed = False
        self.decided = asyncio.Event()
        self.key = key
        if key is not None:
            GATES[key] = self

    @property
    def state(self) -> str:
        return self.scan.state

    @property
    def pending(self) -> int:
        return self.scan.pending

    @pending.setter
    def pending(self, n: int) -> None:
        self.scan.pending = n

    def responded(self) -> None:
        """The addon saw a response (or error) for one of this client's requests."""
        self.scan.responded(self.loop.time())

    def decide(self, switched: bool) -> None:
        """The answer to a CONNECT / Upgrade request was sent (addon hooks): switched protocols or not."""
        if self.scan.decide(switched, self.loop.time()):
            self.decided.set()

    def abort(self) -> None:
        """Close the client connection now (the addon cut a tunnel whose ClientHello never came whole)."""
        if not self.w.is_closing():
            self.w.close()
        self.close()
        self.decided.set()

    def close(self) -> None:
        self.closed = True
        if self.key is not None and GATES.get(self.key) is self:
            del GATES[self.key]

    async def read(self, n: int = -1) -> bytes:
        """The client's next bytes that passed the gate: a head only once it is whole and checked (mitmproxy never
        sees a head the gate has not read the same way), body bytes as they come. b"" at EOF, a refusal or a timeout."""
        while True:
            if self.closed:
                return b""
            if self.scan.state == "wait":
                data = await self._wait_decision()
            else:
                data = await self._read_raw(n)
                if not data:
                    return data
            try:
                out = self.scan.scan(data, self.loop.time())
                if self.scan.held_over():
                    raise HeadError("header-too-large", "bytes sent before the answer to a CONNECT or Upgrade")
            except HeadError as e:
                self._refuse(e)
                self.close()
                return b""
            if out:
                return out

    async def _wait_decision(self) -> bytes:
        """In "wait": read nothing until decide() (or a close); then what was held behind the request."""
        while self.scan.state == "wait" and not self.closed:
            self.decided.clear()
            try:
                await asyncio.wait_for(self.decided.wait(), RECHECK)
            except asyncio.TimeoutError:
                continue
        return self.scan.take_held()

    async def _read_raw(self, n: int) -> bytes:
        while True:
            timeout = self.scan.timeout(self.loop.time())
            try:
                if timeout is None:  # a request waits for its answer: look again every RECHECK s (it may come)
                    data = await asyncio.wait_for(self.r.read(n), RECHECK)
                else:
                    data = await asyncio.wait_for(self.r.read(n), max(0.0, timeout))
                break
            except asyncio.TimeoutError:  # StreamReader.read keeps what it had: a cancelled read loses nothing
                now = self.loop.time()
                if timeout is None or self.scan.timeout(now) is None or self.scan.timeout(now) > 0:
                    continue
                if self.scan.state == "head" and self.scan.buf:
                    self._refuse(HeadError("header-timeout", f"no whole request head within {self.lim.header_timeout:g} s"))
                else:
                    log.debug("closing an idle client connection (%s)", self.scan.state)
                    self.w.close()
                self.close()
                return b""
        if not data:
            self.close()
        return data

    def _refuse(self, e: HeadError) -> None:
        self.refuse(e.reason, e.status, e.why, self.scan.buf)
        if not self.w.is_closing():
            self.w.write(answer_bytes(e.status, e.why))
            self.w.close()

    # what else a StreamReader offers that mitmproxy or asyncio may call
    def at_eof(self) -> bool:
        return self.closed or self.r.at_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.r, name)


def refusal_logger(state: Any, client: str) -> Callable[[str, int, str, bytes], None]:
    """The `refuse` callback of a client's gates (front and inner): counts the reason, logs it, and writes one
    TCP_DENIED/<status> record with the refused head's method and URL (made safe for the log)."""
    def refuse(reason: str, status: int, why: str, head: bytes) -> None:
        state.counters.refuse(reason)
        log.info("request from %s refused: %s: %s", client, reason, why)
        acc = state.access
        if acc.fd is not None:
            line = head.split(b"\r\n", 1)[0].split(b" ")
            method = printable(line[0][:32]) if line and line[0] else "-"
            url = printable(line[1][:512]) if len(line) > 1 else "-"
            acc.log(start=time.time(), elapsed_ms=0, client=client, code="TCP_DENIED", status=status, size=0,
                    method=method, url=url, peer="-", mime="-", tag=refusal_tag(reason))

    return refuse


def printable(b: bytes) -> str:
    """Bytes from a refused head as one safe log field: printable ASCII kept, anything else %XX."""
    return "".join(chr(c) if 0x20 < c < 0x7F and c != 0x25 else f"%{c:02X}" for c in b) or "-"
