"""Failures of a VM lab node and their recovery, measured by the namespace lab's client probe through the VIP:
power loss (SIGKILL of qemu, then boot again), LAN link down (the tap down), proxy killed (systemctl kill on the
node) and demote (`appliance demote`); a sampler of ARP replies for the VIP watches for two holders meanwhile."""
from __future__ import annotations

import threading
import time

from appliance.ha import ip as netns
from appliance.lab import vm, vmlab, vmnode
from appliance.lab.measure import Failure, Probe, fail_and_return, fmt_result
from appliance.lab.model import LabError
from appliance.lab.vmmodel import VmLab

KINDS = ("power-loss", "link-down", "proxy-kill", "demote")
PROBE_TIMEOUT = 5.0      # one client request's bound: a busy TCG guest's proxy takes seconds (2 s timed out at host load 8)
FAILOVER_WAIT = 60.0     # until the backup serves
RETURN_WAIT = 90.0       # until the master serves again (after a power loss: plus its boot)


PROBE_INTERVAL = 0.2     # each request on its own thread: at 50 ms (the namespace lab's), a starved TCG guest's proxy
                         # had 100 requests open at once and timed every one out while it still served other clients
PROBE_INFLIGHT = 2       # and no more than two open: while fw1 boots (TCG, 2 host cores), fw2's proxy answered a lone
                         # curl in 0.6-6 s but had 21 probe requests open at 5 req/s, and every one of them timed out


def new_probe(lab: VmLab, duration: float = 1800.0) -> Probe:
    """The namespace lab's probe loop in the client namespace: a GET through VIP:port every PROBE_INTERVAL."""
    return Probe(lab, interval=PROBE_INTERVAL, timeout=PROBE_TIMEOUT, duration=duration,  # type: ignore[arg-type]
                 inflight=PROBE_INFLIGHT)


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

    def most_held(self, t_from: float = 0.0) -> int:
        """The most holders seen in two samples in a row: an overlap longer than one sample. One sample's window
        (`arping -w 1`) can span a preempting handover, the old holder answering before its down script ran and
        the new one after its up script: CARP's own overlap, stretched to about a second by a starved guest."""
        s = [len(h) for t, h in self.samples if t >= t_from]
        return max((min(a, b) for a, b in zip(s, s[1:])), default=max(s, default=0))


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


def measure(lab: VmLab, probe: Probe, watch: HolderWatch, kind: str, node: str | None = None) -> dict:
    """One failure of `kind` on the serving master and its recovery: outages, who served, the most VIP holders
    seen at once (ARP), and how long the return took."""
    node = node or lab.master
    if probe.wait_served({node}, time.monotonic() - 1.0, FAILOVER_WAIT) is None:
        raise LabError(f"{kind}: {node} is not serving through the VIP before the failure")

    def at_end(tf: float, t1: float) -> dict:
        back_at = next((e["t0"] for e in probe.window(t1) if e["ok"] and e["node"] == node), None)
        # with at most two requests open, a request met by the failure may be answered late instead of failing:
        # the longest time with no answer is the outage a client saw (failover; then the return, up to now)
        return {"max_holders": watch.most(tf), "two_holders": watch.doubles(tf),
                "back_after": round(back_at - tf, 2) if back_at else None,
                "no_answer": probe.longest_gap(tf, t1),
                "no_answer_return": probe.longest_gap(t1, time.monotonic() - probe.timeout)}

    f = Failure(nodes=set(lab.vms), inject=lambda k, n: inject(lab, k, n), recover=lambda k, n: recover(lab, k, n),
                holders=lambda: vmnode.holders_arp(lab), fail_wait=FAILOVER_WAIT,
                return_wait=RETURN_WAIT + (180 if kind == "power-loss" else 0),  # a power loss: plus the boot
                poll=0.1, settle=0.3, at_end=at_end)
    return fail_and_return(probe, f, kind, node)


def fmt(r: dict) -> str:
    return fmt_result(r, width=11, gaps=False)


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

