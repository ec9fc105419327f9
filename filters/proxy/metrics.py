"""Counters per worker (requests, blocks by category, errors), dumped to the run dir and summed as Prometheus text."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from filters.proxy.guard import REASONS


class Counters:
    def __init__(self) -> None:
        self.requests = 0
        self.connects = 0
        self.denied = 0
        self.errors = 0
        self.blocks: dict[str, int] = {}
        self.refused: dict[str, int] = {}  # by guard reason: requests the appliance refuses whatever the lists say
        self.reloads = 0
        self.reload_failures = 0
        self._dirty = True

    def block(self, category: str | None) -> None:
        c = category or "none"
        self.blocks[c] = self.blocks.get(c, 0) + 1

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return {"requests": self.requests, "connects": self.connects, "denied": self.denied, "errors": self.errors,
                "blocks": self.blocks, "refused": dict(self.refused), "reloads": self.reloads, "reload_failures": self.reload_failures}

    def dump(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)


def worker_file(run: Path, index: int) -> Path:
    return run / f"proxy-worker-{index}.json"


def aggregate(files: list[Path]) -> dict:
    total = {"requests": 0, "connects": 0, "denied": 0, "errors": 0, "blocks": {}, "refused": dict.fromkeys(REASONS, 0),
             "reloads": 0, "reload_failures": 0}
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for k in ("requests", "connects", "denied", "errors", "reloads", "reload_failures"):
            total[k] += int(d.get(k, 0))
        for cat, n in d.get("blocks", {}).items():
            total["blocks"][cat] = total["blocks"].get(cat, 0) + int(n)
        for reason, n in d.get("refused", {}).items():
            total["refused"][reason] = total["refused"].get(reason, 0) + int(n)
    return total


def prometheus(total: dict, workers: int, extra: dict | None = None) -> str:
    out = [
        "# HELP appliance_proxy_requests_total HTTP requests and CONNECTs handled",
        "# TYPE appliance_proxy_requests_total counter",
        f"appliance_proxy_requests_total {total['requests']}",
        "# HELP appliance_proxy_connects_total CONNECT tunnels asked for",
        "# TYPE appliance_proxy_connects_total counter",
        f"appliance_proxy_connects_total {total['connects']}",
        "# HELP appliance_proxy_blocks_total requests blocked, by category",
        "# TYPE appliance_proxy_blocks_total counter",
    ]
    for cat, n in sorted(total["blocks"].items()):
        out.append(f'appliance_proxy_blocks_total{{category="{cat}"}} {n}')
    out += [
        "# HELP appliance_proxy_denied_total requests from clients outside proxy.clients",
        "# TYPE appliance_proxy_denied_total counter",
        f"appliance_proxy_denied_total {total['denied']}",
        "# HELP appliance_proxy_refused_total requests the appliance refuses whatever the lists say, by reason",
        "# TYPE appliance_proxy_refused_total counter",
    ]
    refused = {**dict.fromkeys(REASONS, 0), **total.get("refused", {})}  # every reason shows, 0 until it happens
    for reason, n in refused.items():
        out.append(f'appliance_proxy_refused_total{{reason="{reason}"}} {n}')
    out += [
        "# HELP appliance_proxy_errors_total upstream or protocol errors",
        "# TYPE appliance_proxy_errors_total counter",
        f"appliance_proxy_errors_total {total['errors']}",
        "# HELP appliance_proxy_reloads_total reloads applied / refused (old rules kept)",
        "# TYPE appliance_proxy_reloads_total counter",
        f'appliance_proxy_reloads_total{{result="ok"}} {total["reloads"]}',
        f'appliance_proxy_reloads_total{{result="failed"}} {total["reload_failures"]}',
        "# HELP appliance_proxy_workers worker processes running",
        "# TYPE appliance_proxy_workers gauge",
        f"appliance_proxy_workers {workers}",
    ]
    for k, v in (extra or {}).items():
        out.append(f"{k} {v}")
    return "\n".join(out) + "\n"


# The HA side's own metrics, written by the CARP supervisor and carp-watch beside the proxy's run files: served
# with the proxy's (one /metrics per node), read as they are (small files, written atomically).
NODE_PROM_FILES = ("liveness.prom", "carp-watch.prom")


def node_files(run: Path) -> str:
    out = []
    for name in NODE_PROM_FILES:
        try:
            text = (run / name).read_text(errors="replace")
        except OSError:
            continue
        out.append(text if text.endswith("\n") else text + "\n")
    return "".join(out)


def now() -> float:
    return time.time()
