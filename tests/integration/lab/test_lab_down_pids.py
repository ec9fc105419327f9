"""`lab down` signals a recorded PID only while it still runs in one of the lab's namespaces (no stale-PID kills)."""
from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from appliance.lab import lifecycle
from appliance.lab.model import LAB_ROOT_ENV, Lab, LabNode, lab_dir
from tests.support.env import need_tool
from tests.support.wait import poll


@pytest.mark.root
def test_lab_down_leaves_a_recorded_pid_outside_its_namespaces_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    need_tool("ip")
    monkeypatch.setenv(LAB_ROOT_ENV, str(tmp_path / "labs"))
    name = f"cp{secrets.token_hex(3)}"
    # a process of ours in the host namespace whose PID a stale lab file happens to hold (a recycled PID)
    other = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        d = lab_dir(name)
        node = LabNode(netns=f"{name}-fw1", lan_if="em0", sync_if="em1", lan="192.168.1.2/24", sync="192.168.200.1/30",
                       config=d / "fw1" / "state" / "current" / "appliance.yaml", state=d / "fw1" / "state",
                       dir=d / "fw1", carp_pid=other.pid, proxy_pid=other.pid)
        stale = Lab(name=name, dir=d, origin_pid=other.pid, nodes={"fw1": node})
        d.mkdir(parents=True)
        stale.save()
        assert lifecycle.down(name) == []
        # a signal would have ended it within moments: watch it that long
        assert poll(lambda: other.poll() is not None, 0.3) is False, \
            f"lab down signalled PID {other.pid}, which is not in any of its namespaces"
        assert not d.exists()
    finally:
        other.kill()
        other.wait(5)
