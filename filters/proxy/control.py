"""Talk to the running proxy: its pidfile, reload (SIGHUP), log reopen (SIGUSR1) and counters (/metrics)."""
from __future__ import annotations

import signal
from pathlib import Path

from appliance.core import pids, prom
from appliance.core.model import Appliance
from appliance.core.paths import Paths


def pidfile() -> Path:
    return Paths.default().proxy_pid


def pid() -> int | None:
    """The proxy's main PID if its pidfile names a live process, else None (not proven ours: see _signal)."""
    return pids.read_pid(pidfile())


def _signal(sig: int) -> int:
    """Signal the proxy; pids.StalePidfile (nothing sent) when the pidfile's PID is not the appliance proxy."""
    p = pids.signal_pidfile(pidfile(), sig, "proxy")
    if p is None:
        raise RuntimeError(f"the proxy is not running (no live PID in {pidfile()})")
    return p


def reload() -> int:
    """Ask the proxy to re-read config and lists (it keeps the old rules if they do not validate)."""
    return _signal(signal.SIGHUP)


def reopen_logs() -> int:
    return _signal(signal.SIGUSR1)


def metrics_text(cfg: Appliance, timeout: float = 2.0) -> str | None:
    """Prometheus text from the management port on 127.0.0.1, or None when the proxy does not answer."""
    url = f"http://127.0.0.1:{cfg.proxy.metrics_port}/metrics"
    import urllib.request  # deferred: it imports ssl (2 MB), and the proxy's main process imports this module

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def counters(cfg: Appliance) -> dict[str, float] | None:
    """Parse /metrics into {"name{labels}": value}; None when the proxy does not answer."""
    text = metrics_text(cfg)
    return None if text is None else prom.parse(text)
