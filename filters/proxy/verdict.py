"""A decision that blocks or a refusal, handled once for both front ends (mitmproxy addon, CONNECT fast path):
counters, the block page with its status, the log record."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from http import HTTPStatus

from filters.engine import Decision
from filters.proxy import blockpage
from filters.hosts import BadHost, canonical_host, shown
from filters.proxy.guard import Refusal, bad_host
from filters.proxy.accesslog import DENIED_TAG, AccessLog, block_tag, refusal_tag
from filters.proxy.metrics import Counters


@dataclass(frozen=True)
class BlockResponse:
    """The answer to a blocked, denied or refused request: the block page, its status (403, or a Refusal's: 400,
    409) and the headers both front ends send with it."""

    body: bytes
    content_type: str
    status: int = 403

    def headers(self) -> dict[str, str]:
        """For mitmproxy's Response.make (which adds Content-Length)."""
        return {"Content-Type": self.content_type, "Cache-Control": "no-store", "Connection": "close"}

    def http11(self) -> bytes:
        """The whole response as the CONNECT fast path writes it to the client socket."""
        return (f"HTTP/1.1 {self.status} {_phrase(self.status)}\r\nContent-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode() + self.body


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Refused"


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


def refuse_guard(state: Any, r: Refusal, url: str, client: str, accept: str | None) -> BlockResponse:
    """Count a refusal by reason (appliance_proxy_refused_total) and render its block page (category `appliance`,
    the reason named) with the Refusal's status. `url` is shown escaped; pass a canonical or shown() form."""
    state.counters.refuse(r.reason)
    body, ctype = blockpage.render(r.as_decision(), url, client, state.cfg.proxy.admin_contact, accept)
    return BlockResponse(body, ctype, r.status)


def sni_block(engine: Any, client: str, host: str, sni: str | None) -> Decision | Refusal | None:
    """The blocking decision for a TLS SNI that names another host than the CONNECT target (compared and decided
    canonically); a Refusal (bad-host) for a name the host model cannot read; None when it passes."""
    if not sni:
        return None
    try:
        name = canonical_host(sni).name
    except BadHost as e:
        return bad_host(e)
    if name == host.lower().rstrip(".").strip("[]"):
        return None
    d = engine.decide(client, name)
    return d if d.blocked else None


def cut(state: Any, d: Decision | Refusal, target: str, sni: str, log: logging.Logger) -> None:
    """A tunnel whose SNI is blocked or unreadable: count it and say so on the caller's logger (the caller closes
    the connection)."""
    if isinstance(d, Refusal):
        state.counters.refuse(d.reason)
        log.info("cut tunnel to %s: %s", shown(target), d.text)
        return
    state.counters.block(d.category)
    log.info("cut tunnel to %s: SNI %s blocked (%s, %s)", shown(target), shown(sni), d.category, d.source)


def tag_of(d: Decision | Refusal | None) -> str:
    """The access log's trailing tag for a decision that refused (block:CATEGORY, denied:client, refused:REASON)."""
    if isinstance(d, Refusal):
        return refusal_tag(d.reason)
    if d is None or not d.blocked:
        return ""
    return DENIED_TAG if d.verdict == "deny" else block_tag(d.category)


def log_connect(access: AccessLog, start: float, client: str, code: str, status: int, size: int, url: str,
                peer: str = "-", tag: str = "") -> None:
    """One access-log record for a CONNECT: refused, cut, failed upstream or tunnelled (then `peer` is the origin)."""
    if access.fd is not None:
        access.log(start=start, elapsed_ms=int((time.time() - start) * 1000), client=client, code=code, status=status,
                   size=size, method="CONNECT", url=url, peer=peer, mime="-", tag=tag)
