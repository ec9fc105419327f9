"""CARP engines side by side in namespaces: takeover after SIGKILL/SIGTERM of the master and advert regularity, ucarp vs the speaker."""
from __future__ import annotations

import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

from tests.support.carp_lan import Lan
from tests.support.wait import wait_until

RUNS = 5
ADVBASE, DEADRATIO = 1, 3
SKEW_MASTER, SKEW_BACKUP = 0, 100    # as the example cluster: fw1 advskew 0, fw2 advskew 100, preempt on
IDEAL = ADVBASE * DEADRATIO + SKEW_BACKUP / 256   # protocol takeover by the backup after the last advert


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "no data"
    return f"min {min(xs):.3f}  median {statistics.median(xs):.3f}  max {max(xs):.3f} s  (n={len(xs)})"


def _engine_runs(engine: str) -> dict:
    """Kill (or TERM) the master, time the backup's first advert, restart the master (it preempts back), repeat."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-carp-{engine}-"))
    lan = Lan(2, work).up()
    res = {"kill_since_last": [], "kill_since_signal": [], "term_since_signal": [], "gaps": []}
    try:
        obs = lan.observe()
        kw = dict(advbase=ADVBASE, preempt=True, deadratio=DEADRATIO)
        master, backup = lan.nodes
        lan.start(engine, master, advskew=SKEW_MASTER, **kw)
        lan.start(engine, backup, advskew=SKEW_BACKUP, **kw)
        t_start = time.monotonic()
        first_ad = wait_until(lambda: obs.first(lambda x: x["src"] == master.ip, t_start), 12,
                              f"{engine}: an advert from the master", step=0.02)
        steady = [first_ad["t"]]                                  # start of each steady mastership window
        windows = []
        # pacing, not synchronisation: one longer steady window for advert regularity, then every signal lands
        # 1.2 s after the (preempting) master's first advert, 0.2 s into an advert interval, the same in every run
        time.sleep(4)
        for kind in ["kill"] * RUNS + ["term"] * RUNS:
            time.sleep(1.2)
            ads = [x for x in obs.adverts if x["src"] == master.ip]
            t_sig = time.monotonic()
            windows.append((steady[-1], t_sig))
            if kind == "kill":
                os.kill(master.proc.pid, signal.SIGKILL)
            else:
                master.proc.send_signal(signal.SIGTERM)
            first = wait_until(lambda: obs.first(lambda x: x["src"] == backup.ip and x["advbase"] != 255, t_sig), 10,
                               f"{engine}: the backup's takeover after {kind}", step=0.02)
            last = max(x["t"] for x in ads if x["t"] <= t_sig) if ads else t_sig
            if kind == "kill":
                res["kill_since_last"].append(first["t"] - last)
                res["kill_since_signal"].append(first["t"] - t_sig)
            else:
                res["term_since_signal"].append(first["t"] - t_sig)
            try:
                master.proc.wait(timeout=10)
            except Exception:
                master.proc.kill()
            t_back = time.monotonic()
            lan.start(engine, master, advskew=SKEW_MASTER, **kw)  # returns and preempts
            back = wait_until(lambda: obs.first(lambda x: x["src"] == master.ip and x["advbase"] != 255, t_back), 10,
                              f"{engine}: the returning master preempting", step=0.02)
            steady.append(back["t"])
        # advert intervals of the (advskew 0) master inside its steady windows, transitions excluded
        for w0, w1 in windows:
            ts = sorted(x["t"] for x in obs.adverts if x["src"] == master.ip and w0 <= x["t"] < w1
                        and x["advbase"] != 255)
            res["gaps"] += [y - x for x, y in zip(ts, ts[1:])]
        obs.close()
    finally:
        lan.close()
        shutil.rmtree(work, ignore_errors=True)
    return res


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("ucarp", path=os.environ.get("PATH", "") + ":/usr/sbin"):
        print("bench_carp: skipped (needs root and ucarp)")
        return
    t0 = time.monotonic()
    out = {e: _engine_runs(e) for e in ("ucarp", "speaker")}
    print(f"advbase {ADVBASE}, deadratio {DEADRATIO}, advskew {SKEW_MASTER}/{SKEW_BACKUP}, preempt: "
          f"protocol takeover = {IDEAL:.2f} s after the master's last advert")
    for e, r in out.items():
        print(f"\n[{e}]")
        print(f"  SIGKILL, takeover after master's last advert: {_fmt(r['kill_since_last'])}")
        print(f"  SIGKILL, takeover after the kill:             {_fmt(r['kill_since_signal'])}")
        print(f"  SIGTERM, takeover after the signal:           {_fmt(r['term_since_signal'])}")
        g = r["gaps"]
        if g:
            print(f"  advert interval: mean {statistics.mean(g):.4f} s  jitter (stdev) {statistics.pstdev(g) * 1000:.1f} ms"
                  f"  max |dev| {max(abs(x - ADVBASE) for x in g) * 1000:.1f} ms  (n={len(g)})")
    u, s = out["ucarp"], out["speaker"]
    med = statistics.median
    print("\nratios ucarp / speaker (median):")
    print(f"  SIGKILL takeover after last advert: {med(u['kill_since_last']):.3f} / {med(s['kill_since_last']):.3f}"
          f" = {med(u['kill_since_last']) / med(s['kill_since_last']):.2f}x; excess over protocol"
          f" {med(u['kill_since_last']) - IDEAL:+.3f} s vs {med(s['kill_since_last']) - IDEAL:+.3f} s")
    print(f"  SIGTERM takeover: {med(u['term_since_signal']):.3f} / {med(s['term_since_signal']):.3f}"
          f" = {med(u['term_since_signal']) / med(s['term_since_signal']):.1f}x")
    print(f"bench_carp total {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
