"""Issue 12, finding 6: a stale pidfile never makes `appliance reload`, `demote` or `sync-receive` signal another process.

The pidfiles name a process the test started that would die from the signal (`sleep 60`: no SIGHUP or SIGUSR1
handler); each command refuses with the pidfile, the PID and why, exits non-zero, and the process lives on."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.core import pids
from tests.support.env import APPLIANCE, EXAMPLES
from tests.support.wait import poll


@pytest.fixture
def victim():
    p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    yield p
    p.kill()
    p.wait(10)


@pytest.fixture
def node(tmp_path: Path) -> dict:
    shutil.copytree(EXAMPLES, tmp_path / "etc", ignore=shutil.ignore_patterns("compiled", "keys"))
    (tmp_path / "state" / "run").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "SSH_ORIGINAL_COMMAND"))}
    env["APPLIANCE_STATE_DIR"] = str(tmp_path / "state")
    return {"env": env, "cfg": str(tmp_path / "etc" / "appliance.yaml"), "run": tmp_path / "state" / "run",
            "state": tmp_path / "state"}


def _appliance(node: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([APPLIANCE, "-c", node["cfg"], "--node", "fw1", *args], capture_output=True, text=True,
                          env=node["env"], timeout=60, stdin=subprocess.DEVNULL)


def _still_alive(p: subprocess.Popen) -> bool:
    # a SIGHUP/SIGUSR1 would end `sleep` within moments: watch it that long
    return poll(lambda: p.poll() is not None, 0.3) is False


def test_reload_refuses_a_stale_proxy_pidfile(node: dict, victim: subprocess.Popen) -> None:
    (node["run"] / "proxy.pid").write_text(f"{victim.pid}\n")
    r = _appliance(node, "reload")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"names PID {victim.pid}, which is not the appliance proxy (stale pidfile" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert _still_alive(victim)


def test_demote_refuses_a_stale_carp_pidfile_and_records_nothing(node: dict, victim: subprocess.Popen) -> None:
    (node["run"] / "carp.pid").write_text(f"{victim.pid}\n")
    r = _appliance(node, "demote")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"names PID {victim.pid}, which is not the appliance CARP supervisor (stale pidfile" in r.stderr, r.stderr
    assert _still_alive(victim)
    assert not (node["state"] / "ha.json").exists()  # refused before anything changed


def test_status_shows_a_stale_proxy_pidfile(node: dict, victim: subprocess.Popen) -> None:
    (node["run"] / "proxy.pid").write_text(f"{victim.pid}\n")
    r = _appliance(node, "status", "--no-probe")
    assert r.returncode == 0, r.stderr
    assert "proxy: down (pidfile" in r.stdout and "stale pidfile" in r.stdout, r.stdout
    assert _still_alive(victim)


def test_sync_receive_reload_does_not_signal_a_stale_pid(node: dict, victim: subprocess.Popen) -> None:
    from appliance.core.paths import Paths
    from sync import receive

    paths = Paths(node["state"])
    paths.run.mkdir(parents=True, exist_ok=True)
    paths.proxy_pid.write_text(f"{victim.pid}\n")
    paths.carp_pid.write_text(f"{victim.pid}\n")
    assert "not the appliance proxy" in receive.reload_proxy(paths)
    assert "not the appliance CARP supervisor" in receive.reload_carp(paths)
    assert _still_alive(victim)


def test_a_recycled_pid_running_the_right_program_is_refused(tmp_path: Path) -> None:
    """The same command line is not enough: a process that started after the pidfile was written is not its writer."""
    fake = tmp_path / "appliance"
    fake.write_text("import signal, time\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\ntime.sleep(60)\n")
    pf = tmp_path / "proxy.pid"
    child = subprocess.Popen([sys.executable, str(fake), "proxy"])
    try:
        pf.write_text(f"{child.pid}\n")
        assert poll(lambda: "proxy" in (pids.cmdline(child.pid) or []), 10)  # exec'd (a fresh fork has no argv yet)
        assert pids.verified_pid(pf, "proxy") == child.pid
        if pids.start_time(child.pid) is None:
            pytest.skip("no /proc start time on this system (the command line check still applies)")
        old = time.time() - 3600
        os.utime(pf, (old, old))  # written an hour before this process started
        with pytest.raises(pids.StalePidfile, match="after the pidfile was written"):
            pids.signal_pidfile(pf, signal.SIGHUP, "proxy")
    finally:
        child.kill()
        child.wait(10)


def test_command_lines_that_are_ours() -> None:
    assert pids.runs_role(["/usr/bin/python3", "/opt/v/bin/appliance", "-c", "x.yaml", "proxy"], "proxy")
    assert pids.runs_role(["python3", "-m", "appliance.cli", "carp"], "carp")
    assert not pids.runs_role(["/usr/bin/python3", "/opt/v/bin/appliance", "status"], "proxy")
    assert not pids.runs_role(["sleep", "60"], "proxy")
    assert not pids.runs_role(["python3", "-m", "appliance.ha.speaker", "proxy"], "proxy")
