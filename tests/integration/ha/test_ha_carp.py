"""`appliance carp` pieces without a network: engine argv, pass file, scripts, lock, demote/promote, status, watchdog."""
from __future__ import annotations

import http.server
import io
import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from appliance.core import loader as cfgmod
from appliance.core import state
from appliance.core.errors import ApplianceError
from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.ha import role, watchdog
from appliance.ha import supervisor as carp
from tests.support.env import APPLIANCE, free_port, make_config


def argv_for(engine: str, cfg: Appliance, tmp: Path, advskew: int = 0) -> list[str]:
    return carp.engine_argv(engine, iface="em0", srcip="192.168.1.2", vhid=1, passfile=tmp / "pass",
                            vip="192.168.1.50", advbase=1, advskew=advskew, preempt=cfg.cluster.preempt,
                            deadratio=2, upscript=tmp / "up", downscript=tmp / "down", xparam="1",
                            state_file=tmp / "engine.json")


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_engine_argv_is_the_same_for_both_engines(example_tree: Path, tmp_path: Path) -> None:
    cfg = cfgmod.load(example_tree)
    u, s = argv_for("ucarp", cfg, tmp_path), argv_for("speaker", cfg, tmp_path, advskew=240)
    assert u[0].endswith("ucarp") and s[1:4] == ["-I", "-m", "appliance.ha.speaker"]
    for a in (u, s):
        assert opt(a, "--interface") == "em0" and opt(a, "--srcip") == "192.168.1.2" and opt(a, "--vhid") == "1"
        assert opt(a, "--addr") == "192.168.1.50" and opt(a, "--passfile") == str(tmp_path / "pass")
        assert "--preempt" in a and "--shutdown" in a and "--neutral" not in a
        assert cfg.cluster.password.get_secret_value() not in " ".join(a)  # the pass never in argv
    assert opt(u, "--advskew") == "0" and opt(s, "--advskew") == "240"
    assert "--state-file" in s and "--state-file" not in u  # ucarp does not know it
    cfg2 = cfgmod.load(make_config(example_tree, cluster={"preempt": False}))
    assert "--preempt" not in argv_for("speaker", cfg2, tmp_path)
    with pytest.raises(ValueError, match="engine must be one of"):
        argv_for("keepalived", cfg, tmp_path)
    assert carp.DEFAULT_ENGINE in carp.ENGINES


def test_pass_file_is_0600_and_scripts_call_role(example_tree: Path, state_dir: Path) -> None:
    cfg = cfgmod.load(example_tree)
    p = carp.write_pass(cfg, Paths(state_dir))
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and p.read_text() == "change-me"
    up, down = carp.write_scripts(example_tree, "fw2", Paths(state_dir))
    assert os.access(up, os.X_OK) and os.access(down, os.X_OK)
    text = up.read_text()
    assert "role master --vhid \"$3\" --iface \"$1\"" in text and "--node fw2" in text and str(state_dir) in text
    assert "change-me" not in text and "role backup" in down.read_text()
    r = subprocess.run(["sh", "-n", str(up)])
    assert r.returncode == 0
    # given the config, the scripts move the VIP themselves first (milliseconds), before the appliance starts
    up, down = carp.write_scripts(example_tree, "fw2", Paths(state_dir), cfg)
    for script, verb in ((up, "add"), (down, "del")):
        text = script.read_text()
        assert f'  {cfg.cluster.vhid}) ' in text and f" -4 addr {verb} {cfg.cluster.vip} dev \"$1\"" in text
        assert text.index(f"addr {verb}") < text.index("exec ") and subprocess.run(["sh", "-n", str(script)]).returncode == 0


def _edit(path: Path, fn) -> None:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


class _FakeProc:
    pid = 4242
    stderr = io.BytesIO(b"")   # ucarp's: read for its "Switching to state" lines (EOF at once here)

    def poll(self):
        return None


def _supervisor(example_tree: Path, state_dir: Path, monkeypatch, engine: str = "speaker"):
    """A CarpSupervisor on fw1 whose engines are 'started' without a process; returns it, the argvs, the stops."""
    sup = carp.CarpSupervisor(cfgmod.load(example_tree), "fw1", example_tree, Paths(state_dir), engine=engine,
                              use_watchdog=False)
    sup.passfile = carp.write_pass(sup.cfg, sup.paths)
    sup.up, sup.down, sup.env = state_dir / "up", state_dir / "down", {}
    argvs, stops = [], []
    monkeypatch.setattr(carp.subprocess, "Popen", lambda argv, **kw: argvs.append(argv) or _FakeProc())
    monkeypatch.setattr(sup, "stop_engine", lambda e, why: stops.append(why))
    sup.engines = [carp.CarpProcess(g) for g in role.groups(sup.cfg, "fw1")]
    for e in sup.engines:
        sup.start_engine(e)
    return sup, argvs, stops


