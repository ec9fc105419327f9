"""The typed lab model reads and writes lab.json in the format the dict-based lab wrote (no root needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.lab.model import LAB_ROOT_ENV, Lab, LabError, lab_dir, list_labs, load

NODE = {"netns": "cg1-fw1", "lan_if": "em0", "sync_if": "em1", "lan": "192.168.1.2/24", "sync": "192.168.200.1/30",
        "config": "/l/fw1/state/current/appliance.yaml", "state": "/l/fw1/state", "dir": "/l/fw1",
        "engine_pid": 11, "proxy_pid": 12, "carp_pid": 13, "sshd_pid": 14, "admin_pid": 15}
STATE = {  # a lab.json as `lab up` wrote it before the model existed
    "name": "cg1", "dir": "/l", "source_config": "/etc/appliance/appliance.yaml", "engine": None, "deadratio": 3,
    "vip": "192.168.1.50", "vips": {"1": "192.168.1.50", "2": "192.168.1.51"}, "proxy_port": 3128,
    "origin": "http://192.168.1.254:8080/", "lan": {"netns": "cg1-lan", "bridge": "br0", "origin_ip": "192.168.1.254"},
    "client": {"netns": "cg1-cli", "ip": "192.168.1.253", "lan_if": "eth0"}, "nodes": {"fw1": NODE},
    "created_netns": ["cg1-lan", "cg1-cli", "cg1-fw1"], "origin_pid": 10, "proxy_cmd": None,
}


def test_the_state_file_round_trips_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LAB_ROOT_ENV, str(tmp_path))
    lab = Lab.from_json({**STATE, "dir": str(lab_dir("cg1"))})
    assert lab.nodes["fw1"].state == Path("/l/fw1/state") and lab.nodes["fw1"].lan_ip == "192.168.1.2"
    assert lab.main_vhid == 1 and lab.node_by_ip() == {"192.168.1.2": "fw1"}
    lab.dir.mkdir()
    lab.save()
    assert json.loads((lab.dir / "lab.json").read_text()) == {**STATE, "dir": str(lab_dir("cg1"))}
    assert list_labs() == ["cg1"] and load() == lab and load("cg1") == lab


def test_lookup_errors_name_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LAB_ROOT_ENV, str(tmp_path))
    monkeypatch.delenv("APPLIANCE_LAB", raising=False)
    with pytest.raises(LabError, match="no lab is up"):
        load()
    with pytest.raises(LabError, match="no lab named 'nope'"):
        load("nope")
    for name in ("a1", "b2"):
        Lab(name=name, dir=lab_dir(name)).dir.mkdir()
        Lab(name=name, dir=lab_dir(name)).save()
    with pytest.raises(LabError, match=r"several labs are up \(a1, b2\)"):
        load()
    with pytest.raises(LabError, match="no node 'fw9'"):
        load("a1").node("fw9")
    (lab_dir("a1") / "lab.json").write_text(json.dumps({"name": "a1", "nodes": {"fw1": {"netns": "x"}}}))
    with pytest.raises(LabError, match="not a lab state file"):
        load("a1")
