"""A decision that blocks, handled once for both front ends (mitmproxy addon, CONNECT fast path): counters, 403, log."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from filters.engine import Decision
from filters.proxy import blockpage
from filters.proxy.accesslog import AccessLog
from filters.proxy.metrics import Counters


@dataclass(frozen=True)
class BlockResponse:
    """The 403 for a blocked or denied request: the block page and the headers both front ends send with it."""

    body: bytes
    content_type: str

    def headers(self) -> dict[str, str]:
        """For mitmproxy's Response.make (which adds Content-Length)."""
        return {"Content-Type": self.content_type, "Cache-Control": "no-store", "Connection": "close"}

    def http11(self) -> bytes:
        """The whole response as the CONNECT fast path writes it to the client socket."""
        return (f"HTTP/1.1 403 Forbidden\r\nContent-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode() + self.body


def count(counters: Counters, d: Decision) -> None:
    """A refused request: `denied` for a client outside proxy.clients, else a block in the decision's category."""
    if d.verdict == "deny":
        counters.denied += 1
    else:
        counters.block(d.category)


def refuse(state: Any, d: Decision, url: str, client: str, accept: str | None) -> BlockResponse:
    """Count a block or deny decision and render its 403 page (category, URL, client, rule, admin contact)."""
    count(state.counters, d)
    body, ctype = blockpage.render(d, url, client, state.cfg.proxy.admin_contact, accept)
    return BlockResponse(body, ctype)


def sni_block(engine: Any, client: str, host: str, sni: str | None) -> Decision | None:
    """The blocking decision for a TLS SNI that names another host than the CONNECT target; None when it passes."""
    if not sni or sni.lower().rstrip(".") == host.lower().rstrip("."):
        return None
    d = engine.decide(client, sni)
    return d if d.blocked else None


def cut(state: Any, d: Decision, target: str, sni: str, log: logging.Logger) -> None:
    """A tunnel whose SNI is blocked: count it and say so on the caller's logger (the caller closes the connection)."""
    state.counters.block(d.category)
    log.info("cut tunnel to %s: SNI %s blocked (%s, %s)", target, sni, d.category, d.source)


def log_connect(access: AccessLog, start: float, client: str, code: str, status: int, size: int, url: str,
                peer: str = "-") -> None:
    """One access-log record for a CONNECT: refused, cut, failed upstream or tunnelled (then `peer` is the origin)."""
    if access.fd is not None:
        access.log(start=start, elapsed_ms=int((time.time() - start) * 1000), client=client, code=code, status=status,
                   size=size, method="CONNECT", url=url, peer=peer, mime="-")
