"""ucarp's stderr report (appliance/ha/engine_report.py): its last switch is kept and, once settled, the VIP follows it."""
from __future__ import annotations

import os
import subprocess
import time
from types import SimpleNamespace

from appliance.core import pids
from appliance.ha import engine_report
from appliance.ha.engine_report import SETTLE, EngineReport
from tests.support.wait import wait_until


def _report(*lines: bytes) -> EngineReport:
    r, w = os.pipe()
    rep = EngineReport(os.fdopen(r, "rb"))
    with os.fdopen(w, "wb") as out:
        out.write(b"".join(lines))
    return rep


def test_the_last_switch_is_kept_and_checked_once_settled() -> None:
    rep = _report(b"2026-11-29T07:19:25.676325: [WARNING] Switching to state: BACKUP\n",
                  b"2026-11-29T07:19:25.676579: [WARNING] Spawning [/run/carp-down.sh em0 192.168.1.50 1]\n",
                  b"2026-11-29T07:19:29.1: [WARNING] Switching to state: MASTER\n")
    wait_until(lambda: rep.state == "MASTER", 5, "the last switch read")
    now = time.monotonic()
    assert rep.due(now) is None                      # not settled: the up script may still be running
    assert rep.due(now + SETTLE + 0.1) == "MASTER"
    assert rep.due(now + SETTLE + 0.2) is None       # one check per EVERY seconds
    assert _report(b"no switch here\n").due(now + 60) is None


def test_the_vip_follows_a_settled_switch_ordered_as_of_that_switch(monkeypatch) -> None:
    rep = _report(b"x: [WARNING] Switching to state: BACKUP\n")
    wait_until(lambda: rep.state == "BACKUP", 5, "the switch read")
    applied = []
    monkeypatch.setattr(engine_report.role, "apply", lambda *a, **kw: applied.append((a, kw)))
    sup = SimpleNamespace(iface="em0", paths="P", cfg="C", node="fw2", config_path="F")
    group = SimpleNamespace(vhid=1, vip="192.168.1.50/24")
    monkeypatch.setattr(engine_report.netns, "has_address", lambda iface, vip: False)
    engine_report.follow(rep, time.monotonic() + SETTLE + 1, sup, group)
    assert applied == []                              # BACKUP and no VIP: agreed
    monkeypatch.setattr(engine_report.netns, "has_address", lambda iface, vip: True)
    engine_report.follow(rep, time.monotonic() + SETTLE + 3, sup, group)
    (args, kw), = applied
    assert args[3] == "backup" and args[4] == 1 and "ucarp says BACKUP; the VIP was here" in kw["reason"]
    later = subprocess.Popen(["sleep", "5"])         # a script forked after the switch still wins over this apply
    try:
        boot, key = pids.fork_order(later.pid)
    finally:
        later.kill()
        later.wait()
    assert kw["boot"] == boot and kw["seq"] < key
    assert kw["seq"] > pids.fork_order()[1]          # and one forked before the switch (this test process) loses
