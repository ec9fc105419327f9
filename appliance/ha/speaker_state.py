"""The speaker's state file: written on every transition and while counters change, read back at start."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.ha import guard

if TYPE_CHECKING:  # the speaker imports this module; the type only names it
    from appliance.ha.speaker import Speaker

log = logging.getLogger("carp-speaker")


def restore(sp: Speaker) -> int | None:
    """Counters from the state file an earlier run of this vhid left: our own (so a restarted us continues
    above it even if the clock went back) and each peer's (so a replay stays a replay across a restart)."""
    if not sp.args.state_file:
        return None
    try:
        old = json.loads(Path(sp.args.state_file).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("vhid") != sp.args.vhid or old.get("vip") != sp.args.addr:
        return None
    sp.guard.restore(old.get("peers") or {}, time.monotonic())
    sp.guard.restore_own(old.get("own_counters"))
    tx = old.get("tx_counter")
    return tx if isinstance(tx, int) and 0 <= tx <= guard.COUNTER_MASK else None


def all_counters(sp: Speaker) -> dict[str, int]:
    c = dict(sp.counters)
    c.update({f"bad_{k}": v for k, v in sp.bad.counts.items()})
    c["log_suppressed"] = sp.bad.suppressed
    c["counter_resets"] = sp.guard.counter_resets
    return c


def write(sp: Speaker) -> None:
    if not sp.args.state_file:
        return
    path = Path(sp.args.state_file)
    data = {"state": sp.core.state, "vhid": sp.args.vhid, "iface": sp.iface, "vip": sp.args.addr,
            "advbase": sp.args.advbase, "advskew": sp.args.advskew, "since": sp.since,
            "pid": os.getpid(), "engine": "speaker", "counters": all_counters(sp),
            "tx_counter": sp.counter, "own_counters": sp.guard.own, "peers_configured": sorted(sp.guard.peers),
            "peers": sp.guard.snapshot(), "bad": sp.bad.snapshot()}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write state file %s: %s", path, e.strerror)
