"""Failures of a VM lab node and their recovery, measured by the namespace lab's client probe through the VIP:
power loss (SIGKILL of qemu, then boot again), LAN link down (the tap down), proxy killed (systemctl kill on the
node) and demote (`appliance demote`); a sampler of ARP replies for the VIP watches for two holders meanwhile."""
from __future__ import annotations

import threading
import time

from appliance.ha import ip as netns
from appliance.lab import vm, vmlab, vmnode
from appliance.lab.measure import Probe
from appliance.lab.model import LabError
from appliance.lab.vmmodel import VmLab

KINDS = ("power-loss", "link-down", "proxy-kill", "demote")
PROBE_TIMEOUT = 2.0      # one client request's bound (TCG guests answer slower than namespaces)
FAILOVER_WAIT = 60.0     # until the backup serves
RETURN_WAIT = 90.0       # until the master serves again (after a power loss: plus its boot)


def new_probe(lab: VmLab, duration: float = 1800.0) -> Probe:
    """The namespace lab's probe loop in the client namespace: a GET through VIP:port every 50 ms."""
    return Probe(lab, interval=0.05, timeout=PROBE_TIMEOUT, duration=duration)  # type: ignore[arg-type]


class HolderWatch:
    """ARP for the VIP on the LAN bridge about once a second in a thread; keeps (time, holders) samples."""

    def __init__(self, lab: VmLab):
        self.lab, self.samples = lab, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            self.samples.append((t, vmnode.holders_arp(self.lab)))
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - t)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def __enter__(self) -> "HolderWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def most(self, t_from: float = 0.0) -> int:
        return max((len(h) for t, h in self.samples if t >= t_from), default=0)

    def doubles(self, t_from: float = 0.0) -> list[tuple[float, list[str]]]:
        return [(t, h) for t, h in self.samples if t >= t_from and len(h) > 1]


def inject(lab: VmLab, kind: str, node: str) -> None:
    """Make `node` fail the way `kind` names (KINDS)."""
    v = lab.vm(node)
    if kind == "power-loss":
        if not vm.power_off(v):
            raise LabError(f"{node}: qemu PID {v.qemu_pid} is not running (or not our qemu)")
    elif kind == "link-down":
        netns.ip("link", "set", v.taps[0], "down", netns=lab.netns)
    elif kind == "proxy-kill":
        vmnode.run(lab, node, "systemctl kill -s KILL appliance-proxy.service", timeout=120, check=True)
    elif kind == "demote":
        vmnode.run(lab, node, "appliance demote", timeout=300, check=True)  # python starts slowly under TCG
    else:
        raise LabError(f"unknown failure kind {kind!r} (one of {', '.join(KINDS)})")


def recover(lab: VmLab, kind: str, node: str) -> None:
    """Undo inject(kind): boot the VM again, the tap up, `appliance promote`; systemd restarts a killed proxy."""
    if kind == "power-loss":
        vmlab.boot(lab, node)
    elif kind == "link-down":
        netns.ip("link", "set", lab.vm(node).taps[0], "up", netns=lab.netns)
    elif kind == "demote":
        vmnode.run(lab, node, "appliance promote", timeout=300, check=True)


def _served_elsewhere(lab: VmLab, probe: Probe, node: str, tf: float, timeout: float) -> None:
    """After a failure at tf: until the last requests all succeed again once something failed or moved."""
    deadline = tf + timeout
    while time.monotonic() < deadline:
        bad = [e for e in probe.window(tf) if not e["ok"] or e["node"] != node]
        if bad and probe.served_by(set(lab.vms), bad[0]["t0"]) is not None:
            return
        time.sleep(0.1)


def measure(lab: VmLab, probe: Probe, watch: HolderWatch, kind: str, node: str | None = None) -> dict:
    """One failure of `kind` on the serving master and its recovery: outages, who served, the most VIP holders
    seen at once (ARP), and how long the return took."""
    node = node or lab.master
    if probe.wait_served({node}, time.monotonic() - 1.0, FAILOVER_WAIT) is None:
        raise LabError(f"{kind}: {node} is not serving through the VIP before the failure")
    tf = time.monotonic()
    inject(lab, kind, node)
    _served_elsewhere(lab, probe, node, tf, FAILOVER_WAIT)
    t1 = time.monotonic()
    took = next((e["node"] for e in probe.window(tf) if e["ok"] and e["node"] != node), None)
    recover(lab, kind, node)
    back = probe.wait_served({node}, t1, RETURN_WAIT + (180 if kind == "power-loss" else 0))
    t2 = time.monotonic()
    time.sleep(probe.timeout + 0.3)
    fo, ro = probe.outages(tf, t1), probe.outages(t1, t2)
    back_at = next((e["t0"] for e in probe.window(t1) if e["ok"] and e["node"] == node), None)
    return {
        "kind": kind, "node": node, "took_over": took or (node if fo else None), "returned": back == node,
        "failover_outage": fo[0] if fo else 0.0, "failover_outages": fo,
        "return_outage": max(fo[1:] + ro) if fo[1:] + ro else 0.0, "return_outages": fo[1:] + ro,
        "served": probe.served(tf, t2), "max_holders": watch.most(tf), "two_holders": watch.doubles(tf),
        "back_after": round(back_at - tf, 2) if back_at else None, "holders_after": vmnode.holders_arp(lab),
        "seconds": round(t2 - tf, 2),
    }


def fmt(r: dict) -> str:
    def f(x: float) -> str:
        return "never" if x == float("inf") else f"{x:.2f} s"
    return (f"{r['kind']:<11} {r['node']} -> {r['took_over'] or 'nobody'}: outage {f(r['failover_outage'])}; "
            f"back to {r['node'] if r['returned'] else 'NOT ' + r['node']} after {r['back_after']} s: "
            f"outage {f(r['return_outage'])}; served by {' -> '.join(x or '?' for x in r['served'])}; "
            f"most holders at once {r['max_holders']}; vip on {','.join(r['holders_after']) or 'nobody'}")


def run_all(lab: VmLab, kinds: tuple[str, ...] = KINDS, runs: int = 1, echo=None) -> list[dict]:
    """Every kind `runs` times under one probe and one holder watch; `echo` gets each result's line."""
    results = []
    with new_probe(lab) as probe, HolderWatch(lab) as watch:
        for _ in range(runs):
            for kind in kinds:
                r = measure(lab, probe, watch, kind)
                results.append(r)
                if echo:
                    echo(fmt(r))
    return results

