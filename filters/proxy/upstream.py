"""Upstream sockets per client connection on the mitmproxy path: bounded, idle ones closed first, counted in the slots."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("filters.proxy.upstream")
PER_CLIENT = 4  # upstream sockets one client connection may hold at once
WAIT = 15.0  # seconds a new upstream connection waits for one of them to become idle before it fails (502)


class UpstreamCap:
    """mitmproxy keeps every upstream connection of a client connection open until the origin closes it, and limits
    them only to 5 per (address, port): a client that names N origins on one keep-alive connection held 5N sockets.
    Here a client connection holds at most PER_CLIENT. A new one over that first closes the oldest idle one (no
    request in flight on it); when all are busy it waits for one (up to WAIT s, then the connection fails: 502).
    Beyond the first, each also takes a slot from the worker's connection budget (gate.Slots.take_extra: the worker
    ceiling counts sockets, not only client connections); none free: an idle one is closed or it waits, the same.
    Runs after the filter addon's server_connect (a refused connection is never counted)."""

    def __init__(self, proxyserver: Any, state: Any, per_client: int = PER_CLIENT):
        self.ps, self.state, self.per_client = proxyserver, state, per_client
        self.open: dict[str, list] = {}  # client id -> its open upstream connections, oldest first
        self.extra: dict[Any, bool] = {}  # upstream connection id -> it holds an extra worker slot
        self.inflight: dict[str, set] = {}  # client id -> flows whose answer is not complete
        self.pending: dict[str, int] = {}  # client id -> connections admitted, not connected yet
        self.changed = asyncio.Event()

    # ------------------------------------------------------------ what is busy
    def requestheaders(self, flow: Any) -> None:
        self.inflight.setdefault(flow.client_conn.id, set()).add(flow)

    def response(self, flow: Any) -> None:
        if flow.response is not None and flow.response.status_code == 101:
            return  # a switched connection stays busy until the client leaves
        self.inflight.get(flow.client_conn.id, set()).discard(flow)
        self._changed()

    error = response

    def http_connected(self, flow: Any) -> None:
        self.inflight.setdefault(flow.client_conn.id, set()).add(flow)  # the tunnel's connection: busy for good

    def _busy(self, cid: str) -> set:
        return {f.server_conn.id for f in self.inflight.get(cid, ()) if f.server_conn is not None}

    def _changed(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    # ------------------------------------------------------------ admission
    async def server_connect(self, data: Any) -> None:
        server, cid = data.server, data.client.id
        if server.error:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:
            held = len(self.open.get(cid, ())) + self.pending.get(cid, 0)
            if held < self.per_client and (held == 0 or self._take_extra(server)):
                self.pending[cid] = self.pending.get(cid, 0) + 1
                return
            if self._close_idle(cid, data.client):
                continue
            left = deadline - loop.time()
            if left <= 0:
                server.error = f"too many upstream connections for one client connection ({self.per_client})"
                log.info("%s: %s", data.client.peername, server.error)
                return
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    def _take_extra(self, server: Any) -> bool:
        slots = getattr(self.state, "slots", None)
        if slots is None or slots.take_extra():
            self.extra[server.id] = slots is not None
            return True
        return False

    def _close_idle(self, cid: str, client: Any) -> bool:
        busy = self._busy(cid)
        handler = self.ps.connections.get(client.id) if hasattr(self.ps, "connections") else None
        for conn in self.open.get(cid, ()):
            if conn.id not in busy and handler is not None and conn in handler.transports:
                self._forget(cid, conn)
                log.debug("closing idle upstream %s for %s", conn.address, client.peername)
                handler.close_connection(conn)
                return True
        return False

    # ------------------------------------------------------------ bookkeeping
    def server_connected(self, data: Any) -> None:
        cid = data.client.id
        self.pending[cid] = max(0, self.pending.get(cid, 0) - 1)
        self.open.setdefault(cid, []).append(data.server)

    def server_connect_error(self, data: Any) -> None:
        cid = data.client.id
        if data.server.id in self.extra or self.pending.get(cid):
            self.pending[cid] = max(0, self.pending.get(cid, 0) - 1)
            self._give_extra(data.server)
            self._changed()

    def server_disconnected(self, data: Any) -> None:
        self._forget(data.client.id, data.server)
        self._changed()

    def _forget(self, cid: str, server: Any) -> None:
        conns = self.open.get(cid)
        if conns is not None and server in conns:
            conns.remove(server)
            self._give_extra(server)
            if not conns:
                del self.open[cid]

    def _give_extra(self, server: Any) -> None:
        if self.extra.pop(server.id, False):
            self.state.slots.give_extra()

    def client_disconnected(self, client: Any) -> None:
        for conn in self.open.pop(client.id, []):
            self._give_extra(conn)
        self.inflight.pop(client.id, None)
        self.pending.pop(client.id, None)
