"""One sync at a time per node: an flock on <state>/run/sync.lock (released by the kernel if the holder dies)."""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sync.errors import BUSY, SyncError

LOCK_FILE = "sync.lock"


@contextmanager
def held(run_dir: Path, wait: float = 0.0) -> Iterator[Path]:
    """Hold the node's sync lock; raise SyncError(BUSY) naming the holder if it is not free within `wait` s."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise SyncError(f"another sync is running (pid {holder}, lock {path})", BUSY) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)
