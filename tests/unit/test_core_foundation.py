"""appliance.core: Paths, secret and atomic writes, pidfiles, the expected master, and the one exit-code scheme."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.core import fsio, pids
from appliance.core.errors import EXIT_BAD_INPUT, ApplianceError, BadInput, ConfigError
from appliance.core.loader import load
from appliance.core.paths import Paths, state_dir
from image.errors import BadDist, BuildError, CheckFailed, MissingTool
from sync import errors as sync_errors
from tests.support.env import EXAMPLES, ROOT
from tests.support.wait import poll


def test_paths_name_every_state_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(tmp_path))
    p = Paths.default()
    assert p.state == tmp_path == state_dir() and p.run == tmp_path / "run"
    assert p.role_file() == tmp_path / "role.json" and p.role_file(2) == tmp_path / "role-2.json"
    assert p.carp_pass == tmp_path / "run" / "carp.pass" and p.proxy_pid == tmp_path / "run" / "proxy.pid"
    assert p.engine_pid(3) == tmp_path / "run" / "carp-3.engine.pid" and p.current == tmp_path / "current"


def test_write_secret_is_0600_from_creation_and_narrows_an_old_file(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        f = tmp_path / "d" / "secret"
        fsio.write_secret(f, "one")
        assert stat.S_IMODE(f.stat().st_mode) == 0o600 and f.read_text() == "one"
        f.chmod(0o644)
        fsio.write_secret(f, b"two")
        assert stat.S_IMODE(f.stat().st_mode) == 0o600 and f.read_text() == "two"
    finally:
        os.umask(old)


def test_atomic_json_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "x" / "state.json"
    fsio.write_json_atomic(f, {"a": 1})
    assert fsio.read_json(f) == {"a": 1} and not [p for p in f.parent.iterdir() if p.name.startswith(".")]
    f.write_text("[1]")
    assert fsio.read_json(f) is None and fsio.read_json(tmp_path / "missing") is None


def test_pidfiles(tmp_path: Path) -> None:
    assert pids.alive(os.getpid()) and not pids.alive(None) and not pids.alive(0)
    pf = tmp_path / "p.pid"
    assert pids.read_pid(pf) is None
    fake = tmp_path / "appliance"  # a program whose command line reads `appliance proxy`
    fake.write_text("import time; time.sleep(30)\n")
    child = subprocess.Popen([sys.executable, str(fake), "proxy"])
    try:
        pf.write_text(f"{child.pid}\n")
        assert pids.read_pid(pf) == child.pid
        assert poll(lambda: "proxy" in (pids.cmdline(child.pid) or []), 10)  # exec'd (a fresh fork has no argv yet)
        with pytest.raises(pids.StalePidfile, match="not the appliance CARP supervisor"):
            pids.signal_pidfile(pf, signal.SIGTERM, "carp")
        assert pids.signal_pidfile(pf, signal.SIGTERM, "proxy") == child.pid
        assert child.wait(10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert pids.read_pid(pf) is None and pids.signal_pidfile(pf, signal.SIGTERM, "proxy") is None
    pf.write_text("garbage")
    assert pids.read_pid(pf) is None


def test_expected_master_is_the_lowest_advskew() -> None:
    cfg = load(EXAMPLES / "appliance.yaml")
    assert cfg.expected_master() == min(cfg.nodes, key=lambda n: cfg.nodes[n].advskew)
    assert cfg.by_preference()[0] == cfg.expected_master() and set(cfg.by_preference()) == set(cfg.nodes)


def test_every_error_is_an_appliance_error_with_its_exit_code() -> None:
    assert ConfigError("x").exit_code == EXIT_BAD_INPUT and BadInput("x").exit_code == 2
    assert isinstance(BadInput("x"), ValueError)
    assert sync_errors.SyncError("x", sync_errors.STALE).exit_code == 4
    assert [sync_errors.OK, sync_errors.PEER_FAILED, sync_errors.BAD_INPUT, sync_errors.SPLIT_BRAIN,
            sync_errors.STALE, sync_errors.BUSY] == [0, 1, 2, 3, 4, 5]
    assert BuildError("x").exit_code == 1 and MissingTool("makefs", "makefs").exit_code == 3
    assert BadDist("x").exit_code == 2 and CheckFailed(["p"]).exit_code == 1
    for cls in (ConfigError, sync_errors.SyncError, BuildError, BadInput):
        assert issubclass(cls, ApplianceError)


def test_the_cli_turns_an_error_into_text_and_status_in_one_place(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["-c", str(tmp_path / "nope.yaml"), "check"])
    assert r.exit_code == 2 and "appliance: error: " in r.output and "no such config file" in r.output
    printed = [p for p in (*ROOT.glob("appliance/**/*.py"), *ROOT.glob("filters/**/*.py"), *ROOT.glob("sync/**/*.py"),
                           *ROOT.glob("image/**/*.py")) if 'f"appliance: error: ' in p.read_text()]
    assert printed == [ROOT / "appliance" / "core" / "errors.py"]
