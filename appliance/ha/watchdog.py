"""Health-tied demotion: probe the local proxy with a real request every advbase, count failures, decide demotion."""
from __future__ import annotations

import http.client
import socket
import time
from dataclasses import dataclass, field

from appliance.core.errors import BadInput
from appliance.core.model import Appliance


def check_target(cfg: Appliance, override: str | None = None) -> tuple[str, int]:
    """HOST:PORT the watchdog probes: --check, else the proxy's listen address (127.0.0.1 for `any`)."""
    if override:
        host, _, port = override.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadInput(f"--check {override!r}: expected HOST:PORT")
        return host, int(port)
    listen = cfg.proxy.listen
    if listen == "any":
        host = "127.0.0.1"
    elif listen == "vip":
        host = str(cfg.cluster.vip.ip)
    else:
        host = str(listen)
    return host, cfg.proxy.port


def probe(host: str, port: int, timeout: float = 1.0) -> tuple[bool, str]:
    """GET /healthz (origin-form) on the proxy: (True, "ok") on 200 "ok", else (False, why)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/healthz", headers={"Host": f"{host}:{port}", "Connection": "close"})
        r = conn.getresponse()
        body = r.read(256)
        if r.status == 200 and body.strip() == b"ok":
            return True, "ok"
        return False, f"HTTP {r.status} {body[:40]!r}"
    except (OSError, http.client.HTTPException, socket.timeout) as e:
        return False, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        conn.close()


@dataclass
class Health:
    """Failure counter: unhealthy after `failures` failed checks in a row; healthy again on the first good one.

    Starts unhealthy (boot gate): a node stays demoted until its proxy has answered once.
    """

    failures: int
    healthy: bool = False
    fails: int = 0
    last: str = "not checked yet"
    changed_at: float = field(default_factory=time.time)

    def interval(self, period: float) -> float:
        """Seconds to the next check: `period` (advbase) normally; a quarter of it while a failure is being
        confirmed, so a dead proxy is confirmed within about one advbase and not `failures` of them."""
        return period / 4 if self.healthy and 0 < self.fails < self.failures else period

    def record(self, ok: bool, why: str = "") -> bool | None:
        """Feed one check; returns the new health when it changed, else None."""
        self.last = why or ("ok" if ok else "failed")
        if ok:
            self.fails = 0
            if not self.healthy:
                self.healthy, self.changed_at = True, time.time()
                return True
            return None
        self.fails += 1
        if self.healthy and self.fails >= self.failures:
            self.healthy, self.changed_at = False, time.time()
            return False
        return None
