"""What clients see: the probe loop through VIP:port (in the client namespace), one failure's outages measured
from it, one-off client requests."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

from appliance.ha import ip as netns
from appliance.lab import helpers
from appliance.lab.faults import inject_fault, preferred, recover
from appliance.lab.model import Lab, LabError
from appliance.lab.topology import holders


class Probe:
    """The client loop through VIP:port to the origin, run in the client namespace; keeps every result."""

    def __init__(self, lab: Lab, interval: float = 0.05, timeout: float = 1.0, duration: float = 900.0,
                 inflight: int = 0):
        self.lab, self.timeout = lab, timeout
        self.by_ip = lab.node_by_ip()
        argv = netns.in_ns(lab.client.netns, helpers.argv("probe", lab.vip, str(lab.proxy_port), lab.origin,
                                                          str(interval), str(timeout), str(duration),
                                                          f"--inflight={inflight}"))
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

    def longest_gap(self, t_from: float, t_to: float) -> float:
        """The longest time with no answer, from the last answer before `t_from` to each next one up to `t_to`: the
        outage a client saw, also when no request failed (a request open at a power loss is answered by the new
        holder once its SYN is sent again after the gratuitous ARP). Read it once the requests open at `t_to`
        have ended."""
        with self._lock:
            done = sorted(e["t1"] for e in self.events if e["ok"])
        after = [t for t in done if t_from < t <= t_to]
        if not after:
            return float("inf")
        points = [max((t for t in done if t <= t_from), default=t_from)] + after
        return round(max(b - a for a, b in zip(points, points[1:])), 3)

    def outages(self, t_from: float, t_to: float) -> list[float]:
        """Each outage starting in the window: first failed request's start to the next good request's start. A
        request that was open at `t_from` and then failed opens one at `t_from`: with the VM lab's cap on open
        requests, those are the only requests a failure at `t_from` meets until they time out."""
        out, opened = [], None
        for e in self.window(t_from - self.timeout - 1, t_to + self.timeout + 5):
            if e["t0"] < t_from and (e["ok"] or e["t1"] < t_from):
                continue    # answered, or failed before the window
            if not e["ok"] and opened is None and e["t0"] <= t_to:
                opened = max(e["t0"], t_from)
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


def wait_recovered(probe: Probe, nodes: set[str], node: str, tf: float, timeout: float, poll: float = 0.05) -> None:
    """After `node` failed at tf: until clients are served again, by any of `nodes`, once something went wrong or
    moved (after an engine kill the restarted engine may win the race itself)."""
    deadline = tf + timeout
    while time.monotonic() < deadline:
        bad = [e for e in probe.window(tf) if not e["ok"] or e["node"] != node]
        if bad and probe.served_by(nodes, bad[0]["t0"]) is not None:
            return
        time.sleep(poll)


@dataclass
class Failure:
    """What a lab kind does around one failure: make it and undo it (kind, node), who holds the VIP now, how long
    to wait, and the keys of its own it adds to the result (namespace lab: faults.py; VM lab: vmfail.py)."""

    nodes: set[str]                                   # who may serve
    inject: Callable[[str, str], None]
    recover: Callable[[str, str], None]
    holders: Callable[[], list[str]]
    fail_wait: float                                  # until someone serves after the failure
    return_wait: float                                # until the failed node serves again
    poll: float = 0.05
    settle: float = 0.2                               # after the return, on top of one request's bound
    at_failure: Callable[[], dict] = dict             # keys taken once clients are served after the failure
    at_end: Callable[[float, float], dict] = lambda tf, t1: {}   # keys taken at the end, given (tf, t1)


def fail_and_return(probe: Probe, f: Failure, kind: str, node: str) -> dict:
    """One failure of `kind` on `node` (serving now) and its recovery, in either lab: each outage, who took over,
    whether it came back, who served, the VIP holders after; the lab's own keys before holders_after."""
    tf = time.monotonic()
    f.inject(kind, node)
    wait_recovered(probe, f.nodes, node, tf, f.fail_wait, f.poll)
    t1 = time.monotonic()
    own = f.at_failure()
    took = next((e["node"] for e in probe.window(tf) if e["ok"] and e["node"] != node), None)
    f.recover(kind, node)
    back = probe.wait_served({node}, t1, f.return_wait)
    t2 = time.monotonic()
    time.sleep(probe.timeout + f.settle)  # let requests in flight finish before counting
    fo, ro = probe.outages(tf, t1), probe.outages(t1, t2)
    own.update(f.at_end(tf, t1))
    return {
        "kind": kind, "node": node, "took_over": took or (node if fo else None), "returned": back == node,
        "failover_outage": fo[0] if fo else 0.0, "failover_outages": fo,
        "return_outage": max(fo[1:] + ro) if fo[1:] + ro else 0.0, "return_outages": fo[1:] + ro,
        "served": probe.served(tf, t2), **own, "holders_after": f.holders(),
        "seconds": round(t2 - tf, 2),
    }


def measure(lab: Lab, probe: Probe, kind: str, node: str | None = None, timeout: float = 20.0) -> dict:
    """One failure of `kind` on the serving master and its recovery: each outage, who served, VIP holders."""
    node = node or preferred(lab)
    if probe.wait_served({node}, time.monotonic() - 1.0, timeout) is None:
        raise LabError(f"{kind}: {node} is not serving before the failure (holders {holders(lab)})")
    f = Failure(nodes=set(lab.nodes), inject=lambda k, n: inject_fault(lab, k, n),
                recover=lambda k, n: recover(lab, k, n), holders=lambda: holders(lab), fail_wait=timeout,
                return_wait=timeout + 10, at_failure=lambda: {"holders_after_failure": holders(lab)})
    return fail_and_return(probe, f, kind, node)


def fmt_result(r: dict, width: int = 12, gaps: bool = True) -> str:
    """One line for a result of either lab (`gaps`: say how many gaps the failover had; a VM lab's result adds
    when the node was back and the most VIP holders seen at once)."""
    def f(x: float) -> str:
        return "never" if x == float("inf") else f"{x:.2f} s"
    n_gaps = len(r["failover_outages"])
    after = f" after {r['back_after']} s" if "back_after" in r else ""
    quiet = f"no answer for {f(r['no_answer'])} / {f(r['no_answer_return'])}; " if "no_answer" in r else ""
    most = f"most holders at once {r['max_holders']}; " if "max_holders" in r else ""
    return (f"{r['kind']:<{width}} {r['node']} -> {r['took_over'] or 'nobody'}: outage {f(r['failover_outage'])}"
            f"{' (' + str(n_gaps) + ' gaps)' if gaps and n_gaps > 1 else ''}; "
            f"back to {r['node'] if r['returned'] else 'NOT ' + r['node']}{after}: outage {f(r['return_outage'])}; "
            f"served by {' -> '.join(x or '?' for x in r['served'])}; {quiet}{most}"
            f"vip on {','.join(r['holders_after']) or 'nobody'}")


def client_get(lab: Lab, proxy_host: str, url: str, timeout: float = 5.0) -> str:
    """A client request from the client namespace through proxy_host:proxy_port; returns the status code."""
    argv = netns.in_ns(lab.client.netns, helpers.argv("get", proxy_host, str(lab.proxy_port), url, str(timeout)))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, stdin=subprocess.DEVNULL)
    return r.stdout.strip() or f"exit {r.returncode}: {r.stderr.strip()[-200:]}"
