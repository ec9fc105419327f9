"""The inner gate: HTTP/1 inside intercepted TLS through the same framing checks and timers as the front gate."""
from __future__ import annotations

import time
from typing import Any, Callable

from mitmproxy.proxy import commands, events, layer

from filters.proxy.framing import HeadScanner
from filters.proxy.gate import HeadError, Limits, answer_bytes


class InnerGate(layer.Layer):
    """Sits between the client's TLS layer and mitmproxy's HttpLayer (tls: intercept, HTTP/1). mitmproxy's HTTP/1
    reader buffers a head without bound and has no header timeout; the front gate sees only TLS records here. So the
    decrypted client bytes go through a framing.HeadScanner first: a head reaches the HttpLayer only whole and checked
    (431, 414, 400 as on the plain path), a head not complete within proxy.header_timeout gets 408, a keep-alive
    connection idle past proxy.idle_timeout is closed; each answer is written inside TLS and the connection closed.
    The addon's hooks (lean.GateAddon, through client.cg_inner) tell it about answers, as they tell the front gate."""

    def __init__(self, context: Any, child: layer.Layer, limits: Limits,
                 refuse: Callable[[str, int, str, bytes], None]):
        super().__init__(context)
        self.child, self.refuse = child, refuse
        self.scan = HeadScanner(limits, time.monotonic())
        self.timer: commands.RequestWakeup | None = None
        self.dead = False
        context.client.cg_inner = self

    def __repr__(self) -> str:
        return f"InnerGate({self.scan.state})"

    # the hooks' view (lean.GateAddon), the same calls as front.GateReader's
    def responded(self) -> None:
        self.scan.responded(time.monotonic())

    def decide(self, switched: bool) -> None:
        self.scan.decide(switched, time.monotonic())

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.dead:
            return
        if isinstance(event, events.Wakeup) and event.command is self.timer:
            self.timer = None
            yield from self._on_timer()
        elif isinstance(event, events.DataReceived) and event.connection == self.context.client:
            yield from self._data(event.data)
        else:
            yield from self.child.handle_event(event)
        if not self.dead:
            yield from self._after()

    def _data(self, data: bytes) -> layer.CommandGenerator[None]:
        try:
            out = self.scan.scan(data, time.monotonic())
            if self.scan.held_over():
                raise HeadError("header-too-large", "bytes sent before the answer to an Upgrade request")
        except HeadError as e:
            yield from self._refuse(e)
            return
        if out:
            yield from self.child.handle_event(events.DataReceived(self.context.client, out))

    def _after(self) -> layer.CommandGenerator[None]:
        """After every event: bytes held behind an Upgrade that was answered go on; the timer is armed."""
        if self.scan.state != "wait" and self.scan.held:
            yield from self._data(self.scan.take_held())
            if self.dead:
                return
        if self.timer is None and self.scan.state == "head":
            left = self.scan.timeout(time.monotonic())
            if left is not None:
                self.timer = commands.RequestWakeup(max(0.05, left))
                yield self.timer

    def _on_timer(self) -> layer.CommandGenerator[None]:
        left = self.scan.timeout(time.monotonic())
        if self.scan.state != "head" or left is None or left > 0:
            return  # re-armed by _after()
        if self.scan.buf:
            yield from self._refuse(HeadError("header-timeout",
                                              f"no whole request head within {self.scan.lim.header_timeout:g} s"))
        else:  # idle between requests (or before the first one): closed, not a refusal
            self.dead = True
            yield commands.CloseConnection(self.context.client)

    def _refuse(self, e: HeadError) -> layer.CommandGenerator[None]:
        self.dead = True
        self.refuse(e.reason, e.status, e.why, self.scan.buf)
        yield commands.SendData(self.context.client, answer_bytes(e.status, e.why))
        yield commands.CloseConnection(self.context.client)