def test_a_peers_only_change_is_applied_live_without_a_restart(example_tree: Path, state_dir: Path, monkeypatch) -> None:
    sup, argvs, stops = _supervisor(example_tree, state_dir, monkeypatch)
    peers = Paths(state_dir).engine_peers(1)
    assert opt(argvs[0], "--peers-file") == str(peers) and "--peer" not in argvs[0]
    assert peers.read_text() == "192.168.1.3,advskew=100\n"
    engines = sup.engines
    # the backup's advskew changes (a sync of an edited cluster file): fw1's speaker keeps running
    _edit(example_tree, lambda d: d["nodes"]["fw2"].update(advskew=110))
    changes = sup.reload_config()
    assert changes == ["peers ['vhid 1 192.168.1.3,advskew=100'] -> ['vhid 1 192.168.1.3,advskew=110']"]
    assert stops == [] and sup.engines is engines and len(argvs) == 1
    assert peers.read_text() == "192.168.1.3,advskew=110\n" and sup.cfg.nodes["fw2"].advskew == 110
    log = (state_dir / "ha.log").read_text()
    assert "carp: peers updated (peers " in log and "restarting" not in log
    # a peer's address too
    _edit(example_tree, lambda d: d["nodes"]["fw2"].update(lan="192.168.1.4/24"))
    assert sup.reload_config() and stops == [] and peers.read_text() == "192.168.1.4,advskew=110\n"
    # this node's own advskew: a restart, as before (the new engine gets the peers file again)
    _edit(example_tree, lambda d: d["nodes"]["fw1"].update(advskew=10))
    assert sup.reload_config() == ["vhid 1 advskew 0 -> 10"] and stops == ["carp settings changed"]
    assert sup.engines is not engines


def test_peers_only_change_and_ucarp_never_gets_peers(example_tree: Path, state_dir: Path, monkeypatch) -> None:
    cfg = cfgmod.load(example_tree)
    _edit(example_tree, lambda d: d["nodes"]["fw2"].update(advskew=110))
    assert carp.peers_only_change(cfg, cfgmod.load(example_tree), "fw1")
    assert not carp.peers_only_change(cfg, cfg, "fw1")                       # nothing changed
    _edit(example_tree, lambda d: d["cluster"].update(advbase=2))
    assert not carp.peers_only_change(cfg, cfgmod.load(example_tree), "fw1")  # peers and more: a restart
    # ucarp: no --peer, no --peers-file, no file written; a peers-only change does not restart it either
    _edit(example_tree, lambda d: d["cluster"].update(advbase=1))
    sup, argvs, stops = _supervisor(example_tree, state_dir, monkeypatch, engine="ucarp")
    assert not [a for a in argvs[0] if a.startswith("--peer")] and not Paths(state_dir).engine_peers(1).exists()
    _edit(example_tree, lambda d: d["nodes"]["fw2"].update(advskew=120))
    assert sup.reload_config() and stops == [] and not Paths(state_dir).engine_peers(1).exists()


def test_demoted_advskew_and_startup_order(example_tree: Path) -> None:
    cfg = cfgmod.load(example_tree)
    g1, g2 = role.groups(cfg, "fw1")[0], role.groups(cfg, "fw2")[0]
    assert carp.effective_advskew(cfg, g1, False) == 0 and carp.effective_advskew(cfg, g1, True) == 240
    assert carp.effective_advskew(cfg, g2, True) == 240
    assert carp.startup_delay(cfg, "fw1") == 0 and carp.startup_delay(cfg, "fw2") > 0


def test_never_two_supervisors(example_tree: Path, state_dir: Path) -> None:
    cfg = cfgmod.load(example_tree)
    a = carp.CarpSupervisor(cfg, "fw1", example_tree, Paths(state_dir))
    a.lock()
    try:
        assert carp.supervisor_pid(Paths(state_dir)) == os.getpid()
        b = carp.CarpSupervisor(cfg, "fw1", example_tree, Paths(state_dir))
        with pytest.raises(ApplianceError, match="another `appliance carp` is running"):
            b.lock()
    finally:
        a._lockf.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([APPLIANCE, *args], capture_output=True, text=True, timeout=60, env=os.environ.copy())


def test_demote_refused_without_preempt(example_tree: Path, state_dir: Path) -> None:
    make_config(example_tree, cluster={"preempt": False})
    for verb in ("demote", "promote"):
        r = cli("-c", str(example_tree), "--node", "fw1", verb)
        assert r.returncode == 2
        assert f"refusing to {verb}: preemption is off" in r.stderr and "cluster.preempt" in r.stderr
    assert not (state_dir / "ha.json").exists()  # nothing half-applied


def test_demote_persists_and_promote_undoes(example_tree: Path, state_dir: Path) -> None:
    r = cli("-c", str(example_tree), "--node", "fw1", "demote")
    assert r.returncode == 0, r.stderr
    assert "not running" in r.stdout and state.read_ha(Paths(state_dir))["demoted"] is True
    s = json.loads(cli("-c", str(example_tree), "--node", "fw1", "status", "--json").stdout)
    assert s["demoted"] is True and s["advskew"] == 240
    r = cli("-c", str(example_tree), "--node", "fw1", "promote")
    assert r.returncode == 0 and state.read_ha(Paths(state_dir))["demoted"] is False


