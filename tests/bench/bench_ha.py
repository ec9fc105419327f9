"""Client-visible failover outages in the lab (root): each failure kind >= 5 times with the fast liveness layer on and
off (one run, same machine), ucarp as the peer; then 2 minutes with both cores saturated, counting transitions."""
from __future__ import annotations

import os
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from appliance.ha import supervisor as carp
from appliance.lab import lifecycle
from appliance.lab.measure import Probe, fmt_result, measure
from appliance.lab.model import LAB_ROOT_ENV
from tests.support.env import EXAMPLES
from tests.support.load import saturate

RUNS = int(os.environ.get("HA_BENCH_RUNS", "5"))
KINDS = ("power-loss", "link-down", "proxy-kill", "proxy-hang", "engine-kill", "sync-cut", "demote")
QUIET_KINDS = {"engine-kill": 5.0, "sync-cut": 4.0}   # kinds where nothing may move: how long to watch
PEER_KINDS = ("demote", "link-down")  # ucarp for comparison, on the kinds where the engines differ most
PEER_RUNS = int(os.environ.get("HA_BENCH_PEER_RUNS", "3"))
SATURATED = float(os.environ.get("HA_BENCH_SATURATED", "120"))


def _fmt(xs: list[float]) -> str:
    xs = [x for x in xs if x != float("inf")]
    if not xs:
        return "no data"
    return f"min {min(xs):5.2f}  median {statistics.median(xs):5.2f}  max {max(xs):5.2f} s"


def _config(fast: bool) -> Path:
    """The example cluster, with the fast liveness layer off when `fast` is False (a copy: lists beside it)."""
    if fast:
        return EXAMPLES / "appliance.yaml"
    d = Path(tempfile.mkdtemp(prefix="bench-ha-cfg-")) / "examples"
    shutil.copytree(EXAMPLES, d)
    data = yaml.safe_load((d / "appliance.yaml").read_text())
    data.setdefault("ha", {})["fast_interval"] = 0
    (d / "appliance.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return d / "appliance.yaml"


def _saturated(lab, probe: Probe) -> str:
    """SATURATED seconds with two busy loops per core; transitions in ha.log and failed client requests."""
    before = {n: (lab.nodes[n].state / "ha.log").read_text() for n in lab.nodes}
    t0 = time.monotonic()
    burners = saturate(SATURATED)
    lines = [ln for n in lab.nodes for ln in (lab.nodes[n].state / "ha.log").read_text()[len(before[n]):].splitlines()]
    moved = [ln for ln in lines if " -> " in ln or "taking vhid" in ln or "handing vhid" in ln]
    evs = probe.window(t0, time.monotonic())
    bad = sum(1 for e in evs if not e["ok"])
    return (f"{SATURATED:.0f} s, both cores saturated ({burners} busy loops), client every 50 ms: "
            f"{len(moved)} transitions, {bad} failed of {len(evs)} requests, "
            f"{sum(1 for ln in lines if 'path from' in ln and 'silent' in ln)} one-path silences logged")


def _runs(engine: str | None, kinds: tuple[str, ...], runs: int, fast: bool = True,
          saturate: bool = False) -> tuple[dict, str]:
    os.environ[LAB_ROOT_ENV] = tempfile.mkdtemp(prefix="bench-ha-")
    name = f"bh{secrets.token_hex(3)}"
    out: dict[str, dict[str, list[float]]] = {k: {"failover": [], "return": [], "misses": []} for k in kinds}
    t0 = time.monotonic()
    lab = lifecycle.up(_config(fast), name, engine=engine)
    sat = ""
    try:
        print(f"  lab {name} ({engine or 'default engine'}, fast liveness {'on' if fast else 'off'}) up in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        with Probe(lab) as probe:
            for i in range(runs):
                for kind in kinds:
                    r = measure(lab, probe, kind, timeout=QUIET_KINDS.get(kind, 20.0))
                    out[kind]["failover"].append(r["failover_outage"])
                    out[kind]["return"].append(r["return_outage"])
                    if not r["returned"] or r["holders_after"] != ["fw1"]:
                        out[kind]["misses"].append(i)
                    print(f"  run {i + 1}: {fmt_result(r)}", flush=True)
            if saturate:
                sat = _saturated(lab, probe)
    finally:
        lifecycle.down(name)
    return out, sat


def _table(title: str, res: dict) -> None:
    print(title)
    for kind, r in res.items():
        print(f"  {kind:<12} failover {_fmt(r['failover'])} | return {_fmt(r['return'])}"
              f"{'  NOT BACK in runs ' + str(r['misses']) if r['misses'] else ''}")


def main() -> None:
    if os.geteuid() != 0:
        print("bench_ha: skipped (needs root for network namespaces)")
        return
    print(f"advbase 1, failures 3, runs {RUNS} (ucarp {PEER_RUNS}); outage = first failed request to first good one "
          "(client every 50 ms)")
    fast, sat = _runs(None, KINDS, RUNS, fast=True, saturate=SATURATED > 0)
    slow, _ = _runs(None, KINDS, RUNS, fast=False)
    peer, _ = _runs("ucarp", PEER_KINDS, PEER_RUNS, fast=False)
    eng = f"{carp.DEFAULT_ENGINE} (default), deadratio {carp.DEFAULT_DEADRATIO[carp.DEFAULT_ENGINE]}"
    _table(f"\nengine {eng}, fast liveness on (ha.fast_interval 0.1, fast_misses 3):", fast)
    _table(f"engine {eng}, fast liveness off (ha.fast_interval 0: CARP alone):", slow)
    _table(f"ucarp 1.5.2, deadratio {carp.DEFAULT_DEADRATIO['ucarp']}, fast liveness off (peer):", peer)
    for kind in PEER_KINDS:
        a, b = slow[kind]["failover"], peer[kind]["failover"]
        if a and b and statistics.median(a) > 0:
            print(f"  ratio {kind} median failover outage ucarp/{carp.DEFAULT_ENGINE}: "
                  f"{statistics.median(b) / statistics.median(a):.1f}x")
    if sat:
        print(f"no false takeovers: {sat}")


if __name__ == "__main__":
    main()
