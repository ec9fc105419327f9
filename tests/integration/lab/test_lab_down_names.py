"""Issue 12, finding 7: `lab down --name` takes a lab name, never a path; it removes only a lab's own directory.

Before, `--name .` removed the whole lab root (exit 0). Each bad name now exits 2 naming the rule, and every
directory the test made (the lab root, a lab in it, a directory beside it, one in /tmp) is still there."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
from pathlib import Path

import pytest

from appliance.lab import lifecycle
from appliance.lab.model import LAB_ROOT_ENV, Lab, LabError, check_name, lab_dir, load
from tests.support.env import APPLIANCE, need_tool


@pytest.fixture
def labs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    root = tmp_path / "labs"
    monkeypatch.setenv(LAB_ROOT_ENV, str(root))
    monkeypatch.delenv("APPLIANCE_LAB", raising=False)
    name = f"dn{secrets.token_hex(3)}"
    lab = Lab(name=name, dir=lab_dir(name))
    lab.dir.mkdir(parents=True)
    lab.save()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("keep\n")
    outside = Path(tempfile.mkdtemp(prefix="cg12c-down-"))
    (outside / "keep").write_text("keep\n")
    yield {"root": root, "lab": lab, "beside": tmp_path / "x", "outside": outside}
    (outside / "keep").unlink(missing_ok=True)
    outside.rmdir()


def _intact(labs: dict) -> bool:
    return (labs["lab"].state_file.is_file() and (labs["beside"] / "keep").is_file()
            and (labs["outside"] / "keep").is_file())


@pytest.mark.parametrize("bad", [".", "..", "../x", "/", "{outside}", "a/b", "", "-rf", "x" * 11, "läb", "a b"])
def test_lab_down_refuses_a_path_for_a_name(labs: dict, bad: str) -> None:
    bad = bad.format(outside=labs["outside"])
    env = {**os.environ, LAB_ROOT_ENV: str(labs["root"])}
    env.pop("APPLIANCE_LAB", None)
    r = subprocess.run([APPLIANCE, "lab", "down", "--name", bad], capture_output=True, text=True, env=env, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "a lab name is 1-10 letters, digits or '-'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _intact(labs)
    with pytest.raises(LabError):
        lifecycle.down(bad)
    assert _intact(labs)


def test_up_and_down_accept_the_same_names() -> None:
    for good in ("cg1a2b3c", "a", "lab-1", "A9-x"):
        assert check_name(good) == good
    for bad in (".", "..", "../x", "/tmp/x", "-x", "x" * 11, "a.b", "a_b"):
        with pytest.raises(LabError) as e:
            check_name(bad)
        assert e.value.exit_code == 2
    with pytest.raises(LabError, match="a lab name is"):
        lifecycle._check_name("../x")  # `lab up` uses the same check


def test_down_removes_only_the_labs_own_directory(labs: dict) -> None:
    """A state file whose `dir` or `created_netns` points elsewhere, or a lab dir that is a symlink out: never followed."""
    need_tool("ip")
    lab = labs["lab"]
    data = json.loads(lab.state_file.read_text())
    data.update(dir=str(labs["outside"]), created_netns=["not-ours-ns"])
    lab.state_file.write_text(json.dumps(data))
    lifecycle.down(lab.name)
    assert not lab.dir.exists() and (labs["outside"] / "keep").is_file()
    link = lab_dir("dnlink")
    link.symlink_to(labs["outside"], target_is_directory=True)
    lifecycle.down("dnlink")  # a symlink under the root is never followed nor removed
    assert link.is_symlink() and (labs["outside"] / "keep").is_file()
    link.unlink()
    (lab_dir("dnplain")).mkdir()  # a directory under the root that is not a lab (no lab.json)
    with pytest.raises(LabError, match="not a lab directory"):
        lifecycle.down("dnplain")
    assert lab_dir("dnplain").is_dir()


def test_a_state_file_naming_another_lab_is_refused(labs: dict) -> None:
    lab = labs["lab"]
    data = json.loads(lab.state_file.read_text())
    data["name"] = "other"
    lab.state_file.write_text(json.dumps(data))
    with pytest.raises(LabError, match="names lab 'other'"):
        load(lab.name)


# review 12, I2: `lab down --name P` removed every namespace named P-* and killed what ran in it, even with no
# lab state at all; now only the namespaces the lab's state file records are removed

@pytest.fixture
def foreign_ns(labs: dict):
    """A namespace `<name>-x` the lab never made, with a process in it; removed by the fixture."""
    need_tool("ip")
    from appliance.ha import ip as netns
    name = f"dq{secrets.token_hex(3)}"
    ns = f"{name}-x"
    netns.netns_add(ns)
    p = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "120"], stdin=subprocess.DEVNULL)
    try:
        yield name, ns, p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        if ns in netns.netns_list():
            netns.netns_del(ns)


@pytest.mark.root
def test_down_without_state_leaves_a_namespace_sharing_the_prefix(foreign_ns) -> None:
    from appliance.ha import ip as netns
    name, ns, p = foreign_ns
    assert not lab_dir(name).exists()
    assert lifecycle.down(name) == []
    assert ns in netns.netns_list() and p.poll() is None


@pytest.mark.root
def test_down_removes_only_the_recorded_namespaces(foreign_ns) -> None:
    from appliance.ha import ip as netns
    name, ns, p = foreign_ns
    lab = Lab(name=name, dir=lab_dir(name))
    lab.dir.mkdir(parents=True)
    mine = f"{name}-lan"
    lab.created_netns = [mine]
    lab.save()
    netns.netns_add(mine)
    try:
        assert lifecycle.down(name) == [mine]
    finally:
        if mine in netns.netns_list():
            netns.netns_del(mine)
    assert mine not in netns.netns_list() and ns in netns.netns_list() and p.poll() is None
    assert not lab.dir.exists()
