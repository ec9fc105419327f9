"""The fast liveness layer in the namespace lab (root): each failure's outage bound, no takeover where there must be
none, never two VIP holders for longer than a fast interval, forged and replayed heartbeats refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from appliance.core.paths import Paths
from appliance.ha import ip as netns
from appliance.ha import liveness
from appliance.lab import daemons, lifecycle, topology
from appliance.lab.faults import inject_fault, port, recover
from appliance.lab.measure import Probe, fmt_result, measure
from appliance.lab.model import LabError
from tests.support.env import EXAMPLES, ROOT, need_tool
from tests.support.load import saturate
from tests.support.wait import wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timing]

MAX_OUTAGE = 0.8          # the bound for one failure (median target 0.5, checked by make bench)
FAST = 0.1                # ha.fast_interval in the example
SAMPLE_SLACK = 0.15       # the holder sampler spawns `ip` per node: its own granularity


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    need_tool("ip", "arping")
    try:
        with lifecycle.running(EXAMPLES / "appliance.yaml", tmp_path_factory.mktemp("labs"), "fa") as data:
            yield data
    except LabError as e:
        pytest.fail(f"lab: {e}")


@pytest.fixture(scope="module")
def probe(lab):
    with Probe(lab) as p:
        yield p


class Holders:
    """Samples the VIP holders in the background: the longest time two nodes (other than `ignore`) held it."""

    def __init__(self, lab, ignore: tuple[str, ...] = ()):
        self.lab, self.ignore, self.longest, self.seen = lab, ignore, 0.0, set()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        since = None
        while not self.stop.is_set():
            h = [n for n in topology.holders(self.lab) if n not in self.ignore]
            if len(h) > 1:    # a VIP left on a node whose LAN link is down (power loss) reaches nobody
                h = [n for n in h if netns.link_up(self.lab.nodes[n].lan_if, self.lab.nodes[n].netns)]
            now = time.monotonic()
            self.seen.update(h)
            since = (since or now) if len(h) > 1 else None
            if since is not None:
                self.longest = max(self.longest, now - since)
            self.stop.wait(0.05)

    def __enter__(self) -> "Holders":
        self.t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.t.join(timeout=5)


def fast_status(lab, node: str) -> dict:
    return liveness.read_status(Paths(lab.nodes[node].state)) or {}


def wait_fw1_back(lab, probe) -> None:
    wait_until(lambda: topology.holders(lab) == ["fw1"] and probe.served_by({"fw1"}, time.monotonic() - 1), 30,
               "fw1 the only holder and serving again")


@pytest.mark.parametrize("kind", ["power-loss", "link-down", "proxy-kill", "proxy-hang", "lan-cut"])
def test_master_failure_is_taken_over_in_under_a_second(lab, probe, kind: str) -> None:
    """lan-cut: the master's port leaves the LAN with its carrier up; the LAN witness (the lab's origin, the
    example's gateway) still answers fw2 and not fw1, so fw2 takes over although fw1 is heard on the sync link."""
    wait_fw1_back(lab, probe)
    with Holders(lab) as h:
        r = measure(lab, probe, kind, "fw1", timeout=20)
    print(fmt_result(r), f"two holders at most {h.longest:.2f} s")
    assert r["took_over"] == "fw2", fmt_result(r)
    assert r["failover_outage"] <= MAX_OUTAGE, fmt_result(r)
    assert r["returned"] and r["holders_after"] == ["fw1"], fmt_result(r)
    if kind != "lan-cut":    # fw1 keeps the VIP on its cut-off segment, where no client reaches it
        assert h.longest <= FAST + SAMPLE_SLACK, f"two VIP holders for {h.longest:.2f} s"
    # the layer acted: fw2 took over, or fw1 handed over (its leave advert may let CARP move the VIP first)
    took = fast_status(lab, "fw2")["takeovers"]
    handed = {k: n for k, n in fast_status(lab, "fw1").get("counters", {}).items() if k.startswith("handovers_")}
    assert sum(took.values()) + sum(handed.values()) >= 1, (took, handed)


def test_engine_sigkill_on_a_healthy_master_is_no_failover(lab, probe) -> None:
    wait_fw1_back(lab, probe)
    with Holders(lab) as h:
        r = measure(lab, probe, "engine-kill", "fw1", timeout=5)
    print(fmt_result(r))
    assert r["failover_outage"] == 0.0 and r["served"] == ["fw1"], fmt_result(r)
    assert h.seen == {"fw1"} and h.longest == 0.0, f"holders seen {h.seen}"
    log = (lab.nodes["fw1"].state / "ha.log").read_text()
    assert "restarting it as master, the VIP stays" in log


@pytest.mark.parametrize("kind,node", [("sync-cut", "fw1"), ("lan-cut", "fw2")])
def test_one_path_lost_changes_nothing_and_is_reported(lab, probe, kind: str, node: str) -> None:
    wait_fw1_back(lab, probe)
    other = "lan" if kind == "sync-cut" else "sync"
    t0 = time.monotonic()
    with Holders(lab) as h:
        inject_fault(lab, kind, node)
        try:
            # past CARP's own dead interval (advbase 1 x deadratio 2 + skew): CARP alone would have moved the VIP
            time.sleep(3.5)
            st = fast_status(lab, "fw2")["peers"]["fw1"]
        finally:
            recover(lab, kind, node)
    cut = "sync" if kind == "sync-cut" else "lan"
    assert st[f"{cut}_age"] is None or st[f"{cut}_age"] > 1.0, st
    assert st[f"{other}_age"] is not None and st[f"{other}_age"] < 0.5, st
    assert h.seen == {"fw1"}, f"holders seen {h.seen}"
    assert probe.outages(t0, time.monotonic()) == [], probe.outages(t0, time.monotonic())
    log = (lab.nodes["fw2"].state / "ha.log").read_text()
    assert f"fast: {cut} path from fw1 silent ({other} heard)" in log


