"""The lab's processes: each node's daemons (sshd, proxy, CARP supervisor) and the origin, spawned in namespaces,
their PIDs recorded in the lab file; the node's environment; stopping them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.core.fsio import read_json
from appliance.core.paths import Paths
from appliance.core.pids import alive as pid_alive
from appliance.core.pids import read_pid
from appliance.ha import ip as netns
from appliance.lab import helpers
from appliance.lab.model import Lab, LabError

VENV_BIN = str(Path(sys.executable).parent)


def node_env(lab: Lab, node: str) -> dict[str, str]:
    """What makes a process one node's: its cluster file, identity and state dir (and the lab's tools on PATH)."""
    n = lab.nodes[node]
    return {"APPLIANCE_CONFIG": str(n.config), "APPLIANCE_NODE": node, "APPLIANCE_STATE_DIR": str(n.state),
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}:{netns.SBIN}"}


def node_exec(lab: Lab, node: str, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run argv inside a node's namespace with the node's environment (config, identity, state dir)."""
    env = {**os.environ, **node_env(lab, node)}
    return subprocess.run(netns.in_ns(lab.nodes[node].netns, argv), env=env, timeout=timeout, **kw)


def spawn(ns: str, argv: list[str], env: dict[str, str], log: Path) -> int:
    """Start argv inside ns (ip netns exec execs, so the PID is the program's own), detached, output to log."""
    with open(log, "ab") as out:
        p = subprocess.Popen(netns.in_ns(ns, ["env"] + [f"{k}={v}" for k, v in env.items()] + argv),
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return p.pid


def proxy_argv(lab: Lab, node: str) -> list[str]:
    """`appliance proxy` on every node (a warm standby); $APPLIANCE_LAB_PROXY names another program taking the same options."""
    n = lab.nodes[node]
    head = lab.proxy_cmd or [f"{VENV_BIN}/appliance", "proxy"]
    return head + ["-c", str(n.config), "--listen", f"0.0.0.0:{lab.proxy_port}", "--access-log", str(n.dir / "access.log")]


def carp_argv(lab: Lab, node: str) -> list[str]:
    argv = [f"{VENV_BIN}/appliance", "-c", str(lab.nodes[node].config), "carp"]
    if lab.engine:
        argv += ["--engine", lab.engine]
    if lab.deadratio:
        argv += ["--deadratio", str(lab.deadratio)]
    return argv


def _start(lab: Lab, node: str, what: str, argv: list[str], env: dict[str, str], log: Path) -> int:
    """Spawn one of the node's daemons in its namespace and record its PID as `<what>_pid` in the lab file."""
    n = lab.nodes[node]
    pid = spawn(n.netns, argv, env, log)
    setattr(n, f"{what}_pid", pid)
    lab.save()
    return pid


def start_proxy(lab: Lab, node: str) -> int:
    return _start(lab, node, "proxy", proxy_argv(lab, node), node_env(lab, node), lab.nodes[node].dir / "proxy.log")


def start_admin(lab: Lab, node: str) -> int:
    """The node's status page (`appliance admin serve`) on its loopback and sync addresses, with the node's access log."""
    argv = [f"{VENV_BIN}/appliance", "-c", str(lab.nodes[node].config), "admin", "serve",
            "--access-log", str(lab.nodes[node].dir / "access.log")]
    return _start(lab, node, "admin", argv, node_env(lab, node), lab.nodes[node].dir / "admin.log")


def start_sshd(lab: Lab, node: str) -> int:
    """The node's private sshd on its sync address (own host key, config and authorized_keys; nothing of the host's)."""
    d = lab.nodes[node].sshd_dir
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # the privilege separation dir sshd insists on
    return _start(lab, node, "sshd", [netns.tool("sshd"), "-D", "-e", "-f", str(d / "sshd_config")], {}, d / "sshd.log")


def start_carp(lab: Lab, node: str) -> int:
    return _start(lab, node, "carp", carp_argv(lab, node), node_env(lab, node), lab.nodes[node].dir / "carp.log")


def start_origin(lab: Lab, port: int) -> int:
    """The origin web server on the LAN bridge's address (a helper program in the LAN namespace)."""
    argv = helpers.argv("origin", lab.lan.origin_ip, str(port))
    lab.origin_pid = spawn(lab.lan.netns, argv, {}, lab.dir / "origin.log")
    lab.save()
    return lab.origin_pid


def sshd_listening(lab: Lab, node: str) -> bool:
    log = lab.nodes[node].sshd_dir / "sshd.log"
    return log.exists() and "Server listening on" in log.read_text(errors="replace")


def engine_pid(lab: Lab, node: str, vhid: int | None = None) -> int | None:
    """The PID of the node's running CARP engine for vhid (default the main one), from its supervisor's pid file."""
    return read_pid(Paths(lab.nodes[node].state).engine_pid(vhid or lab.main_vhid))


def carp_status(lab: Lab, node: str) -> dict:
    """What the node's CARP supervisor last wrote (engines, health)."""
    return read_json(Paths(lab.nodes[node].state).carp_status) or {}


def exited_daemon(lab: Lab) -> str | None:
    """The first node daemon that is not running, with the tail of its log; None while all run."""
    for node, n in lab.nodes.items():
        for what, pid, log in (("proxy", n.proxy_pid, n.dir / "proxy.log"), ("carp", n.carp_pid, n.dir / "carp.log"),
                               ("sshd", n.sshd_pid, n.sshd_dir / "sshd.log")):
            if not pid_alive(pid):
                tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                return f"{node}: {what} exited during lab up: {' | '.join(tail)}"
    return None


def kill(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, up to `grace` seconds to exit, then SIGKILL whatever is left."""
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def kill_proxy(lab: Lab, node: str) -> None:
    """SIGKILL the node's proxy and its whole process group (its workers too), and wait (at most 5 s) until it is
    gone: on a busy host it was still there when the recovery looked, which then started no new proxy."""
    pid = lab.nodes[node].proxy_pid
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not gone(pid):
            time.sleep(0.05)


def gone(pid: int | None) -> bool:
    """The process has exited: no such PID, or only its zombie waits to be reaped."""
    if not pid_alive(pid):
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return not pid_alive(pid)


def run_appliance(lab: Lab, node: str, *args: str) -> None:
    """`appliance ARGS` as the node (in its namespace, with its environment); LabError naming stderr on failure."""
    r = node_exec(lab, node, [f"{VENV_BIN}/appliance", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"{node}: appliance {' '.join(args)}: {r.stderr.strip()}")
