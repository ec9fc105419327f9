"""The CONNECT fast path keeps the client's bytes in order: what was read before the splice goes upstream first, and
nothing the client sends later (data or EOF) overtakes it. In-process under uvloop, on loopback: the ClientHello step
and the splice (tunnel._check_hello, tunnel._splice) against a local recording server, split at every offset, with
the client's EOF racing the bytes. ORDER_RUNS=N (default 1000) runs in a row; the count prints with -s."""
from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from filters.proxy import gate, tunnel
from filters.proxy.metrics import Counters
from tests.support.proxy import client_hello

uvloop = pytest.importorskip("uvloop")
RUNS = int(os.environ.get("ORDER_RUNS", 1000))
pytestmark = pytest.mark.timeout(300)


class _Access:
    fd = None


class _State:
    def __init__(self, limits: gate.Limits):
        self.access, self.counters, self.limits, self.engine = _Access(), Counters(), limits, None


async def _pair(loop, listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(the client's socket, the proxy's accepted end) on loopback."""
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.setblocking(False)
    await loop.sock_connect(c, listener.getsockname())
    s, _ = await loop.sock_accept(listener)
    s.setblocking(False)
    return c, s


async def _record(loop, conn: socket.socket) -> bytes:
    """Everything the upstream end receives until EOF, then it closes (so the tunnel ends)."""
    got = b""
    while chunk := await loop.sock_recv(conn, 65536):
        got += chunk
    conn.close()
    return got


async def _one(loop, lst_client, lst_up, state, data: bytes, rest_len: int, pieces: int) -> bytes:
    client, conn = await _pair(loop, lst_client)
    up_near, up_far = await _pair(loop, lst_up)  # up_near: the proxy's upstream socket; up_far: the origin
    rec = loop.create_task(_record(loop, up_far))
    rest = data[:rest_len]  # read with the CONNECT head, before the ClientHello step
    tail = data[rest_len:]
    step = max(1, len(tail) // pieces)

    async def send():
        for i in range(0, len(tail), step):
            await loop.sock_sendall(client, tail[i:i + step])
        client.shutdown(socket.SHUT_WR)  # EOF right behind the bytes: it must not overtake them

    sender = loop.create_task(send())
    req = tunnel._Request(state, time.time(), "127.0.0.1", "order.test", 443)
    got_rest = await tunnel._check_hello(loop, conn, up_near, req, rest)
    assert got_rest is not None, "the ClientHello step cut an allowed hello"
    tun = await tunnel._splice(loop, conn, up_near, req, got_rest)
    await sender
    got = await asyncio.wait_for(rec, 10)
    await asyncio.wait_for(_closed(client), 10)  # the origin closed: the tunnel closes the client too
    client.close()
    assert tun.done or await _until(lambda: tun.done)
    return got


async def _closed(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, 65536):
            pass
    except ConnectionResetError:
        pass


async def _until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.001)
    return True


def test_bytes_in_order_at_every_split_with_eof_racing(capsys):
    hello = client_hello("order.test")
    data = hello + b"FIRST-" + b"SECOND-" * 50 + b"THIRD"
    offsets = list(range(len(data) + 1))

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        listeners = []
        for _ in range(2):
            lst = socket.socket()
            lst.bind(("127.0.0.1", 0))
            lst.listen(64)
            lst.setblocking(False)
            listeners.append(lst)
        state = _State(gate.Limits(hello_timeout=5.0, tunnel_idle_timeout=30.0))
        bad = 0
        for run in range(RUNS):
            k = offsets[(run * 7) % len(offsets)]  # every offset, in a scattered order
            got = await _one(loop, listeners[0], listeners[1], state, data, k, 1 + run % 3)
            if got != data:
                bad += 1
                first = next(i for i in range(min(len(got), len(data)) + 1) if got[i:i + 1] != data[i:i + 1])
                raise AssertionError(f"run {run} (split at {k}): upstream got {len(got)} bytes, differs at {first}")
        for lst in listeners:
            lst.close()
        return {"runs": RUNS, "bad": bad, "offsets": len(offsets)}

    stats = uvloop.run(main()) if hasattr(uvloop, "run") else asyncio.run(main())
    with capsys.disabled():
        print(f"\nbyte order under uvloop: {stats['runs']} runs in a row, {stats['bad']} out of order "
              f"({stats['offsets']} split offsets, EOF racing the bytes)")
    assert stats["bad"] == 0 and stats["runs"] == RUNS
