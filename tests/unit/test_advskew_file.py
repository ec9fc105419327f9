"""Live advskew: the speaker's --advskew-file (AdvskewFile), its argv/option, the supervisor's live re-arm, ha.check_timeout."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.core import loader as cfgmod
from appliance.core import pids
from appliance.core.errors import ConfigError
from appliance.core.paths import Paths
from appliance.ha import role
from appliance.ha import supervisor as carp
from appliance.ha.advskew import MAX_BYTES, AdvskewFile
from appliance.ha.speaker_args import parser
from tests.support.env import make_config
from tests.support.wait import poll

LOG = "test-advskew"


def replace(path: Path, text: str) -> None:
    """As the supervisor writes it: a new file renamed over the old one (so a new inode)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno == logging.WARNING]


@pytest.fixture
def af(tmp_path: Path) -> AdvskewFile:
    return AdvskewFile(str(tmp_path / "carp-1.advskew"), logging.getLogger(LOG))


# --------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text,want", [("240\n", 240), ("0\n", 0), ("254", 254), (" 7 \r\n# more\n", 7)])
def test_read_parses_the_first_line(af: AdvskewFile, text: str, want: int) -> None:
    Path(af.path).write_text(text)
    assert af.read() == want


@pytest.mark.parametrize("text", ["255\n", "-1\n", "abc\n", "", "\n", "24 0\n", "+5\n"])
def test_read_refuses_a_bad_value_naming_file_and_line(af: AdvskewFile, text: str) -> None:
    Path(af.path).write_text(text)
    with pytest.raises(ValueError) as e:
        af.read()
    assert str(e.value).startswith(f"{af.path}:1: advskew must be a number 0-254"), str(e.value)


def test_read_refuses_a_file_over_the_size_cap(af: AdvskewFile) -> None:
    Path(af.path).write_text("1" + " " * MAX_BYTES + "\n")      # a valid number, but 66 bytes
    with pytest.raises(ValueError) as e:
        af.read()
    # there is no line to name for a size refusal: the file itself, as the peers file does
    assert str(e.value) == f"{af.path}: longer than {MAX_BYTES} bytes"
    Path(af.path).write_text("1" + " " * (MAX_BYTES - 2) + "\n")   # exactly 64 bytes: still read
    assert af.read() == 1


def test_initial_falls_back_to_the_default_with_a_warning(af: AdvskewFile, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOG)
    assert af.initial(100) == 100                           # missing
    Path(af.path).write_text("abc\n")
    assert af.initial(100) == 100                           # does not parse
    w = warnings(caplog)
    assert len(w) == 2 and all("advskew 100" in x for x in w), w
    assert "No such file" in w[0] and f"{af.path}:1:" in w[1], w
    Path(af.path).write_text("240\n")
    assert af.initial(100) == 240 and len(warnings(caplog)) == 2   # a good file wins over --advskew, silently


# --------------------------------------------------------------------------- poll

def test_poll_reports_only_changes_and_survives_bad_and_missing_files(af: AdvskewFile, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOG)
    path = Path(af.path)
    replace(path, "240\n")
    assert af.initial(0) == 240
    t = 100.0
    assert af.poll(t) is None                               # unchanged since initial()
    st = path.stat()
    replace(path, "241\n")                                  # same size; give it the same mtime: only the inode differs
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert af.poll(t + 0.1) is None                         # within `every` of the last look: not looked at
    assert af.poll(t + 0.1, force=True) == 241              # SIGUSR1: at once; the new inode is seen
    assert af.poll(t + 1) is None                           # reported once
    assert warnings(caplog) == []

    path.unlink()
    assert af.poll(t + 2) is None and af.poll(t + 3) is None and af.poll(t + 4, force=True) is None
    w = warnings(caplog)
    assert len(w) == 1 and "No such file" in w[0] and af.path in w[0], w   # one warning, not one per look

    replace(path, "abc\n")
    assert af.poll(t + 5) is None and af.poll(t + 6) is None and af.poll(t + 7, force=True) is None
    w = warnings(caplog)
    assert len(w) == 2 and f"{af.path}:1:" in w[1], w       # the bad version is logged once and changes nothing

    replace(path, "0\n")
    assert af.poll(t + 8) == 0                              # a good file again: taken
    assert af.poll(t + 9) is None and len(warnings(caplog)) == 2


# --------------------------------------------------------------------------- argv and option

def _argv(tmp: Path, engine: str, **kw) -> list[str]:
    return carp.engine_argv(engine, iface="em0", srcip="192.168.1.2", vhid=1, passfile=tmp / "pass",
                            vip="192.168.1.50", advbase=1, advskew=0, preempt=True, deadratio=2,
                            upscript=tmp / "up", downscript=tmp / "down", xparam="1", **kw)


def test_engine_argv_passes_the_advskew_file_to_the_speaker_only(tmp_path: Path) -> None:
    f = tmp_path / "carp-1.advskew"
    a = _argv(tmp_path, "speaker", advskew_file=f)
    assert a[a.index("--advskew-file") + 1] == str(f) and a.count("--advskew-file") == 1
    assert "--advskew-file" not in _argv(tmp_path, "speaker")
    assert "--advskew-file" not in _argv(tmp_path, "ucarp", advskew_file=f)   # ucarp has no such option