def test_backup_cut_off_on_both_links_leaves_the_master_serving(lab, probe) -> None:
    wait_fw1_back(lab, probe)
    t0 = time.monotonic()
    with Holders(lab, ignore=("fw2",)):
        inject_fault(lab, "isolate", "fw2")
        try:
            time.sleep(2.0)
        finally:
            recover(lab, "isolate", "fw2")
    assert probe.outages(t0, time.monotonic()) == []
    wait_until(lambda: topology.holders(lab) == ["fw1"], 10, "one holder (fw1) once fw2 is back on both links")


def _attack(lab, mode: str) -> dict:
    fw2 = lab.nodes["fw2"]
    argv = netns.in_ns(lab.lan.netns, [sys.executable, "-m", "tests.support.heartbeat_replay", port(lab, "fw2"),
                                       fw2.lan.split("/")[0], "7407", mode, "20"])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_forged_and_replayed_heartbeats_are_refused_and_counted(lab, probe) -> None:
    wait_fw1_back(lab, probe)
    before = fast_status(lab, "fw2")["counters"]
    t0 = time.monotonic()
    assert _attack(lab, "replay")["sent"] == 20
    assert _attack(lab, "forge")["sent"] == 20

    def counted() -> dict | None:
        c = fast_status(lab, "fw2")["counters"]
        got = {k: c.get(k, 0) - before.get(k, 0) for k in ("bad_replayed", "bad_mac")}
        return got if got["bad_replayed"] >= 20 and got["bad_mac"] >= 20 else None
    wait_until(counted, 5, "fw2 counted 20 replayed and 20 forged heartbeats")
    assert topology.holders(lab) == ["fw1"] and probe.outages(t0, time.monotonic()) == []


def test_status_shows_heartbeat_ages_per_path(lab) -> None:
    r = daemons.node_exec(lab, "fw2", [f"{daemons.VENV_BIN}/appliance", "status"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fast: heartbeats every 0.1 s" in r.stdout and "fast: fw1 sync 0." in r.stdout, r.stdout
    prom = (lab.nodes["fw2"].state / "run" / "liveness.prom").read_text()
    assert 'appliance_ha_heartbeat_age_seconds{peer="fw1",path="sync"}' in prom


def test_no_false_takeover_with_both_cores_saturated(lab, probe) -> None:
    """Both cores busy (two bounded busy loops per core) while the client asks every 50 ms: zero transitions."""
    wait_fw1_back(lab, probe)
    seconds = float(os.environ.get("HA_SATURATED_SECONDS", "30"))   # make bench runs the 2 minutes
    logs = {n: (lab.nodes[n].state / "ha.log").read_text() for n in lab.nodes}
    t0 = time.monotonic()
    saturate(seconds)
    new = {n: (lab.nodes[n].state / "ha.log").read_text()[len(logs[n]):] for n in lab.nodes}
    lines = [f"{n}: {line}" for n, text in new.items() for line in text.splitlines()]
    print("\n".join(lines) or "ha.log: nothing new")
    moved = [x for x in lines if " -> " in x or "taking vhid" in x or "handing vhid" in x or "re-arming" in x]
    assert moved == [], moved
    evs = probe.window(t0, time.monotonic())
    assert len(evs) > seconds * 5 and all(e["ok"] and e["node"] == "fw1" for e in evs), \
        [e for e in evs if not e["ok"] or e["node"] != "fw1"][:5]


def _mac(ns: str, iface: str) -> str:
    return json.loads(netns.ip("-j", "link", "show", "dev", iface, netns=ns).stdout)[0]["address"]


def test_heartbeats_held_back_by_a_lan_host_do_not_delay_the_takeover(lab, probe, tmp_path) -> None:
    """Review finding: a LAN host that steers the master's LAN heartbeats to itself (a spoofed ARP entry), keeps
    them, and releases them after the master died held the backup off for 20 s. Each heartbeat acks one of the
    backup's own, so one released late is stale: the takeover comes as without the attacker."""
    wait_fw1_back(lab, probe)
    fw1, fw2, cli = lab.nodes["fw1"], lab.nodes["fw2"], lab.client
    fw2_ip = fw2.lan.split("/")[0]
    netns.ip("neigh", "replace", fw2_ip, "lladdr", _mac(cli.netns, cli.lan_if), "dev", fw1.lan_if, "nud",
             "permanent", netns=fw1.netns)
    go = tmp_path / "go"
    argv = netns.in_ns(cli.netns, [sys.executable, "-m", "tests.support.heartbeat_replay", "holdback", cli.lan_if,
                                   fw2_ip, "7407", "2.0", str(go), _mac(fw2.netns, fw2.lan_if), "0.1"])
    helper = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        captured = helper.stdout.readline()
        assert captured.startswith("captured ") and int(captured.split()[1]) >= 10, captured
        tf = time.monotonic()
        inject_fault(lab, "power-loss", "fw1")
        go.touch()
        wait_until(lambda: topology.holders(lab) == ["fw1", "fw2"] or topology.holders(lab) == ["fw2"], 25,
                   "fw2 holds the VIP")
        took = time.monotonic() - tf
        helper.wait(timeout=60)
    finally:
        if helper.poll() is None:
            helper.kill()
        netns.ip("neigh", "del", fw2_ip, "dev", fw1.lan_if, netns=fw1.netns, check=False)
        recover(lab, "power-loss", "fw1")
    assert took <= 1.5, f"fw2 took the VIP {took:.2f} s after fw1 died"
    assert fast_status(lab, "fw2")["counters"].get("bad_stale", 0) >= 10
