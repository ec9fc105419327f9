"""CARP engine supervisor (Linux): runs ucarp or our speaker per vhid, drops the VIP the moment an engine dies, restarts it."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.core import pids, state
from appliance.core.errors import ApplianceError, ConfigError
from appliance.core.fsio import read_json, write_json_atomic, write_text_atomic
from appliance.core.loader import load
from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.ha import ip as netns
from appliance.ha import catchup, engine_report, fastlink, role, watchdog
from appliance.ha.transition import write_scripts  # noqa: F401 (re-exported: tests, the supervisor)
from appliance.ha.carpset import (carp_changes, carp_params, effective_advskew,  # noqa: F401 (re-exported)
                                  peer_specs, peers_only_change, refused_change, startup_delay, write_pass,
                                  write_peers)

ENGINES = ("ucarp", "speaker")
# One-line switch: the engine `appliance carp` uses when --engine is not given.
DEFAULT_ENGINE = "speaker"
# ucarp's backup only looks at its timer when libpcap's 1 s read timeout fires, which adds up to 1 s
# to every takeover; deadratio 2 keeps takeovers under 3 x advbase + 0.5 s with either engine, the
# up script (its role change, a Python start) included (measured in the lab).
DEFAULT_DEADRATIO = {"ucarp": 2, "speaker": 2}
# The main loop's period: how soon an engine's exit or a link going down is seen. 0.1 s is a tenth of the smallest
# advbase; at 0.05 s the idle loop cost a TCG guest 13% of a vCPU.
LOOP_PERIOD = 0.1


ENGINE_CWD = "/"   # engines never run in an inherited cwd (it may be the config tree)


def engine_argv(engine: str, *, iface: str, srcip: str, vhid: int, passfile: Path, vip: str, advbase: int,
                advskew: int, preempt: bool, deadratio: int, upscript: Path, downscript: Path,
                xparam: str, state_file: Path | None = None, peers: list[str] | tuple = (),
                peers_file: Path | None = None, passfile_next: Path | None = None,
                advskew_file: Path | None = None, control: Path | None = None, start_master: bool = False) -> list[str]:
    """The one argument builder for both engines (the speaker takes ucarp's options). Both engines send
    the gratuitous ARP themselves (the speaker only while still MASTER), so the scripts pass --no-garp."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    # -I: isolated (no cwd or script dir on sys.path, no PYTHON* env, no user site), and spawned with cwd "/"
    # (ENGINE_CWD): a package pushed into the config tree can never shadow appliance.ha.speaker
    head = [netns.tool("ucarp")] if engine == "ucarp" else [sys.executable, "-I", "-m", "appliance.ha.speaker"]
    args = [
        "--interface", iface, "--srcip", srcip, "--vhid", str(vhid), "--passfile", str(passfile),
        "--addr", vip, "--advbase", str(advbase), "--advskew", str(advskew), "--deadratio", str(deadratio),
        "--upscript", str(upscript), "--downscript", str(downscript), "--xparam", xparam, "--shutdown",
    ]
    if preempt:
        args.append("--preempt")
    if engine == "speaker" and state_file is not None:
        args += ["--state-file", str(state_file)]
    if engine == "speaker":
        args += [x for p in peers for x in ("--peer", p)]   # adverts from these addresses only (issue 12)
        args += ["--peers-file", str(peers_file)] if peers_file is not None else []
        args += ["--passfile-next", str(passfile_next)] if passfile_next is not None else []   # pass rotation
        args += ["--advskew-file", str(advskew_file)] if advskew_file is not None else []      # live re-arm
        args += ["--control", str(control)] if control is not None else []                   # fast liveness
        args += ["--start-master"] if start_master else []
    return head + args


def supervisor_pid(paths: Paths) -> int | None:
    return pids.read_pid(paths.carp_pid)


def status_info(paths: Paths) -> dict | None:
    """What the running supervisor last wrote: engine, per-vhid engine pid and advskew, health."""
    if supervisor_pid(paths) is None:
        return None
    return read_json(paths.carp_status)


@dataclass
class CarpProcess:
    """One CARP engine process (ucarp or the speaker) for one vhid, with its restart backoff."""

    group: role.Group
    proc: subprocess.Popen | None = None
    advskew: int = 0
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.2
    next_start: float = 0.0
    waiting_link: bool = False
    report: engine_report.EngineReport | None = None   # ucarp only: its own account of its state
    as_master: bool = False                             # restarted as master (fast liveness: the VIP stayed)


@dataclass
class CarpSupervisor:
    """`appliance carp`: keeps one CarpProcess per vhid running, tied to the proxy's health and the link."""

    cfg: Appliance
    node: str
    config_path: Path
    paths: Paths
    engine: str = DEFAULT_ENGINE
    deadratio: int | None = None
    use_watchdog: bool = True
    check: str | None = None
    ahead: catchup.Ahead | None = None   # the sync catch-up question (appliance.ha.catchup); None: no gate
    engines: list[CarpProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.deadratio = self.deadratio or DEFAULT_DEADRATIO[self.engine]
        self.iface = self.cfg.cluster.interface
        self.run = self.paths.run
        self.stop = threading.Event()
        self.rearm = threading.Event()
        self.reload = threading.Event()
        self.health = watchdog.Health(self.cfg.ha.failures)
        self.use_watchdog = self.use_watchdog and self.cfg.ha.watchdog
        self.target = watchdog.check_target(self.cfg, self.check)
        self.fast = None          # the fast liveness layer (appliance.ha.liveness), started by run_forever
        self.catchup = None if self.ahead is None else catchup.CatchUp(self.ahead, self.paths, self.rearm.set, (
            lambda msg: role.log_line(msg, self.paths)), catchup.pending_limit(self.cfg.sync.timeout))

    # -- lifecycle
    def lock(self):
        self.run.mkdir(parents=True, exist_ok=True)
        f = open(self.paths.carp_pid, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            other = f.read().strip() or "?"
            f.close()
            raise ApplianceError(f"another `appliance carp` is running (pid {other}, lock {self.paths.carp_pid})")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lockf = f
        return f

    def demoted(self) -> tuple[bool, str]:
        ha = state.read_ha(self.paths)
        if ha.get("demoted"):
            return True, "admin demote"
        if self.use_watchdog and not self.health.healthy:
            return True, f"proxy unhealthy ({self.health.last})"
        if not self.use_watchdog and ha.get("health_demoted"):
            return True, "proxy unhealthy (standalone watchdog)"
        if self.catchup is not None and self.catchup.reason:
            return True, self.catchup.reason
        if self.fast is not None and self.fast.failure:
            return True, f"fast liveness: {self.fast.failure}"
        return False, ""

    def start_engine(self, e: CarpProcess, as_master: bool = False) -> None:
        demoted, _ = self.demoted()
        e.advskew = effective_advskew(self.cfg, e.group, demoted)
        argv = engine_argv(
            self.engine, iface=self.iface, srcip=str(self.cfg.nodes[self.node].lan.ip), vhid=e.group.vhid,
            passfile=self.passfile, vip=str(e.group.vip.ip), advbase=self.cfg.cluster.advbase, advskew=e.advskew,
            preempt=self.cfg.cluster.preempt, deadratio=self.deadratio, upscript=self.up, downscript=self.down,
            xparam=str(e.group.vhid), state_file=self.paths.engine_state(e.group.vhid),
            peers_file=self.peers_file(e.group.vhid), passfile_next=self.paths.carp_pass_next,
            advskew_file=self.advskew_file(e), start_master=as_master,
            control=self.paths.engine_control(e.group.vhid) if self.fast_control() else None)
        e.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env={**os.environ, **self.env}, cwd=ENGINE_CWD,
                                  stderr=subprocess.PIPE if self.engine == "ucarp" else None)
        e.report = engine_report.EngineReport(e.proc.stderr) if self.engine == "ucarp" else None
        e.as_master = as_master
        e.started = time.monotonic()
        self.paths.engine_pid(e.group.vhid).write_text(f"{e.proc.pid}\n")
        role.log_line(f"carp: started {self.engine} pid {e.proc.pid} vhid {e.group.vhid} advskew {e.advskew}", self.paths)
        self.write_status()

    def fast_control(self) -> bool:
        """The speaker gets a control socket only for the fast liveness layer (ha.fast_interval > 0)."""
        return self.engine == "speaker" and self.cfg.ha.fast_interval > 0

    def write_scripts(self, cfg: Appliance) -> tuple[Path, Path]:
        """The engine's up/down scripts for `cfg`; ucarp's start the change and exit (it waits for its scripts)."""
        return write_scripts(self.config_path, self.node, self.paths, cfg, self.live_rearm(), detach=self.engine == "ucarp")

    def live_rearm(self) -> bool:
        """The speaker takes a new advskew live; with preempt on, a better backup then takes over at once. ucarp,
        or preempt off (a backup would never take over from a demoted master), re-arm by a restart instead."""
        return self.engine == "speaker" and self.cfg.cluster.preempt

    def advskew_file(self, e: CarpProcess) -> Path | None:
        """The vhid's --advskew-file, written with the advskew the engine starts with (live re-arm only)."""
        if not self.live_rearm():
            return None
        path = self.paths.engine_advskew(e.group.vhid)
        write_text_atomic(path, f"{e.advskew}\n")
        return path

    def rearm_engine(self, e: CarpProcess, want: int, why: str) -> None:
        """Give a running engine a new advskew: written to its advskew file and announced at once (SIGUSR1), or,
        without live re-arm, a restart (the VIP is dropped; the engine starts again with `want`)."""
        role.log_line(f"carp: re-arming vhid {e.group.vhid} with advskew {want} ({why})", self.paths)
        if self.live_rearm() and e.proc is not None:
            write_text_atomic(self.paths.engine_advskew(e.group.vhid), f"{want}\n")
            e.advskew = want
            pids.signal_if_caught(e.proc.pid, signal.SIGUSR1)   # not while starting: it would die; it reads the file
            return
        self.stop_engine(e, f"re-arm advskew {want}")
        e.next_start = 0.0

    def peers_file(self, vhid: int) -> Path | None:
        """The vhid's peers file, rewritten from the running config (the speaker only; ucarp has no source check)."""
        return write_peers(self.cfg, self.node, vhid, self.paths) if self.engine == "speaker" else None

    def stop_engine(self, e: CarpProcess, why: str) -> None:
        if e.proc is None:
            return
        if e.proc.poll() is None:
            e.proc.terminate()
            try:
                e.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                e.proc.kill()
                e.proc.wait(timeout=3)
        self.drop(e, why)
        e.proc = None

    def drop(self, e: CarpProcess, why: str) -> None:
        """The VIP leaves this node now: never two holders because an engine died silently."""
        try:
            role.apply(self.paths, self.cfg, self.node, "backup", e.group.vhid, self.iface, self.config_path, reason=why)
        except Exception as ex:  # keep supervising even if `ip` hiccups
            role.log_line(f"carp: dropping vip for vhid {e.group.vhid} failed: {ex}", self.paths)

    def write_status(self) -> None:
        demoted, why = self.demoted()
        write_json_atomic(self.paths.carp_status, {
            "pid": os.getpid(), "engine": self.engine, "deadratio": self.deadratio, "demoted": demoted,
            "demoted_reason": why, "healthy": self.health.healthy if self.use_watchdog else None,
            "health_last": self.health.last, "watchdog": self.use_watchdog,
            "check": f"{self.target[0]}:{self.target[1]}",
            "engines": {str(e.group.vhid): {"pid": e.proc.pid if e.proc else None, "advskew": e.advskew,
                                            "restarts": e.restarts} for e in self.engines},
        })

    def reload_config(self) -> list[str] | None:
        before = fastlink.settings(self)
        try:
            return self._reload_config()
        finally:
            fastlink.restart_if_changed(self, before)

    def _reload_config(self) -> list[str] | None:
        """SIGHUP: re-read the config (through the `current` symlink), and when this node's CARP settings changed
        stop every engine (VIPs dropped, leave adverts sent) and start them with the new ones; when only the other
        nodes changed, rewrite the peers files and keep the engines. A config that does not validate keeps the
        running engines. Returns the changes ([] none), None when refused."""
        try:
            new = load(self.config_path)
            if self.node not in new.nodes:
                raise ConfigError(f"{self.config_path}: nodes: this node ({self.node}) is not in it any more")
        except (ConfigError, ValueError, OSError) as e:
            why = "; ".join(getattr(e, "problems", None) or [str(e)])
            role.log_line(f"carp: config reload refused, the running engines stay as they are: {why}", self.paths)
            return None
        changes = carp_changes(carp_params(self.cfg, self.node), carp_params(new, self.node))
        if why := refused_change(self.cfg, new):
            role.log_line(f"carp: config reload refused, the running engines stay as they are: {why}", self.paths)
            return None
        if not changes or peers_only_change(self.cfg, new, self.node):
            self.cfg = new                          # the engines keep running: a peers change goes to the peers files
            write_pass(new, self.paths)             # and a next pass (rotation) to its file, which the speaker re-reads
            self.target = watchdog.check_target(new, self.check)
            for e in self.engines:
                self.peers_file(e.group.vhid)
            role.log_line(f"carp: peers updated ({'; '.join(changes)}); the engines keep running" if changes
                          else "carp: config re-read, CARP settings unchanged", self.paths)
            return changes
        role.log_line(f"carp: CARP settings changed ({'; '.join(changes)}); restarting the engines", self.paths)
        for e in self.engines:
            self.stop_engine(e, "carp settings changed")
        self.cfg = new
        self.iface = new.cluster.interface
        self.target = watchdog.check_target(new, self.check)
        self.passfile = write_pass(new, self.paths)
        self.up, self.down = self.write_scripts(new)
        self.engines = [CarpProcess(g) for g in role.groups(new, self.node)]
        self.write_status()
        return changes

    # -- watchdog thread
    def watch(self) -> None:
        period = float(self.cfg.cluster.advbase)
        while not self.stop.is_set():
            t0 = time.monotonic()
            ok, why = watchdog.probe(*self.target, timeout=self.cfg.ha.check_timeout)
            change = self.health.record(ok, why)
            if change is not None:
                state.write_ha(self.paths, health_demoted=not change, health_reason=why)
                role.log_line(f"watchdog: proxy {'healthy' if change else 'unhealthy: ' + why}"
                              f"{'' if change else f' ({self.health.fails} failed checks)'}", self.paths)
                self.rearm.set()
            self.stop.wait(max(0.05, self.health.interval(period) - (time.monotonic() - t0)))

    # -- main loop
    def run_forever(self) -> int:
        self.lock()
        state.clear_carp_stopped(self.paths)
        self.passfile = write_pass(self.cfg, self.paths)
        self.up, self.down = self.write_scripts(self.cfg)
        self.env = {"APPLIANCE_STATE_DIR": str(self.paths.state)}
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: (self.reload.set(), self.rearm.set()))
        signal.signal(signal.SIGUSR1, lambda *_: self.rearm.set())
        self.engines = [CarpProcess(g) for g in role.groups(self.cfg, self.node)]
        # startup order: no stale VIP from a previous life, then wait our turn
        for e in self.engines:
            self.drop(e, "carp start")
        if self.use_watchdog:
            ok, why = watchdog.probe(*self.target, timeout=self.cfg.ha.check_timeout)
            self.health.record(ok, why)
            state.write_ha(self.paths, health_demoted=not ok, health_reason=why)
            threading.Thread(target=self.watch, name="watchdog", daemon=True).start()
        if self.catchup is not None:
            self.catchup.start(self.stop)
        self.fast = fastlink.start(self)
        self.stop.wait(startup_delay(self.cfg, self.node))
        try:
            return self.loop()
        finally:
            fastlink.stop(self)
            for e in self.engines:
                self.stop_engine(e, "carp stop")
            self.write_status()
            if self.stop.is_set():          # SIGTERM/SIGINT: stopped on purpose (a sync may now change CARP settings)
                state.mark_carp_stopped(self.paths)
            try:
                self.paths.carp_pid.unlink()
            except FileNotFoundError:
                pass

    def loop(self) -> int:
        while not self.stop.is_set():
            now = time.monotonic()
            link_ok = netns.link_up(self.iface)
            if self.reload.is_set():
                self.reload.clear()
                self.reload_config()
                link_ok = netns.link_up(self.iface)
            if self.rearm.is_set():
                self.rearm.clear()
                demoted, why = self.demoted()
                for e in self.engines:
                    want = effective_advskew(self.cfg, e.group, demoted)
                    if e.proc is not None and e.proc.poll() is None and want != e.advskew:
                        self.rearm_engine(e, want, why or "promoted")
                self.write_status()
            for e in self.engines:
                if e.report is not None and e.proc is not None:
                    engine_report.follow(e.report, now, self, e.group)
                if e.proc is not None:
                    rc = e.proc.poll()
                    if rc is None and not link_ok:
                        role.log_line(f"carp: {self.iface} is down; stopping the engine of vhid {e.group.vhid}", self.paths)
                        self.stop_engine(e, "link down")
                        e.next_start = 0.0
                    elif rc is not None and fastlink.keep_master(self, e, now):
                        role.log_line(f"carp: engine of vhid {e.group.vhid} exited ({rc}) while MASTER on a healthy "
                                      f"node; restarting it as master, the VIP stays (restart #{e.restarts})", self.paths)
                        self.start_engine(e, as_master=True)
                    elif rc is not None:
                        e.proc = None
                        self.drop(e, f"engine exited with {rc}")
                        ran = now - e.started
                        e.backoff = 0.2 if ran > 30 else min(e.backoff * 2, 5.0)
                        e.next_start = now + (0.0 if ran > 30 else e.backoff)
                        e.restarts += 1
                        role.log_line(f"carp: engine of vhid {e.group.vhid} exited ({rc}) after {ran:.1f} s;"
                                      f" vip dropped, restart #{e.restarts}", self.paths)
                        self.write_status()
                if e.proc is None and now >= e.next_start:
                    if not link_ok:
                        if not e.waiting_link:
                            role.log_line(f"carp: waiting for {self.iface} to come up", self.paths)
                        e.waiting_link = True
                        continue
                    e.waiting_link = False
                    self.start_engine(e)
            self.stop.wait(LOOP_PERIOD)
        return 0
