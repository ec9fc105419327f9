"""Client-visible failover outages in the lab (root): each failure kind >= 5 times with the default engine, ucarp as the peer."""
from __future__ import annotations

import os
import secrets
import statistics
import tempfile
import time

from appliance.ha import supervisor as carp
from appliance.lab import lifecycle
from appliance.lab.measure import Probe, fmt_result, measure
from appliance.lab.model import LAB_ROOT_ENV
from tests.support.env import EXAMPLES

RUNS = int(os.environ.get("HA_BENCH_RUNS", "5"))
PEER_KINDS = ("demote", "link-down")  # ucarp for comparison, on the kinds where the engines differ most
PEER_RUNS = int(os.environ.get("HA_BENCH_PEER_RUNS", "3"))  # fewer: keeps the whole benchmark near 3 minutes


def _fmt(xs: list[float]) -> str:
    xs = [x for x in xs if x != float("inf")]
    if not xs:
        return "no data"
    return f"min {min(xs):5.2f}  median {statistics.median(xs):5.2f}  max {max(xs):5.2f} s"


def _runs(engine: str | None, kinds: tuple[str, ...], runs: int) -> dict[str, dict[str, list[float]]]:
    os.environ[LAB_ROOT_ENV] = tempfile.mkdtemp(prefix="bench-ha-")
    name = f"bh{secrets.token_hex(3)}"
    out: dict[str, dict[str, list[float]]] = {k: {"failover": [], "return": [], "misses": []} for k in kinds}
    t0 = time.monotonic()
    lab = lifecycle.up(EXAMPLES / "appliance.yaml", name, engine=engine)
    try:
        print(f"  lab {name} ({engine or 'default engine'}) up in {time.monotonic() - t0:.1f} s", flush=True)
        with Probe(lab) as probe:
            for i in range(runs):
                for kind in kinds:
                    r = measure(lab, probe, kind)
                    out[kind]["failover"].append(r["failover_outage"])
                    out[kind]["return"].append(r["return_outage"])
                    if not r["returned"] or r["holders_after"] != ["fw1"]:
                        out[kind]["misses"].append(i)
                    print(f"  run {i + 1}: {fmt_result(r)}", flush=True)
    finally:
        lifecycle.down(name)
    return out


def main() -> None:
    if os.geteuid() != 0:
        print("bench_ha: skipped (needs root for network namespaces)")
        return
    print(f"advbase 1, failures 3, runs {RUNS} (ucarp {PEER_RUNS}); outage = first failed request to first good one (client every 50 ms)")
    ours = _runs(None, ("engine-kill", "link-down", "proxy-kill", "demote"), RUNS)
    peer = _runs("ucarp", PEER_KINDS, PEER_RUNS)
    print(f"\nengine {carp.DEFAULT_ENGINE} (default), deadratio {carp.DEFAULT_DEADRATIO[carp.DEFAULT_ENGINE]}:")
    for kind, r in ours.items():
        print(f"  {kind:<12} failover {_fmt(r['failover'])} | return {_fmt(r['return'])}"
              f"{'  NOT BACK in runs ' + str(r['misses']) if r['misses'] else ''}")
    print(f"ucarp 1.5.2, deadratio {carp.DEFAULT_DEADRATIO['ucarp']} (peer):")
    for kind, r in peer.items():
        print(f"  {kind:<12} failover {_fmt(r['failover'])} | return {_fmt(r['return'])}"
              f"{'  NOT BACK in runs ' + str(r['misses']) if r['misses'] else ''}")
    for kind in PEER_KINDS:
        a, b = ours[kind]["failover"], peer[kind]["failover"]
        if a and b and statistics.median(a) > 0:
            print(f"  ratio {kind} median failover outage ucarp/{carp.DEFAULT_ENGINE}: "
                  f"{statistics.median(b) / statistics.median(a):.1f}x")


if __name__ == "__main__":
    main()
