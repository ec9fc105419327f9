"""`lab down` signals a recorded PID only while it still runs in one of the lab's namespaces (no stale-PID kills)."""
from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.env import need_tool


@pytest.mark.root
def test_lab_down_leaves_a_recorded_pid_outside_its_namespaces_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    need_tool("ip")
    from appliance.lab import lab as labmod
    monkeypatch.setenv(labmod.LAB_ROOT_ENV, str(tmp_path / "labs"))
    name = f"cp{secrets.token_hex(3)}"
    # a process of ours in the host namespace whose PID a stale lab file happens to hold (a recycled PID)
    other = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        stale = {"name": name, "dir": str(labmod.lab_dir(name)), "created_netns": [], "origin_pid": other.pid,
                 "nodes": {"fw1": {"carp_pid": other.pid, "proxy_pid": other.pid, "sshd_pid": None}}}
        Path(stale["dir"]).mkdir(parents=True)
        labmod.save(stale)
        assert labmod.down(name) == []
        time.sleep(0.3)
        assert other.poll() is None, f"lab down signalled PID {other.pid}, which is not in any of its namespaces"
        assert not Path(stale["dir"]).exists()
    finally:
        other.kill()
        other.wait(5)
