"""The master's own list index, compiled in a forked child while the push to the peers runs (sync/push.py)."""
from __future__ import annotations

import json
import os
import select
import signal
import time
from pathlib import Path

from appliance.core.model import Appliance
from filters import ruleset
from sync import indextrust
from sync.check import compile_lists_into
from sync.releases import Releases

# Seconds the master waits for its own compile (a 1M-line list compiles in seconds): past that the child is taken
# for hung (a fork while another thread held a lock it needs, say) and killed, so the sync lock is not held forever.
COMPILE_TIMEOUT = 1800.0
COMPILE_NICE = 10


class Compile:
    """ruleset.compile_index(cfg, base) in a child started now; wait() returns its report or raises ListError.

    A child, not a thread: the compile is CPU-bound Python (a thread would hold the GIL the push's I/O needs) and its
    peak memory goes back to the OS when it exits. Start it only while this process runs no other thread.
    `rel`, `previous`: the categories of release <previous>'s index are reused when root recorded its bytes."""

    def __init__(self, cfg: Appliance, base: Path, rel: Releases | None = None, previous: int | None = None):
        self.base = Path(base)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: compile, report as JSON, exit without running the parent's cleanups
            os.close(r)
            # batch work beside the push: the proxy's workers on this node (and, where the nodes share CPUs as in the
            # lab, the peer's check the push waits for) go first
            os.nice(COMPILE_NICE)
            try:
                msg = self._compile(cfg, rel, previous)
            except Exception as e:  # noqa: BLE001 - every failure goes back to the parent
                msg = {"ok": False, "error": str(e) if isinstance(e, ruleset.ListError) else f"{type(e).__name__}: {e}"}
            try:
                with os.fdopen(w, "w") as f:
                    f.write(json.dumps(msg))
            finally:
                os._exit(0)
        os.close(w)
        self.pid, self.fd = pid, r

    def _compile(self, cfg: Appliance, rel: Releases | None, previous: int | None) -> dict:
        if rel is None:
            rep = compile_lists_into(cfg, self.base)
        else:
            with indextrust.trusted_previous(rel, previous) as prev:
                rep = compile_lists_into(cfg, self.base, prev)
        return {"ok": True, "entries": rep.entries, "bad_count": rep.bad_count, "seconds": rep.seconds}

    def wait(self, timeout: float = COMPILE_TIMEOUT) -> dict:
        """The child's report; ListError when it failed, died, or did not finish within `timeout` s (then killed)."""
        data, deadline = b"", time.monotonic() + timeout
        try:
            while True:  # bounded by the deadline
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    self._kill()
                    raise ruleset.ListError(f"compiling the lists of {self.base} did not finish within {timeout:.0f} s; "
                                            f"the compiler (pid {self.pid}) was killed")
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(self.fd)
        _, status, ru = os.wait4(self.pid, 0)
        try:
            msg = json.loads(data)
        except ValueError:
            raise ruleset.ListError(f"compiling the lists of {self.base} failed (the compiler died, status {status})") from None
        if not msg.pop("ok"):
            raise ruleset.ListError(msg["error"])
        return {**msg, "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3), "maxrss_mb": ru.ru_maxrss >> 10}

    def _kill(self) -> None:
        """SIGKILL the child this object forked (by its PID) and reap it."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
