"""N nodes in the lab (root) with real ucarp: three nodes by advskew in one vhid, a second vhid for active/active."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from appliance.ha import ip as netns
from appliance.lab import daemons, lifecycle, topology
from appliance.lab.model import LAB_ROOT_ENV, Lab, LabError
from tests.support.env import EXAMPLES, need_tool
from tests.support.wait import poll

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timing]


def vip_holders(lab: Lab) -> dict[str, list[str]]:
    return {v: topology.holders(lab, ip) for v, ip in lab.vips.items()}


def wait_holders(lab: Lab, want: dict[str, list[str]], timeout: float = 25.0) -> dict[str, list[str]]:
    """The VIP holders per vhid once they are `want`, or as they are after `timeout`."""
    poll(lambda: vip_holders(lab) == want, timeout, step=0.1)
    return vip_holders(lab)


@pytest.fixture(scope="module")
def lab3(tmp_path_factory: pytest.TempPathFactory):
    need_tool("ip", "arping", "ucarp")
    tree = tmp_path_factory.mktemp("etc3")
    shutil.copytree(EXAMPLES, tree, dirs_exist_ok=True)
    data = yaml.safe_load((tree / "appliance.yaml").read_text())
    data["nodes"] = {
        "fw1": {"lan": "192.168.1.2/24", "sync": "192.168.200.1/29", "advskew": 0},
        "fw2": {"lan": "192.168.1.3/24", "sync": "192.168.200.2/29", "advskew": 100},
        "fw3": {"lan": "192.168.1.4/24", "sync": "192.168.200.3/29", "advskew": 200},
    }
    data["cluster"]["extra_vhids"] = [{"vhid": 2, "vip": "192.168.1.51/24", "advskew": {"fw1": 200, "fw2": 0, "fw3": 100}}]
    data["proxy"]["workers"] = 1
    (tree / "appliance.yaml").write_text(yaml.safe_dump(data))
    root = tmp_path_factory.mktemp("labs3")
    old = os.environ.get(LAB_ROOT_ENV)
    os.environ[LAB_ROOT_ENV] = str(root)
    name = f"cn{secrets.token_hex(3)}"
    try:
        try:
            yield lifecycle.up(tree / "appliance.yaml", name, engine="ucarp")
        except LabError as e:
            pytest.fail(f"lab up failed: {e}")
    finally:
        lifecycle.down(name)
        if old is None:
            os.environ.pop(LAB_ROOT_ENV, None)
        else:
            os.environ[LAB_ROOT_ENV] = old


def test_active_active_and_advskew_order(lab3) -> None:
    assert wait_holders(lab3, {"1": ["fw1"], "2": ["fw2"]}) == {"1": ["fw1"], "2": ["fw2"]}
    engines = {v: daemons.engine_pid(lab3, "fw1", int(v)) for v in lab3.vips}
    assert all(engines.values()) and len(set(engines.values())) == 2  # one engine per vhid
    assert Path(f"/proc/{engines['1']}/cmdline").read_bytes().split(b"\0")[0].endswith(b"ucarp")
    # fw1 cut off: vhid 1 goes to the next by advskew (fw2, not fw3); vhid 2 stays on fw2
    n = lab3.nodes["fw1"]
    netns.ip("link", "set", n.lan_if, "down", netns=n.netns)
    try:
        assert wait_holders(lab3, {"1": ["fw2"], "2": ["fw2"]}) == {"1": ["fw2"], "2": ["fw2"]}
    finally:
        netns.ip("link", "set", n.lan_if, "up", netns=n.netns)
    assert wait_holders(lab3, {"1": ["fw1"], "2": ["fw2"]}) == {"1": ["fw1"], "2": ["fw2"]}


def test_sigkill_of_ucarp_drops_the_vip_at_once_and_restarts(lab3) -> None:
    """ucarp alone leaves the VIP on a SIGKILLed master (two holders); the supervisor removes it at once."""
    assert wait_holders(lab3, {"1": ["fw1"], "2": ["fw2"]}) == {"1": ["fw1"], "2": ["fw2"]}
    pid = daemons.engine_pid(lab3, "fw1", 1)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    poll(lambda: "fw1" not in topology.holders(lab3), 2.0, step=0.02)
    dropped = time.monotonic() - t0
    assert dropped < 1.0, f"fw1 kept the VIP {dropped:.2f} s after its engine died"
    got = wait_holders(lab3, {"1": ["fw1"], "2": ["fw2"]})
    assert got == {"1": ["fw1"], "2": ["fw2"]}
    new = daemons.engine_pid(lab3, "fw1", 1)
    assert new and new != pid
    log = (lab3.nodes["fw1"].state / "ha.log").read_text()
    assert "exited (-9)" in log and "vip dropped" in log
