"""Non-blocking socket I/O with a deadline on the worker's loop: one reader/writer registration and one timer per wait."""
from __future__ import annotations

import asyncio
import socket


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_io(loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float, write: bool = False) -> None:
    """Until `sock` is readable (writable), or TimeoutError at `deadline` (loop time). One reader registration and
    one timer: no task per wait (asyncio.wait_for makes one, which cost more than the request it guarded)."""
    fut = loop.create_future()
    fd = sock.fileno()
    if write:
        loop.add_writer(fd, _wake, fut)
    else:
        loop.add_reader(fd, _wake, fut)
    timer = loop.call_at(deadline, _wake, fut)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
        timer.cancel()
    if loop.time() >= deadline:
        raise TimeoutError


async def recv(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, deadline: float) -> bytes:
    """One recv of up to n bytes (tried at once, then after waiting); b"" at EOF; TimeoutError at `deadline`."""
    while True:
        try:
            return sock.recv(n)
        except (BlockingIOError, InterruptedError):
            pass
        await wait_io(loop, sock, deadline)


async def sendall(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes | bytearray | memoryview,
                  deadline: float) -> None:
    """All of `data`, sent at once where the socket takes it; TimeoutError at `deadline`, OSError when it is gone."""
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except (BlockingIOError, InterruptedError):
            await wait_io(loop, sock, deadline, write=True)
            continue
        view = view[n:]
