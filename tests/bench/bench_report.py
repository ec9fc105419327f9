"""`appliance report` on a million-line access log (one core, CPU time), beside sarg and calamaris on the same log."""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from filters.proxy.accesslog import DENIED_TAG, block_tag, refusal_tag, squid_line

PY = sys.executable
APPLIANCE = str(Path(PY).parent / "appliance")
N_LINES = 1_000_000
START = 1_704_240_000.0  # 2024-01-03 00:00 UTC: a day of traffic
CATEGORIES = ("adult", "malware", "phishing", "social", "gambling")
REASONS = ("loopback", "connect-port", "bad-host", "header-timeout")


def make_log(path: Path, n: int, seed: int = 14, domains: int = 20_000) -> dict:
    """Write n deterministic records (allowed, blocked by category, refused, denied clients) the way the proxy
    writes them; returns the counts a report must find (requests, blocked, bytes, by category, by reason)."""
    rnd = random.Random(seed)
    want = {"requests": n, "blocked": 0, "bytes": 0, "categories": {}, "refusals": {}}
    step = 86400 / max(n, 1)
    with open(path, "w", encoding="utf-8") as f:
        buf = []
        for i in range(n):
            ts = START + i * step
            client = f"192.168.1.{rnd.randrange(2, 250)}"
            host = f"site{int(rnd.paretovariate(1.2)) % domains}.example"
            r = rnd.random()
            tag, code, status, size, peer = "", "TCP_MISS", 200, rnd.randrange(200, 60_000), "203.0.113.7"
            if r < 0.12:
                cat = CATEGORIES[int(r * 1000) % len(CATEGORIES)]
                tag, code, status, size, peer = block_tag(cat), "TCP_DENIED", 403, 2_100, "-"
                want["categories"][cat] = want["categories"].get(cat, 0) + 1
            elif r < 0.13:
                reason = REASONS[int(r * 10_000) % len(REASONS)]
                tag, code, status, size, peer = refusal_tag(reason), "TCP_DENIED", 403, 0, "-"
                want["refusals"][reason] = want["refusals"].get(reason, 0) + 1
            elif r < 0.132:
                tag, code, status, size, peer = DENIED_TAG, "TCP_DENIED", 403, 1_900, "-"
                want["refusals"]["client-not-allowed"] = want["refusals"].get("client-not-allowed", 0) + 1
            if tag:
                want["blocked"] += 1
            want["bytes"] += size
            method, url = ("CONNECT", f"{host}:443") if rnd.random() < 0.5 else ("GET", f"http://{host}/p/{i % 97}")
            buf.append(squid_line(ts, rnd.randrange(1, 400), client, code, status, size, method, url, peer,
                                  "text/html" if method == "GET" else "-", tag=tag))
            if len(buf) >= 10_000:
                f.write("".join(buf))
                buf = []
        f.write("".join(buf))
    return want


def _timed(argv: list[str], **kw) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the child, result) for one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), r


def _one_core(argv: list[str]) -> list[str]:
    return (["taskset", "-c", "0"] if shutil.which("taskset") else []) + argv


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-report-") as d:
        log = Path(d) / "access.log"
        t0 = time.monotonic()
        want = make_log(log, N_LINES)
        print(f"log: {N_LINES:,} lines, {log.stat().st_size / 2**20:.0f} MiB, written in {time.monotonic() - t0:.1f} s")
        wall, cpu, r = _timed(_one_core([APPLIANCE, "report", "--json", str(log)]))
        if r.returncode != 0:
            raise RuntimeError(f"appliance report failed: {r.stderr}")
        got = json.loads(r.stdout)
        ok = (got["requests"], got["blocked"], got["bytes"]) == (want["requests"], want["blocked"], want["bytes"])
        print(f"appliance report --json: {wall:.2f} s wall, {cpu:.2f} s CPU on one core "
              f"({N_LINES / cpu:,.0f} lines per CPU-second); figures {'match' if ok else 'DIFFER'}: "
              f"{got['requests']:,} requests, {got['blocked']:,} blocked, {got['bytes']:,} bytes")
        _peers(Path(d), log, cpu)


def _peers(d: Path, log: Path, ours: float) -> None:
    """sarg and calamaris on the same log, when installed; the ratio of their CPU time to ours."""
    peers = {
        "calamaris -a -f squid-extended": ["calamaris", "-a", "-f", "squid-extended"],
        "sarg": ["sarg", "-l", str(log), "-o", str(d / "sarg")],
    }
    (d / "sarg").mkdir()
    for name, argv in peers.items():
        if not shutil.which(argv[0]):
            print(f"{name}: not installed")
            continue
        with open(log, "rb") as stdin:
            wall, cpu, r = _timed(_one_core(argv), stdin=stdin if argv[0] == "calamaris" else subprocess.DEVNULL,
                                  timeout=1800)
        print(f"{name}: {wall:.2f} s wall, {cpu:.2f} s CPU (exit {r.returncode}); "
              f"{cpu / ours:.1f}x the CPU time of appliance report")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
