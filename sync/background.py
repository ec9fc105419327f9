"""The master's own list index, compiled in a forked child while the push to the peers runs (sync/push.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from appliance.core.model import Appliance
from filters import ruleset
from sync.check import compile_lists_into


class Compile:
    """ruleset.compile_index(cfg, base) in a child started now; wait() returns its report or raises ListError.

    A child, not a thread: the compile is CPU-bound Python (a thread would hold the GIL the push's I/O needs) and its
    peak memory goes back to the OS when it exits. Start it only while this process runs no other thread."""

    def __init__(self, cfg: Appliance, base: Path, previous: Path | None = None):
        self.base = Path(base)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: compile, report as JSON, exit without running the parent's cleanups
            os.close(r)
            try:
                rep = compile_lists_into(cfg, self.base, previous)
                msg = {"ok": True, "entries": rep.entries, "bad_count": rep.bad_count, "seconds": rep.seconds}
            except Exception as e:  # noqa: BLE001 - every failure goes back to the parent
                msg = {"ok": False, "error": str(e) if isinstance(e, ruleset.ListError) else f"{type(e).__name__}: {e}"}
            try:
                with os.fdopen(w, "w") as f:
                    f.write(json.dumps(msg))
            finally:
                os._exit(0)
        os.close(w)
        self.pid, self.fd = pid, r

    def wait(self) -> dict:
        with os.fdopen(self.fd) as f:
            data = f.read()
        _, status, ru = os.wait4(self.pid, 0)
        try:
            msg = json.loads(data)
        except ValueError:
            raise ruleset.ListError(f"compiling the lists of {self.base} failed (the compiler died, status {status})") from None
        if not msg.pop("ok"):
            raise ruleset.ListError(msg["error"])
        return {**msg, "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3), "maxrss_mb": ru.ru_maxrss >> 10}
