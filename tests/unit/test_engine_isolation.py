"""Review 12, L3: the supervisor starts the speaker as `python -I -m appliance.ha.speaker` with cwd "/", so a
package pushed into the config tree (or a PYTHONPATH) can never shadow it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from appliance.core.paths import Paths
from appliance.ha import role
from appliance.ha import supervisor as carp
from appliance.core import loader as cfgmod


def _argv(tmp: Path, engine: str = "speaker") -> list[str]:
    return carp.engine_argv(engine, iface="em0", srcip="192.168.1.2", vhid=1, passfile=tmp / "pass",
                            vip="192.168.1.50", advbase=1, advskew=0, preempt=True, deadratio=2,
                            upscript=tmp / "up", downscript=tmp / "down", xparam="1")


def test_speaker_argv_is_isolated(tmp_path: Path) -> None:
    a = _argv(tmp_path)
    assert a[1:4] == ["-I", "-m", "appliance.ha.speaker"]


def test_start_engine_runs_in_root_cwd(example_tree: Path, tmp_path: Path, monkeypatch) -> None:
    state = tmp_path / "state"
    state.mkdir()
    sup = carp.CarpSupervisor(cfgmod.load(example_tree), "fw1", example_tree, Paths(state), engine="speaker",
                              use_watchdog=False)
    sup.passfile = carp.write_pass(sup.cfg, sup.paths)
    sup.up, sup.down, sup.env = state / "up", state / "down", {}
    calls = []

    class _P:
        pid = 4242

        def poll(self):
            return None
    monkeypatch.setattr(carp.subprocess, "Popen", lambda argv, **kw: calls.append((argv, kw)) or _P())
    monkeypatch.chdir(example_tree.parent)          # the supervisor's own cwd is the config tree
    e = carp.CarpProcess(role.groups(sup.cfg, "fw1")[0])
    sup.start_engine(e)
    argv, kw = calls[0]
    assert kw.get("cwd") == "/" and argv[1] == "-I"


def test_a_shadow_package_in_cwd_or_pythonpath_is_not_imported(tmp_path: Path) -> None:
    """The real argv head, run from a directory holding a fake appliance/ha/speaker.py, with PYTHONPATH set to it."""
    shadow = tmp_path / "tree"
    (shadow / "appliance" / "ha").mkdir(parents=True)
    marker = tmp_path / "pwned"
    for f in ("appliance/__init__.py", "appliance/ha/__init__.py", "appliance/ha/speaker.py"):
        (shadow / f).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    head = _argv(tmp_path)[:4]
    r = subprocess.run([*head, "--help"], cwd=carp.ENGINE_CWD, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(shadow)})
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr
    assert not marker.exists()
    # the same head without -I, run from the tree, would have imported the shadow (what the review showed)
    r = subprocess.run([head[0], "-m", "appliance.ha.speaker", "--help"], cwd=shadow, capture_output=True, timeout=60)
    assert marker.exists()


def test_the_speaker_starts_without_the_config_models() -> None:
    """The speaker is a fresh Python at every engine (re)start, also while a failover waits on it: it imports no
    pydantic, click, yaml or mitmproxy (under TCG, pydantic's models alone cost it 5 of 7 s of imports)."""
    code = ("import sys, appliance.ha.speaker; "
            "print(sorted(m for m in ('pydantic', 'click', 'yaml', 'mitmproxy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
