"""The local proxy as the fast liveness layer watches it: its process (an exit seen at once: a pidfd on Linux, kqueue
NOTE_EXIT on FreeBSD) and a GET /healthz every interval (a proxy that stops answering is hung).

A check left unanswered is not enough on its own: a proxy loading a big list or collecting garbage on a busy box can
miss 0.35 s now and then (seen once in 3 reloads of a 600k list), and that would hand the VIP over at a sync. So a
missed check means hung at once only when the proxy's processes used no CPU since their last answer (stopped,
deadlocked, blocked); one that is busy gets three times as long. Without /proc (FreeBSD) the timeout alone decides.
"""
from __future__ import annotations

import os
import select
import threading
import time
from collections import deque
from pathlib import Path

from appliance.core.paths import Paths
from appliance.core.pids import read_pid
from appliance.ha import watchdog


def watch_exit(pid: int):
    """Something select() reports readable when `pid` exits; OSError when there is no such process."""
    if hasattr(os, "pidfd_open"):
        return _Fd(os.pidfd_open(pid))
    kq = select.kqueue()
    kq.control([select.kevent(pid, filter=select.KQ_FILTER_PROC, flags=select.KQ_EV_ADD,
                              fflags=select.KQ_NOTE_EXIT)], 0)
    return kq


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


def cpu_ticks(pid: int | None) -> int | None:
    """utime + stime of `pid` and its children (the workers), in clock ticks; None without /proc."""
    if pid is None:
        return None
    total = 0
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for p in [str(pid), *kids]:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None
    return total


class ProxyWatch:
    """The local proxy: its process through a pidfd (an exit is seen at once) and a check every interval (hung)."""

    def __init__(self, paths: Paths, target: tuple[str, int], interval: float, timeout: float):
        self.paths, self.target, self.interval, self.timeout = paths, target, interval, timeout
        self.pid: int | None = None
        self.pidfd = None                              # watch_exit()'s object while a proxy is watched
        self.exited = False
        self.last_ok = time.monotonic()
        self.answered = False        # a proxy that never answered is starting, not hung (the watchdog gates boot)
        self.down: tuple[float, str] | None = None     # (since, why) while failed
        self.cpu: deque = deque(maxlen=8)              # (monotonic time, the proxy's CPU ticks), one per tick

    def fileno(self) -> int:
        return self.pidfd.fileno()

    def refresh(self) -> None:
        """Follow the pid file: a new proxy gets a new pidfd (a restarted proxy is watched again)."""
        pid = read_pid(self.paths.proxy_pid)
        if pid is None and self.pid is not None:
            # the watched proxy is gone, and may be reaped already (systemd reaps at once): keep watching what is
            # left of it, and keep an exit on_exit() saw, until a pid file names another proxy. Forgetting it here
            # made the exit invisible whenever the reaping came before this tick (the watchdog then took 1.15 s).
            return
        if pid == self.pid and (self.pidfd is not None or self.exited):
            return
        self.close()
        self.pid, self.exited = pid, False
        if pid is not None:
            try:
                self.pidfd = watch_exit(pid)
            except OSError:
                self.exited = True

    def on_exit(self) -> None:
        self.exited = True
        self.close()

    def close(self) -> None:
        if self.pidfd is not None:
            self.pidfd.close()
            self.pidfd = None

    def busy(self, now: float) -> bool:
        """The proxy's processes used CPU in the last two intervals (sampled here, once a tick)."""
        ticks = cpu_ticks(self.pid)
        if ticks is None:
            self.cpu.clear()
            return False
        self.cpu.append((now, ticks))
        old = [c for t, c in self.cpu if now - t >= 2 * self.interval]
        return bool(old) and ticks != old[-1]

    def failure(self, now: float) -> str:
        """Why the proxy cannot serve ('' when it can). Once failed, it stays failed until a check succeeds after
        the failure: a proxy that is restarted but not answering yet must not pull the VIP back."""
        busy = self.busy(now) if self.answered else False
        if self.down is not None:
            since, why = self.down
            if self.last_ok > since and not self.exited:
                self.down = None
                return ""
            return why
        if self.pid is None:
            return ""                 # no proxy recorded yet (starting): the watchdog's boot gate covers it
        if self.exited:
            self.down = (now, "proxy exited")
        elif self.answered and now - self.last_ok > self.timeout + self.interval:
            if not busy or now - self.last_ok > 3 * (self.timeout + self.interval):
                self.down = (now, f"proxy hung (no answer within {self.timeout:g} s"
                                  f"{', busy' if busy else ', no CPU used'})")
        return self.down[1] if self.down else ""

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            ok, _ = watchdog.probe(*self.target, timeout=self.timeout)
            if ok:
                self.last_ok, self.answered = time.monotonic(), True
            stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))
