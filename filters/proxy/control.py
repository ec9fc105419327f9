"""Talk to the running proxy: its pidfile, reload (SIGHUP), log reopen (SIGUSR1) and counters (/metrics)."""
from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

from appliance.core.config import Appliance, run_dir

PIDFILE = "proxy.pid"


def pidfile() -> Path:
    return run_dir() / PIDFILE


def pid() -> int | None:
    """The proxy's main PID if its pidfile names a live process, else None."""
    try:
        value = int(pidfile().read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(value, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return value


def _signal(sig: int) -> int:
    p = pid()
    if p is None:
        raise RuntimeError(f"the proxy is not running (no live PID in {pidfile()})")
    os.kill(p, sig)
    return p


def reload() -> int:
    """Ask the proxy to re-read config and lists (it keeps the old rules if they do not validate)."""
    return _signal(signal.SIGHUP)


def reopen_logs() -> int:
    return _signal(signal.SIGUSR1)


def metrics_text(cfg: Appliance, timeout: float = 2.0) -> str | None:
    """Prometheus text from the management port on 127.0.0.1, or None when the proxy does not answer."""
    url = f"http://127.0.0.1:{cfg.proxy.metrics_port}/metrics"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def counters(cfg: Appliance) -> dict[str, float] | None:
    """Parse /metrics into {"name{labels}": value}; None when the proxy does not answer."""
    text = metrics_text(cfg)
    if text is None:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out
