"""What the page shows, gathered: the node's status (from the CLI's `appliance status` code, passed in), the last
HA transitions (ha.log), the last sync result (sync.log), the peers' generations (their /status.json over the sync
link, refreshed in the background) and the access-log traffic."""
from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from appliance.admin.probe import fetch_peer
from appliance.admin.traffic import Traffic
from appliance.core import prom
from appliance.core.paths import Paths

TRANSITIONS = 12         # ha.log lines shown
SYNC_LINES = 3           # sync.log lines shown
TAIL_BYTES = 64 * 1024   # read from the end of a log, never the whole file
PEER_EVERY = 10.0        # seconds between two questions to a peer
STALE_ROUNDS = 3         # an answer older than this many rounds is marked stale on the page
log = logging.getLogger("appliance.admin")


def tail(path: Path, n: int) -> list[str]:
    """The last n lines of a text file (at most TAIL_BYTES read); [] when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if size > TAIL_BYTES:
        lines = lines[1:]  # the first one is cut
    return [x for x in lines if x.strip()][-n:]


def split_line(line: str) -> dict:
    """`2024-01-03T10:00:00 carp: BACKUP -> MASTER ...` as {"at": ..., "text": ...}."""
    at, _, text = line.partition(" ")
    return {"at": at, "text": text} if at[:4].isdigit() else {"at": "", "text": line}


@dataclass
class Peers:
    """Each peer's last answer ({"role", "generation", "at"} or {"error"}), asked in one background thread."""

    targets: dict[str, str]          # peer name -> its sync address
    port: int
    source: str | None
    fetch: Callable[[str, int, str | None], dict] = fetch_peer
    answers: dict[str, dict] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        if self.targets:
            threading.Thread(target=self._run, name="admin-peers", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                for name, address in self.targets.items():
                    self.answers[name] = self.ask(name, address)
            except Exception:  # noqa: BLE001 - the loop must outlive any bug: a dead thread shows old answers forever
                log.exception("admin: asking the peers failed; asking again in %.0f s", PEER_EVERY)
            self.stop.wait(PEER_EVERY)

    def ask(self, name: str, address: str) -> dict:
        """One peer's answer, or its error: whatever a peer sends back, this returns (a peer is not trusted)."""
        try:
            s = self.fetch(address, self.port, self.source)
            sync = s.get("sync")
            generation = sync.get("generation") if isinstance(sync, dict) else None
            role = s.get("role")
            return {"sync": address, "role": role if isinstance(role, str) else None,
                    "generation": generation if isinstance(generation, int) else None, "at": time.time()}
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:  # bind() failed: nothing was sent
                return {"sync": address, "error": f"not asked: our sync address {self.source} is not on this host",
                        "at": time.time()}
            return {"sync": address, "error": f"{type(e).__name__}: {e}", "at": time.time()}
        except Exception as e:  # noqa: BLE001 - a peer's body is untrusted: deep JSON raises RecursionError, ...
            return {"sync": address, "error": f"{type(e).__name__}: {str(e)[:200]}", "at": time.time()}

    def snapshot(self, now: float | None = None) -> dict:
        """Each peer's last answer with its age in seconds and whether it is stale (older than STALE_ROUNDS)."""
        now = time.time() if now is None else now
        out = {}
        for name, a in self.targets.items():
            answer = dict(self.answers.get(name, {"sync": a, "error": "not asked yet"}))
            if "at" in answer:
                answer["age"] = max(0, round(now - answer["at"]))
                answer["stale"] = answer["age"] > STALE_ROUNDS * PEER_EVERY
            out[name] = answer
        return out


@dataclass
class Sources:
    """Everything the server reads. status and metrics come from the CLI (they need appliance.ha and the proxy)."""

    paths: Paths
    status: Callable[[], dict]
    metrics: Callable[[], str]
    traffic: Traffic
    peers: Peers


def snapshot(src: Sources) -> dict:
    """The whole status as one JSON-ready dict (what /status.json returns and the page renders)."""
    st = src.status()
    return {
        "node": st.get("node"), "role": st.get("role"), "vhids": st.get("vhids", []),
        "vip": st.get("vip"), "demoted": st.get("demoted"), "health_demoted": st.get("health_demoted"),
        "engine": st.get("carp", {}), "proxy": st.get("proxy", {}), "fast": st.get("fast"),
        "carp_watch": st.get("carp_watch"), "counters": prom.parse(src.metrics()),
        "transitions": [split_line(x) for x in tail(src.paths.ha_log, TRANSITIONS)][::-1],
        "sync": {"generation": st.get("sync_generation"),
                 "last": [split_line(x) for x in tail(src.paths.state / "sync" / "sync.log", SYNC_LINES)][::-1]},
        "peers": src.peers.snapshot(),
        "traffic": src.traffic.get(),
        "at": time.time(),
    }
