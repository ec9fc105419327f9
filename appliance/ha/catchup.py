"""Sync catch-up at start: a node back from an outage stays demoted until the master has pushed what it missed.

While a node was off, the other node (MASTER meanwhile) may have cut a newer generation; its push to the node that
was off failed. With preempt, the returning node would take the VIP back as soon as its proxy answers, and serve
the older config until someone notices (its own next `appliance sync` stops with exit 4). So at start the
supervisor asks the peers (`ask`, the sync link's `status`), and when a MASTER peer's live generation is above
this node's, the node stays demoted (the advskew of `appliance demote`, so it takes over if that peer dies) until
that generation is live here: the master's next scheduled sync pushes it, as to any backup that lagged.

Only an answer keeps the node demoted: no key, no reachable peer or no answer within `pending_max` seconds, and
the gate opens. It never keeps a node from becoming MASTER when no other node is."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from appliance.core import state
from appliance.core.paths import Paths

# (MASTER peer, its live generation) when above ours, else None; given the log for why a peer was not asked
Ahead = Callable[[Callable[[str], None]], "tuple[str, int] | None"]


def pending_limit(sync_timeout: float) -> float:
    """How long the question may take before the gate opens: the SSH connection and the status command each get
    sync.timeout. Waiting longer is safe (the node is only demoted: it still takes over if no peer is MASTER), and
    a slow box needs it: a TCG guest at boot took about 100 s to load the SSH library and get the peer's answer."""
    return 2.0 * sync_timeout


@dataclass
class CatchUp:
    """The gate: `reason` is why the node is held demoted, None once it is not."""

    ask: Ahead
    paths: Paths
    on_change: Callable[[], None]       # the supervisor re-arms its engines
    log: Callable[[str], None]
    pending_max: float = 10.0
    reason: str | None = "sync catch-up: asking the peers for their generation"

    def start(self, stop: threading.Event, poll: float = 1.0) -> None:
        answered = threading.Event()
        threading.Thread(target=self._run, args=(stop, poll, answered), name="catch-up", daemon=True).start()
        threading.Thread(target=self._deadline, args=(stop, answered), name="catch-up-deadline", daemon=True).start()

    def _deadline(self, stop: threading.Event, answered: threading.Event) -> None:
        if not answered.wait(self.pending_max) and not stop.is_set():
            self._open(f"sync catch-up: no answer from the peers within {self.pending_max:g} s; not waiting for one")

    def _run(self, stop: threading.Event, poll: float, answered: threading.Event) -> None:
        t0 = time.monotonic()
        try:
            ahead = self.ask(self.log)
        except Exception as e:  # the gate's own failure never keeps the node demoted
            ahead = None
            self.log(f"sync catch-up: the peers were not asked ({type(e).__name__}: {e})")
        answered.set()
        took = time.monotonic() - t0
        ours = state.sync_generation(self.paths) or 0
        if ahead is None or ahead[1] <= ours:
            self._open(None)
            return
        peer, gen = ahead
        self.reason = f"sync catch-up: {peer} (MASTER) has generation {gen}, this node {ours}"
        self.log(f"{self.reason}: demoted until {peer}'s sync pushes it (answered in {took:.0f} s)")
        self.on_change()
        while not stop.wait(poll):  # bounded by the supervisor's life: it sets `stop` on exit
            now = state.sync_generation(self.paths) or 0
            if now >= gen:
                self._open(f"sync catch-up: generation {now} is live here (from {peer}); no longer demoted")
                return

    def _open(self, why: str | None) -> None:
        if self.reason is None:
            return
        self.reason = None
        if why:
            self.log(why)
        self.on_change()
