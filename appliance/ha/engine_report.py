"""ucarp's own account of its state, read from its stderr ("Switching to state: MASTER"), and the check that puts the
VIP where ucarp last said it belongs when a script's result was lost.

ucarp's up/down scripts start the change in the background (ucarp waits for a script), so the changes can finish
in any order; they are ordered by fork time (`role --fork-seq`), yet twice in the 3-node lab a node kept (or got) a
VIP that ucarp's last switch said it should not have, for the whole 25 s the test waited. The supervisor does not guess why: once ucarp's last
switch is SETTLE seconds old, it compares the VIP on the interface with it and applies ucarp's state, ordered like a
script forked at the moment of that switch (so a script forked after it still wins)."""
from __future__ import annotations

import re
import sys
import threading
import time
from typing import IO, Any

from appliance.core import pids
from appliance.ha import ip as netns
from appliance.ha import role

SWITCH = re.compile(rb"Switching to state: (MASTER|BACKUP)")
SETTLE = 3.0        # seconds after ucarp's last switch before its scripts' result is checked
EVERY = 1.0         # seconds between checks of one engine


class EngineReport:
    """Forwards the engine's stderr to ours (the unit's log) and keeps its last switch: state, and when (boot clock)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.state: str | None = None
        self.at = 0.0           # time.monotonic() of the last switch
        self.boottime = 0.0     # CLOCK_BOOTTIME of it: the clock of the scripts' fork times
        self.checked = 0.0
        threading.Thread(target=self._read, args=(stream,), name="engine-stderr", daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):   # ends when the engine exits (EOF)
            m = SWITCH.search(line)
            if m:
                self.state, self.at = m.group(1).decode(), time.monotonic()
                self.boottime = time.clock_gettime(time.CLOCK_BOOTTIME)
            try:
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        stream.close()

    def due(self, now: float) -> str | None:
        """ucarp's state when a check is due (its last switch settled, the last check EVERY s ago), else None."""
        if self.state is None or now - self.at < SETTLE or now - self.checked < EVERY:
            return None
        self.checked = now
        return self.state


def follow(report: EngineReport, now: float, sup: Any, group: role.Group) -> None:
    """Where ucarp's last switch (settled) and the VIP on the supervisor's interface disagree, apply ucarp's state."""
    want = report.due(now)
    if want is None or netns.has_address(sup.iface, group.vip) == (want == "MASTER"):
        return
    boot, seq = pids.order_at(report.boottime)
    role.apply(sup.paths, sup.cfg, sup.node, want.lower(), group.vhid, sup.iface, sup.config_path, seq=seq, boot=boot,
               reason=f"ucarp says {want}; the VIP was {'not ' if want == 'MASTER' else ''}here")