def test_speaker_parser_takes_the_advskew_file() -> None:
    base = ["-i", "eth0", "-s", "10.0.0.1", "-v", "1", "-a", "10.0.0.100", "-p", "x"]
    assert parser().parse_args([*base, "--advskew-file", "/run/x.advskew"]).advskew_file == "/run/x.advskew"
    assert parser().parse_args(base).advskew_file is None


# --------------------------------------------------------------------------- supervisor

def _sup(example_tree: Path, tmp_path: Path, engine: str) -> carp.CarpSupervisor:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    sup = carp.CarpSupervisor(cfgmod.load(example_tree), "fw1", example_tree, Paths(state), engine=engine,
                              use_watchdog=False)
    sup.passfile = carp.write_pass(sup.cfg, sup.paths)
    sup.up, sup.down, sup.env = state / "up", state / "down", {}
    return sup


def test_live_rearm_only_for_the_speaker_with_preempt(example_tree: Path, tmp_path: Path) -> None:
    assert _sup(example_tree, tmp_path, "speaker").live_rearm() is True          # the example has preempt on
    assert _sup(example_tree, tmp_path, "ucarp").live_rearm() is False
    make_config(example_tree, cluster={"preempt": False})
    sup = _sup(example_tree, tmp_path, "speaker")
    assert sup.live_rearm() is False
    e = carp.CarpProcess(role.groups(sup.cfg, "fw1")[0], advskew=0)
    assert sup.advskew_file(e) is None and not sup.paths.engine_advskew(e.group.vhid).exists()


def test_start_engine_writes_the_file_and_passes_it(example_tree: Path, tmp_path: Path, monkeypatch) -> None:
    sup = _sup(example_tree, tmp_path, "speaker")
    calls = []

    class _P:
        pid = 4242

    monkeypatch.setattr(carp.subprocess, "Popen", lambda argv, **kw: calls.append(argv) or _P())
    e = carp.CarpProcess(role.groups(sup.cfg, "fw1")[0])
    sup.start_engine(e)
    f = sup.paths.engine_advskew(e.group.vhid)
    assert calls[0][calls[0].index("--advskew-file") + 1] == str(f)
    assert f.read_text() == f"{e.advskew}\n"


PY_CHILD = """
import signal, sys, time
if sys.argv[1] == "handler":
    signal.signal(signal.SIGUSR1, lambda *_: open(sys.argv[2], "w").write("usr1"))
print("ready", flush=True)
time.sleep(30)
"""


def _child(tmp_path: Path, mode: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", PY_CHILD, mode, str(tmp_path / "got-usr1")],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    return p


def test_rearm_signals_a_ready_speaker_and_spares_one_still_starting(example_tree: Path, tmp_path: Path) -> None:
    """Live re-arm writes the file and sends SIGUSR1, but only to an engine that handles it: one still starting
    (no handler yet) would be killed by it, and reads the file itself anyway."""
    sup = _sup(example_tree, tmp_path, "speaker")
    e = carp.CarpProcess(role.groups(sup.cfg, "fw1")[0], advskew=0)
    f = sup.paths.engine_advskew(e.group.vhid)
    ready = _child(tmp_path, "handler")
    starting = _child(tmp_path, "none")
    try:
        assert pids.catches_signal(ready.pid, signal.SIGUSR1) and not pids.catches_signal(starting.pid, signal.SIGUSR1)
        e.proc = ready
        sup.rearm_engine(e, 240, "test demote")
        assert f.read_text() == "240\n" and e.advskew == 240
        assert poll(lambda: (tmp_path / "got-usr1").exists(), 5), "SIGUSR1 not sent to a ready engine"
        assert ready.poll() is None                         # not restarted
        e.proc = starting
        sup.rearm_engine(e, 0, "test promote")
        assert f.read_text() == "0\n" and e.advskew == 0
        time.sleep(0.3)                                     # a SIGUSR1 would have killed it by now
        assert starting.poll() is None, f"the starting engine died ({starting.returncode})"
    finally:
        for p in (ready, starting):
            p.kill()
            p.wait(timeout=5)


# --------------------------------------------------------------------------- ha.check_timeout

def test_check_timeout_default_and_bounds(example_tree: Path) -> None:
    assert cfgmod.load(example_tree).ha.check_timeout == 1.0
    make_config(example_tree, ha={"check_timeout": 3})
    assert cfgmod.load(example_tree).ha.check_timeout == 3.0
    for bad, needle in ((0.05, "greater than or equal to 0.1"), (31, "less than or equal to 30")):
        make_config(example_tree, ha={"check_timeout": bad})
        with pytest.raises(ConfigError) as e:
            cfgmod.load(example_tree)
        assert f"{example_tree}:" in str(e.value) and " ha.check_timeout: " in str(e.value), str(e.value)
        assert needle in str(e.value) and f"(got {bad})" in str(e.value), str(e.value)
