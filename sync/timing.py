"""Wall and CPU seconds per phase of a sync run, for its JSON report (docs/sync.md: where the time goes)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class Phases:
    """{phase: wall seconds} and {phase: CPU seconds of this process} (children, e.g. rsync, not counted)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t, c = time.monotonic(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = round(self.wall.get(name, 0.0) + time.monotonic() - t, 3)
            self.cpu[name] = round(self.cpu.get(name, 0.0) + time.process_time() - c, 3)

    def report(self) -> dict:
        return {"wall": dict(self.wall), "cpu": dict(self.cpu)}