def test_status_text_and_json(example_tree: Path, state_dir: Path) -> None:
    state.write_role(Paths(state_dir), "MASTER", 1, "em0")
    (state_dir / "releases" / "3").mkdir(parents=True)
    os.symlink("releases/3", state_dir / "current")
    r = cli("-c", str(example_tree), "--node", "fw1", "status")
    assert r.returncode == 0, r.stderr
    assert "carp: MASTER vhid 1 advbase 1 advskew 0" in r.stdout
    assert "sync: generation 3" in r.stdout and "proxy: down" in r.stdout and "peer: fw2 192.168.200.2" in r.stdout
    s = json.loads(cli("-c", str(example_tree), "--node", "fw2", "status", "--json").stdout)
    assert s["role"] == "MASTER" and s["advskew"] == 100 and s["vip"] == "192.168.1.50/24"
    assert s["sync_generation"] == 3 and s["proxy"]["up"] is False and s["carp"]["running"] is False
    assert set(s["peers"]) == {"fw1"}


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        body = b"ok" if self.path == "/healthz" else b"no"
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a) -> None:
        pass


def test_watchdog_probe_and_failure_count(example_tree: Path) -> None:
    cfg = cfgmod.load(example_tree)
    assert watchdog.check_target(cfg) == ("127.0.0.1", 3128)
    assert watchdog.check_target(cfg, "127.0.0.1:9") == ("127.0.0.1", 9)
    with pytest.raises(ValueError):
        watchdog.check_target(cfg, "nonsense")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Health,), {}))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        port = srv.server_address[1]
        assert watchdog.probe("127.0.0.1", port) == (True, "ok")
        srv.RequestHandlerClass.status = 503
        ok, why = watchdog.probe("127.0.0.1", port)
        assert not ok and "503" in why
    finally:
        srv.shutdown()
        srv.server_close()
    ok, why = watchdog.probe("127.0.0.1", free_port(), timeout=0.5)
    assert not ok and "Refused" in why
    h = watchdog.Health(failures=3)
    assert h.healthy is False  # boot gate: demoted until the proxy answered once
    assert h.record(True) is True
    assert h.record(False) is None and h.record(False) is None
    assert h.record(False) is False and not h.healthy
    assert h.record(False) is None
    assert h.record(True) is True and h.fails == 0


def test_watchdog_confirms_a_failure_quickly() -> None:
    h = watchdog.Health(failures=3)
    assert h.interval(1.0) == 1.0  # booting (unhealthy): every advbase
    h.record(True)
    assert h.interval(1.0) == 1.0  # healthy: every advbase
    h.record(False)
    assert h.interval(1.0) == 0.25  # one failure: re-check at advbase/4 to confirm
    h.record(False)
    assert h.interval(2.0) == 0.5
    h.record(False)
    assert not h.healthy and h.interval(1.0) == 1.0  # demoted: back to every advbase until it answers


def test_watchdog_once_cli(example_tree: Path) -> None:
    r = cli("-c", str(example_tree), "--node", "fw1", "watchdog", "--once", "--check", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "Refused" in r.stdout


def test_a_pass_change_applies_only_as_a_rotation(example_tree: Path, state_dir: Path, monkeypatch) -> None:
    """Issue 12, finding 2: a reload never applies a pass the peers would not accept; the rotation's three steps do."""
    sup, argvs, stops = _supervisor(example_tree, state_dir, monkeypatch)
    p = Paths(state_dir)
    old = sup.cfg.cluster.password.get_secret_value()
    assert opt(argvs[0], "--passfile-next") == str(p.carp_pass_next) and not p.carp_pass_next.exists()
    engines = sup.engines
    # a direct change (what a stolen sync key pushed): refused, the engines keep the old pass
    _edit(example_tree, lambda d: d["cluster"].update(password="hijacked"))
    assert sup.reload_config() is None and stops == [] and sup.engines is engines
    assert p.carp_pass.read_text().strip() == old
    assert "config reload refused" in (state_dir / "ha.log").read_text() and "appliance carp-rotate" in (state_dir / "ha.log").read_text()
    # phase 1: the next pass, applied live (the speaker re-reads the file), no restart
    _edit(example_tree, lambda d: d["cluster"].update(password=old, password_next="n3xt-pass"))
    assert sup.reload_config() == ["next password set"] and stops == [] and sup.engines is engines
    assert p.carp_pass_next.read_text().strip() == "n3xt-pass" and stat.S_IMODE(p.carp_pass_next.stat().st_mode) == 0o600
    # phase 2: the swap (send the new pass, still accept the old one): the engines restart
    _edit(example_tree, lambda d: d["cluster"].update(password="n3xt-pass", password_next=old))
    assert sup.reload_config() == ["password changed", "next password changed"] and stops == ["carp settings changed"]
    assert p.carp_pass.read_text().strip() == "n3xt-pass" and p.carp_pass_next.read_text().strip() == old
    # phase 3: the old pass dropped, live again
    n = len(stops)
    _edit(example_tree, lambda d: d["cluster"].pop("password_next"))
    assert sup.reload_config() == ["next password cleared"] and len(stops) == n and not p.carp_pass_next.exists()
