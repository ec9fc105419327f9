"""What clients see: the probe loop through VIP:port (in the client namespace), one failure's outages measured
from it, one-off client requests."""
from __future__ import annotations

import json
import subprocess
import threading
import time

from appliance.ha import ip as netns
from appliance.lab import helpers
from appliance.lab.faults import inject_fault, preferred, recover
from appliance.lab.model import Lab, LabError
from appliance.lab.topology import holders


class Probe:
    """The client loop through VIP:port to the origin, run in the client namespace; keeps every result."""

    def __init__(self, lab: Lab, interval: float = 0.05, timeout: float = 1.0, duration: float = 900.0):
        self.lab, self.timeout = lab, timeout
        self.by_ip = lab.node_by_ip()
        argv = netns.in_ns(lab.client.netns, helpers.argv("probe", lab.vip, str(lab.proxy_port), lab.origin,
                                                          str(interval), str(timeout), str(duration)))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["node"] = self.by_ip.get(ev["by"]) if ev["ok"] else None
            with self._lock:
                self.events.append(ev)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.timeout + 3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def window(self, t_from: float, t_to: float = float("inf")) -> list[dict]:
        with self._lock:
            evs = [e for e in self.events if t_from <= e["t0"] <= t_to]
        return sorted(evs, key=lambda e: e["t0"])

    def served_by(self, nodes: set[str], since: float, stable: int = 6) -> str | None:
        """The node when the last `stable` requests (started after `since`) all succeeded via one of `nodes`."""
        evs = self.window(since)[-stable:]
        if len(evs) == stable and all(e["ok"] and e["node"] in nodes for e in evs):
            return evs[-1]["node"]
        return None

    def wait_served(self, nodes: set[str], since: float, timeout: float, stable: int = 6) -> str | None:
        """Until the last `stable` requests (started after `since`) all succeeded via one of `nodes`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (node := self.served_by(nodes, since, stable)) is not None:
                return node
            time.sleep(0.05)
        return None

    def outages(self, t_from: float, t_to: float) -> list[float]:
        """Each outage starting in the window: first failed request's start to the next good request's start."""
        out, opened = [], None
        for e in self.window(t_from, t_to + self.timeout + 5):
            if not e["ok"] and opened is None and e["t0"] <= t_to:
                opened = e["t0"]
            elif e["ok"] and opened is not None:
                out.append(round(e["t0"] - opened, 3))
                opened = None
        if opened is not None:
            out.append(float("inf"))
        return out

    def served(self, t_from: float, t_to: float) -> list[str]:
        seen: list[str] = []
        for e in self.window(t_from, t_to):
            if e["ok"] and (not seen or seen[-1] != e["node"]):
                seen.append(e["node"])
        return seen


def _wait_recovered(lab: Lab, probe: Probe, node: str, tf: float, timeout: float) -> None:
    """After a failure at tf: until clients are served again, by anyone, once something went wrong or moved
    (after an engine kill the restarted engine may win the race itself)."""
    deadline = tf + timeout
    while time.monotonic() < deadline:
        bad = [e for e in probe.window(tf) if not e["ok"] or e["node"] != node]
        if bad and probe.served_by(set(lab.nodes), bad[0]["t0"]) is not None:
            return
        time.sleep(0.05)


def measure(lab: Lab, probe: Probe, kind: str, node: str | None = None, timeout: float = 20.0) -> dict:
    """One failure of `kind` on the serving master and its recovery: each outage, who served, VIP holders."""
    node = node or preferred(lab)
    if probe.wait_served({node}, time.monotonic() - 1.0, timeout) is None:
        raise LabError(f"{kind}: {node} is not serving before the failure (holders {holders(lab)})")
    tf = time.monotonic()
    inject_fault(lab, kind, node)
    _wait_recovered(lab, probe, node, tf, timeout)
    t1 = time.monotonic()
    holders_failed = holders(lab)
    took = next((e["node"] for e in probe.window(tf) if e["ok"] and e["node"] != node), None)
    recover(lab, kind, node)
    back = probe.wait_served({node}, t1, timeout + 10)
    t2 = time.monotonic()
    time.sleep(probe.timeout + 0.2)  # let requests in flight finish before counting
    fo, ro = probe.outages(tf, t1), probe.outages(t1, t2)
    return {
        "kind": kind, "node": node, "took_over": took or (node if fo else None), "returned": back == node,
        "failover_outage": fo[0] if fo else 0.0, "failover_outages": fo,
        "return_outage": max(fo[1:] + ro) if fo[1:] + ro else 0.0, "return_outages": fo[1:] + ro,
        "served": probe.served(tf, t2), "holders_after_failure": holders_failed, "holders_after": holders(lab),
        "seconds": round(t2 - tf, 2),
    }


def fmt_result(r: dict) -> str:
    """One line for a measure() result."""
    def f(x: float) -> str:
        return "never" if x == float("inf") else f"{x:.2f} s"
    return (f"{r['kind']:<12} {r['node']} -> {r['took_over'] or 'nobody'}: outage {f(r['failover_outage'])}"
            f"{' (' + str(len(r['failover_outages'])) + ' gaps)' if len(r['failover_outages']) > 1 else ''}; "
            f"back to {r['node'] if r['returned'] else 'NOT ' + r['node']}: outage {f(r['return_outage'])}; "
            f"served by {' -> '.join(x or '?' for x in r['served'])}; vip on {','.join(r['holders_after']) or 'nobody'}")


def client_get(lab: Lab, proxy_host: str, url: str, timeout: float = 5.0) -> str:
    """A client request from the client namespace through proxy_host:proxy_port; returns the status code."""
    argv = netns.in_ns(lab.client.netns, helpers.argv("get", proxy_host, str(lab.proxy_port), url, str(timeout)))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, stdin=subprocess.DEVNULL)
    return r.stdout.strip() or f"exit {r.returncode}: {r.stderr.strip()[-200:]}"
