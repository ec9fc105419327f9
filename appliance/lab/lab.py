"""The failover lab: a whole cluster in network namespaces (nodes, client, LAN bridge, sync link, origin) and its probes."""
from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from appliance.core import config as cfgmod
from sync import keys as keymod
from appliance.ha import ip as netns
from appliance.core.state import read_json, write_json_atomic

LAB_ROOT_ENV = "APPLIANCE_LAB_DIR"
VENV_BIN = str(Path(sys.executable).parent)


def lab_root() -> Path:
    return Path(os.environ.get(LAB_ROOT_ENV, "/run/appliance-lab"))


class LabError(Exception):
    pass


# ---------------------------------------------------------------- lab state file


def lab_dir(name: str) -> Path:
    return lab_root() / name


def load(name: str | None = None) -> dict:
    """The lab's state file; with no name the only lab there is (else an error listing them)."""
    if not name:
        name = os.environ.get("APPLIANCE_LAB")
    if not name:
        labs = list_labs()
        if not labs:
            raise LabError(f"no lab is up (nothing in {lab_root()}); run `appliance lab up`")
        if len(labs) > 1:
            raise LabError(f"several labs are up ({', '.join(labs)}); pass --name")
        name = labs[0]
    data = read_json(lab_dir(name) / "lab.json")
    if data is None:
        raise LabError(f"no lab named {name!r} (no {lab_dir(name) / 'lab.json'})")
    return data


def list_labs() -> list[str]:
    root = lab_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "lab.json").exists())


def save(lab: dict) -> None:
    write_json_atomic(Path(lab["dir"]) / "lab.json", lab)


# ---------------------------------------------------------------- building


def _free_hosts(net: ipaddress.IPv4Network, used: set, count: int) -> list[ipaddress.IPv4Address]:
    out = []
    for host in reversed(list(net.hosts())[-64:]):
        if host not in used:
            out.append(host)
            if len(out) == count:
                return out
    raise LabError(f"no {count} free addresses left at the top of {net}")


def node_env(lab: dict, node: str) -> dict[str, str]:
    n = lab["nodes"][node]
    return {"APPLIANCE_CONFIG": n["config"], "APPLIANCE_NODE": node, "APPLIANCE_STATE_DIR": n["state"],
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}:{netns.SBIN}"}


def spawn(ns: str, argv: list[str], env: dict[str, str], log: Path) -> int:
    """Start argv inside ns (ip netns exec execs, so the PID is the program's own), detached, output to log."""
    with open(log, "ab") as out:
        p = subprocess.Popen(netns.in_ns(ns, ["env"] + [f"{k}={v}" for k, v in env.items()] + argv),
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return p.pid


def proxy_argv(lab: dict, node: str) -> list[str]:
    """`appliance proxy` on every node (a warm standby); $APPLIANCE_LAB_PROXY names another program taking the same options."""
    n = lab["nodes"][node]
    head = lab.get("proxy_cmd") or [f"{VENV_BIN}/appliance", "proxy"]
    return head + ["-c", n["config"], "--listen", f"0.0.0.0:{lab['proxy_port']}",
            "--access-log", str(Path(n["dir"]) / "access.log")]


def carp_argv(lab: dict, node: str) -> list[str]:
    n = lab["nodes"][node]
    argv = [f"{VENV_BIN}/appliance", "-c", n["config"], "carp"]
    if lab.get("engine"):
        argv += ["--engine", lab["engine"]]
    if lab.get("deadratio"):
        argv += ["--deadratio", str(lab["deadratio"])]
    return argv


def _start(lab: dict, node: str, what: str, argv: list[str], env: dict, log: Path) -> int:
    """Spawn one of the node's daemons in its namespace and record its PID as `<what>_pid` in the lab file."""
    n = lab["nodes"][node]
    pid = spawn(n["netns"], argv, env, log)
    n[f"{what}_pid"] = pid
    save(lab)
    return pid


def start_proxy(lab: dict, node: str) -> int:
    return _start(lab, node, "proxy", proxy_argv(lab, node), node_env(lab, node), Path(lab["nodes"][node]["dir"]) / "proxy.log")


def sshd_dir(lab: dict, node: str) -> Path:
    return Path(lab["nodes"][node]["dir"]) / "sshd"


def start_sshd(lab: dict, node: str) -> int:
    """The node's private sshd on its sync address (own host key, config and authorized_keys; nothing of the host's)."""
    d = sshd_dir(lab, node)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # the privilege separation dir sshd insists on
    return _start(lab, node, "sshd", [netns.tool("sshd"), "-D", "-e", "-f", str(d / "sshd_config")], {}, d / "sshd.log")


def sshd_listening(lab: dict, node: str) -> bool:
    log = sshd_dir(lab, node) / "sshd.log"
    return log.exists() and "Server listening on" in log.read_text(errors="replace")


def start_carp(lab: dict, node: str) -> int:
    return _start(lab, node, "carp", carp_argv(lab, node), node_env(lab, node), Path(lab["nodes"][node]["dir"]) / "carp.log")


def _copy_tree(src: Path, dst: Path, *skip: str) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("node.yaml", "hooks.d", ".git", "__pycache__", "keys", *skip),
                    symlinks=True)


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # before the secret goes in (O_TRUNC keeps an existing file's mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _keygen(path: Path, comment: str) -> str:
    """A fresh ed25519 key pair (private 0600); returns the public line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([netns.tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise LabError(f"ssh-keygen {path}: {r.stderr.strip()}")
    os.chmod(path, 0o600)
    return path.with_name(path.name + ".pub").read_text()


def render_config(text: str) -> str:
    """The lab's copy of the cluster file: sync logs in as root (the lab runs as root; the forced command
    is the only thing the key may run, PermitRootLogin forced-commands-only)."""
    data = yaml.safe_load(text)
    data.setdefault("sync", {})
    data["sync"]["user"] = "root"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


SSHD_CONFIG = """\
# the lab's private sshd for {node}: only the sync key, only its forced command
Port {port}
ListenAddress {addr}
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized_keys}
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin forced-commands-only
AllowUsers root
StrictModes no
AllowTcpForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTTY no
MaxStartups 20
LogLevel VERBOSE
"""


def _setup_ssh(lab: dict, cfg: cfgmod.Appliance) -> None:
    """Sync key pair (the same in every node's tree, sync.keys layout), a host key per node in the lab dir,
    keys/known_hosts pinning every node's host key on its sync address, and each node's sshd_config and
    authorized_keys (the forced `sync-serve` with the node's state dir)."""
    d = Path(lab["dir"])
    sync_pub = _keygen(d / "keys" / keymod.SYNC_KEY, "appliance-sync")
    private = (d / "keys" / keymod.SYNC_KEY).read_bytes()
    host_pubs = {node: _keygen(sshd_dir(lab, node) / "ssh_host_ed25519_key", f"root@{node}") for node in lab["nodes"]}
    kh = "\n".join(keymod.known_hosts_lines(cfg, host_pubs)) + "\n"
    for node, n in lab["nodes"].items():
        tree = Path(n["state"]) / "releases" / "1"
        _write_secret(keymod.sync_key(tree), private)
        keymod.sync_key(tree).with_name(keymod.SYNC_KEY + ".pub").write_text(sync_pub)
        keymod.known_hosts(tree).write_text(kh)
        sd = sshd_dir(lab, node)
        env = f"APPLIANCE_STATE_DIR={n['state']} APPLIANCE_NODE={node} APPLIANCE_CONFIG={n['config']}"
        line = keymod.authorized_keys_line(cfg, node, sync_pub, appliance_bin=f"/usr/bin/env {env} {VENV_BIN}/appliance")
        _write_secret(sd / "authorized_keys", (line + "\n").encode())
        _write_secret(sd / "sshd_config", SSHD_CONFIG.format(
            node=node, port=cfg.sync.ssh_port, addr=n["sync"].split("/")[0], host_key=sd / "ssh_host_ed25519_key",
            authorized_keys=sd / "authorized_keys").encode())


def up(config_path: Path, name: str | None = None, engine: str | None = None, deadratio: int | None = None,
       wait: float = 45.0) -> dict:
    """Build the lab and start everything; returns the lab description (the `lab up --json` shape)."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces); run it as root")
    for t in ("ip", "ucarp", "arping", "sshd", "ssh", "ssh-keygen", "rsync"):
        if not shutil.which(netns.tool(t)):
            raise LabError(f"the lab needs {t} (make lab installs it)")
    cfg = cfgmod.load(config_path)
    config_path = Path(config_path).resolve()
    name = name or f"cg{secrets.token_hex(3)}"
    if len(name) > 10 or not name.replace("-", "").isalnum():
        raise LabError(f"--name {name!r}: at most 10 letters/digits (it prefixes namespace names)")
    d = lab_dir(name)
    if (d / "lab.json").exists():
        raise LabError(f"a lab named {name} is already up ({d}); `appliance lab down --name {name}` first")
    d.mkdir(parents=True, exist_ok=True)
    c = cfg.cluster
    net = c.vip.network
    used = {c.vip.ip} | {n.lan.ip for n in cfg.nodes.values()} | {x.vip.ip for x in c.extra_vhids}
    origin_ip, client_ip = _free_hosts(net, used, 2)
    origin_port = 8080
    lab = {
        "name": name, "dir": str(d), "source_config": str(config_path), "engine": engine, "deadratio": deadratio,
        "vip": str(c.vip.ip), "vips": {str(c.vhid): str(c.vip.ip), **{str(x.vhid): str(x.vip.ip) for x in c.extra_vhids}},
        "proxy_port": cfg.proxy.port, "origin": f"http://{origin_ip}:{origin_port}/",
        "lan": {"netns": f"{name}-lan", "bridge": "br0", "origin_ip": str(origin_ip)},
        "client": {"netns": f"{name}-cli", "ip": str(client_ip), "lan_if": "eth0"},
        "nodes": {}, "created_netns": [], "origin_pid": None,
        "proxy_cmd": os.environ.get("APPLIANCE_LAB_PROXY", "").split() or None,
    }
    save(lab)
    try:
        _build(lab, cfg, config_path, origin_ip, client_ip, origin_port)
        _wait_ready(lab, cfg, wait)
    except BaseException:
        down(name)
        raise
    for node, n in lab["nodes"].items():
        n["engine_pid"] = engine_pid(lab, node)
    save(lab)
    return lab


def _mkns(lab: dict, ns: str) -> None:
    netns.netns_add(ns)
    lab["created_netns"].append(ns)
    save(lab)


def _build(lab: dict, cfg: cfgmod.Appliance, config_path: Path, origin_ip, client_ip, origin_port: int) -> None:
    c = cfg.cluster
    lan_ns, cli_ns = lab["lan"]["netns"], lab["client"]["netns"]
    prefix = c.vip.network.prefixlen
    _mkns(lab, lan_ns)
    netns.ip("link", "add", "br0", "type", "bridge", netns=lan_ns)
    netns.ip("link", "set", "br0", "up", netns=lan_ns)
    netns.ip("addr", "add", f"{origin_ip}/{prefix}", "dev", "br0", netns=lan_ns)
    # client
    _mkns(lab, cli_ns)
    netns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "pcli", "netns", lan_ns, netns=cli_ns)
    netns.ip("link", "set", "pcli", "master", "br0", "up", netns=lan_ns)
    netns.ip("addr", "add", f"{client_ip}/{prefix}", "dev", "eth0", netns=cli_ns)
    netns.ip("link", "set", "eth0", "up", netns=cli_ns)
    names = list(cfg.nodes)
    for i, node in enumerate(names):
        ns = f"{lab['name']}-{node}"[:60]
        _mkns(lab, ns)
        nd = Path(lab["dir"]) / node
        st = nd / "state"
        (st / "releases").mkdir(parents=True, exist_ok=True)
        # the cluster file holds the CARP pass: never copied with the source's mode, written 0600 from creation
        _copy_tree(config_path.parent, st / "releases" / "1", config_path.name)
        _write_secret(st / "releases" / "1" / config_path.name, render_config(config_path.read_text()).encode())
        os.symlink("releases/1", st / "current")
        (st / "node.yaml").write_text(f"node: {node}\n")
        lab["nodes"][node] = {"netns": ns, "lan_if": c.interface, "sync_if": c.sync_interface,
                              "lan": str(cfg.nodes[node].lan), "sync": str(cfg.nodes[node].sync),
                              "config": str(st / "current" / config_path.name), "state": str(st), "dir": str(nd),
                              "engine_pid": None, "proxy_pid": None, "carp_pid": None, "sshd_pid": None}
        save(lab)
        netns.ip("link", "add", c.interface, "type", "veth", "peer", "name", f"p{i}", "netns", lan_ns, netns=ns)
        netns.ip("link", "set", f"p{i}", "master", "br0", "up", netns=lan_ns)
        netns.ip("addr", "add", str(cfg.nodes[node].lan), "dev", c.interface, netns=ns)
        netns.ip("link", "set", c.interface, "up", netns=ns)
        netns.sysctl(ns, "net.ipv4.ip_nonlocal_bind", "1")
    # the dedicated sync link: a veth pair for two nodes, a bridge of its own for more
    if len(names) == 2:
        a, b = (lab["nodes"][n]["netns"] for n in names)
        netns.ip("link", "add", c.sync_interface, "type", "veth", "peer", "name", c.sync_interface, "netns", b, netns=a)
    else:
        netns.ip("link", "add", "br1", "type", "bridge", netns=lan_ns)
        netns.ip("link", "set", "br1", "up", netns=lan_ns)
        for i, node in enumerate(names):
            ns = lab["nodes"][node]["netns"]
            netns.ip("link", "add", c.sync_interface, "type", "veth", "peer", "name", f"s{i}", "netns", lan_ns, netns=ns)
            netns.ip("link", "set", f"s{i}", "master", "br1", "up", netns=lan_ns)
    for node in names:
        ns = lab["nodes"][node]["netns"]
        netns.ip("addr", "add", str(cfg.nodes[node].sync), "dev", c.sync_interface, netns=ns)
        netns.ip("link", "set", c.sync_interface, "up", netns=ns)
    # sshd on every node's sync address, origin, then proxies (warm standby on every node), then the engines
    _setup_ssh(lab, cfgmod.load(Path(lab["nodes"][names[0]]["config"])))
    for node in names:
        start_sshd(lab, node)
    lab["origin_pid"] = spawn(lan_ns, [sys.executable, "-m", "appliance.lab.lab", "origin", str(origin_ip), str(origin_port)],
                              {}, Path(lab["dir"]) / "origin.log")
    save(lab)
    for node in names:
        start_proxy(lab, node)
    for node in names:
        start_carp(lab, node)


def engine_pid(lab: dict, node: str, vhid: int | None = None) -> int | None:
    n = lab["nodes"][node]
    v = vhid or int(next(iter(lab["vips"])))
    try:
        pid = int((Path(n["state"]) / "run" / f"carp-{v}.engine.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def holders(lab: dict, vip: str | None = None) -> list[str]:
    """Nodes whose LAN interface carries the VIP right now (ip addr in each namespace)."""
    vip = vip or lab["vip"]
    out = []
    for node, n in lab["nodes"].items():
        if netns.has_address(n["lan_if"], ipaddress.IPv4Address(vip), n["netns"]):
            out.append(node)
    return out


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def carp_status(lab: dict, node: str) -> dict:
    return read_json(Path(lab["nodes"][node]["state"]) / "run" / "carp.json") or {}


def _wait_ready(lab: dict, cfg: cfgmod.Appliance, wait: float) -> None:
    """Until every engine runs, every proxy passes the watchdog and exactly the preferred node holds the VIP."""
    deadline = time.monotonic() + wait
    want = min(cfg.nodes, key=lambda n: cfg.nodes[n].advskew)
    last = ""
    while time.monotonic() < deadline:
        for node, n in lab["nodes"].items():
            for what in ("proxy_pid", "carp_pid", "sshd_pid"):
                if not _alive(n[what]):
                    log = Path(n["dir"]) / {"proxy_pid": "proxy.log", "carp_pid": "carp.log", "sshd_pid": "sshd/sshd.log"}[what]
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                    raise LabError(f"{node}: {what.split('_')[0]} exited during lab up: {' | '.join(tail)}")
        healthy = all(carp_status(lab, nd).get("healthy") for nd in lab["nodes"])
        sshd = all(sshd_listening(lab, nd) for nd in lab["nodes"])
        h = holders(lab)
        last = f"holders {h}, watchdogs healthy: {healthy}, sshd listening: {sshd}"
        if healthy and sshd and h == [want] and all(engine_pid(lab, nd) for nd in lab["nodes"]):
            return
        time.sleep(0.2)
    raise LabError(f"lab not ready after {wait:.0f} s ({last}); logs in {lab['dir']}")


def describe(lab: dict) -> dict:
    """The documented `lab up --json` shape (plus name and dir)."""
    return {
        "name": lab["name"], "dir": lab["dir"], "vip": lab["vip"], "proxy_port": lab["proxy_port"], "origin": lab["origin"],
        "client": {"netns": lab["client"]["netns"]},
        "nodes": {node: {"netns": n["netns"], "engine_pid": engine_pid(lab, node), "proxy_pid": n["proxy_pid"],
                         "sshd_pid": n.get("sshd_pid"), "lan_if": n["lan_if"], "config": n["config"]} for node, n in lab["nodes"].items()},
    }


@contextlib.contextmanager
def running(config_path: Path, root: Path, prefix: str = "ct", **kw):
    """A lab under `root` ($APPLIANCE_LAB_DIR set meanwhile, so `appliance lab ...` finds it), always taken down;
    raises LabError if `lab down` left a namespace behind."""
    old = os.environ.get(LAB_ROOT_ENV)
    os.environ[LAB_ROOT_ENV] = str(root)
    name = f"{prefix}{secrets.token_hex(3)}"
    try:
        yield up(config_path, name, **kw)
    finally:
        down(name)
        left = [n for n in netns.netns_list() if n.startswith(name + "-")]
        if old is None:
            os.environ.pop(LAB_ROOT_ENV, None)
        else:
            os.environ[LAB_ROOT_ENV] = old
        if left:
            raise LabError(f"lab down left namespaces: {left}")


# ---------------------------------------------------------------- teardown


def _kill(pids: list[int], grace: float = 3.0) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def down(name: str | None = None) -> list[str]:
    """Stop the lab's processes and delete its namespaces; works from the state file alone, also after a crash."""
    try:
        lab = load(name)
    except LabError:
        if not name:
            raise
        lab = {"name": name, "dir": str(lab_dir(name)), "created_netns": [], "nodes": {}}
    prefix = f"{lab['name']}-"
    spaces = sorted(set(lab.get("created_netns", [])) | {n for n in netns.netns_list() if n.startswith(prefix)})
    # the supervisors first (they stop their engines and drop the VIP), then everything left in our namespaces
    # a recorded PID is ours only while it still runs in one of the lab's namespaces (after a reboot or a
    # long-dead daemon the number may belong to something else: never signal that)
    inside = {p for ns in spaces for p in netns.netns_pids(ns)}
    sup = [n.get("carp_pid") for n in lab.get("nodes", {}).values() if n.get("carp_pid")]
    _kill([p for p in sup if p in inside and _alive(p)])
    rest = [n.get(k) for n in lab.get("nodes", {}).values() for k in ("proxy_pid", "sshd_pid")] + [lab.get("origin_pid")]
    rest = [p for p in rest if p in inside]
    for ns in spaces:
        rest += netns.netns_pids(ns)
    _kill([p for p in rest if p and _alive(p)], grace=2.0)
    for ns in spaces:
        netns.netns_del(ns)
    shutil.rmtree(lab["dir"], ignore_errors=True)
    return spaces


# ---------------------------------------------------------------- failures and their measurement


def node_exec(lab: dict, node: str, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run argv inside a node's namespace with the node's environment (config, identity, state dir)."""
    n = lab["nodes"][node]
    env = {**os.environ, **node_env(lab, node)}
    return subprocess.run(netns.in_ns(n["netns"], argv), env=env, timeout=timeout, **kw)


def _node_by_ip(lab: dict) -> dict[str, str]:
    return {n["lan"].split("/")[0]: node for node, n in lab["nodes"].items()}


class Probe:
    """The client loop through VIP:port to the origin, run in the client namespace; keeps every result."""

    def __init__(self, lab: dict, interval: float = 0.05, timeout: float = 1.0, duration: float = 900.0):
        self.lab, self.timeout = lab, timeout
        self.by_ip = _node_by_ip(lab)
        argv = netns.in_ns(lab["client"]["netns"], [sys.executable, "-m", "appliance.lab.lab", "probe", lab["vip"],
                           str(lab["proxy_port"]), lab["origin"], str(interval), str(timeout), str(duration)])
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["node"] = self.by_ip.get(ev["by"]) if ev["ok"] else None
            with self._lock:
                self.events.append(ev)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.timeout + 3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def window(self, t_from: float, t_to: float = float("inf")) -> list[dict]:
        with self._lock:
            evs = [e for e in self.events if t_from <= e["t0"] <= t_to]
        return sorted(evs, key=lambda e: e["t0"])

    def wait_served(self, nodes: set[str], since: float, timeout: float, stable: int = 6) -> str | None:
        """Until the last `stable` requests (started after `since`) all succeeded via one of `nodes`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            evs = self.window(since)[-stable:]
            if len(evs) == stable and all(e["ok"] and e["node"] in nodes for e in evs):
                return evs[-1]["node"]
            time.sleep(0.05)
        return None

    def outages(self, t_from: float, t_to: float) -> list[float]:
        """Each outage starting in the window: first failed request's start to the next good request's start."""
        out, opened = [], None
        for e in self.window(t_from, t_to + self.timeout + 5):
            if not e["ok"] and opened is None and e["t0"] <= t_to:
                opened = e["t0"]
            elif e["ok"] and opened is not None:
                out.append(round(e["t0"] - opened, 3))
                opened = None
        if opened is not None:
            out.append(float("inf"))
        return out

    def served(self, t_from: float, t_to: float) -> list[str]:
        seen: list[str] = []
        for e in self.window(t_from, t_to):
            if e["ok"] and (not seen or seen[-1] != e["node"]):
                seen.append(e["node"])
        return seen


KINDS = ("engine-kill", "link-down", "proxy-kill", "demote")


def fail(lab: dict, kind: str, node: str) -> None:
    n = lab["nodes"][node]
    if kind == "engine-kill":
        pid = engine_pid(lab, node)
        if pid is None:
            raise LabError(f"{node}: no engine running")
        os.kill(pid, signal.SIGKILL)
    elif kind == "link-down":
        netns.ip("link", "set", n["lan_if"], "down", netns=n["netns"])
    elif kind == "proxy-kill":
        if _alive(n["proxy_pid"]):  # the whole process group: the proxy's workers too
            os.killpg(n["proxy_pid"], signal.SIGKILL)
    elif kind == "demote":
        r = node_exec(lab, node, [f"{VENV_BIN}/appliance", "demote"], capture_output=True, text=True)
        if r.returncode != 0:
            raise LabError(f"{node}: appliance demote: {r.stderr.strip()}")
    else:
        raise LabError(f"unknown failure kind {kind!r} (one of {', '.join(KINDS)})")


def recover(lab: dict, kind: str, node: str) -> None:
    n = lab["nodes"][node]
    if kind == "engine-kill":
        return  # the supervisor restarts the engine by itself
    if kind == "link-down":
        netns.ip("link", "set", n["lan_if"], "up", netns=n["netns"])
    elif kind == "proxy-kill":
        if not _alive(n["proxy_pid"]):
            start_proxy(lab, node)
    elif kind == "demote":
        r = node_exec(lab, node, [f"{VENV_BIN}/appliance", "promote"], capture_output=True, text=True)
        if r.returncode != 0:
            raise LabError(f"{node}: appliance promote: {r.stderr.strip()}")


def preferred(lab: dict) -> str:
    cfg = cfgmod.load(lab["nodes"][next(iter(lab["nodes"]))]["config"])
    return min(cfg.nodes, key=lambda n: cfg.nodes[n].advskew)


def measure(lab: dict, probe: Probe, kind: str, node: str | None = None, timeout: float = 20.0) -> dict:
    """One failure of `kind` on the serving master and its recovery: each outage, who served, VIP holders."""
    node = node or preferred(lab)
    t0 = time.monotonic()
    if probe.wait_served({node}, t0 - 1.0, timeout) is None:
        raise LabError(f"{kind}: {node} is not serving before the failure (holders {holders(lab)})")
    tf = time.monotonic()
    fail(lab, kind, node)
    # served again, by anyone (after an engine kill the restarted engine may win the race itself)
    deadline = tf + timeout
    while time.monotonic() < deadline:
        evs = probe.window(tf)
        bad = [e for e in evs if not e["ok"] or e["node"] != node]
        if bad and probe.wait_served(set(lab["nodes"]), bad[0]["t0"], 0.1) is not None:
            break
        time.sleep(0.05)
    t1 = time.monotonic()
    holders_failed = holders(lab)
    took = next((e["node"] for e in probe.window(tf) if e["ok"] and e["node"] != node), None)
    recover(lab, kind, node)
    back = probe.wait_served({node}, t1, timeout + 10)
    t2 = time.monotonic()
    time.sleep(probe.timeout + 0.2)  # let requests in flight finish before counting
    fo, ro = probe.outages(tf, t1), probe.outages(t1, t2)
    return {
        "kind": kind, "node": node, "took_over": took or (node if fo else None), "returned": back == node,
        "failover_outage": fo[0] if fo else 0.0, "failover_outages": fo,
        "return_outage": max(fo[1:] + ro) if fo[1:] + ro else 0.0, "return_outages": fo[1:] + ro,
        "served": probe.served(tf, t2), "holders_after_failure": holders_failed, "holders_after": holders(lab),
        "seconds": round(t2 - tf, 2),
    }


def fmt_result(r: dict) -> str:
    def f(x: float) -> str:
        return "never" if x == float("inf") else f"{x:.2f} s"
    return (f"{r['kind']:<12} {r['node']} -> {r['took_over'] or 'nobody'}: outage {f(r['failover_outage'])}"
            f"{' (' + str(len(r['failover_outages'])) + ' gaps)' if len(r['failover_outages']) > 1 else ''}; "
            f"back to {r['node'] if r['returned'] else 'NOT ' + r['node']}: outage {f(r['return_outage'])}; "
            f"served by {' -> '.join(x or '?' for x in r['served'])}; vip on {','.join(r['holders_after']) or 'nobody'}")


# ---------------------------------------------------------------- helpers run inside namespaces


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802
        body = f"served-by {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve_origin(host: str, port: int) -> None:
    """The lab's web server: answers every GET with the address that connected (which node's proxy)."""
    srv = http.server.ThreadingHTTPServer((host, port), _Origin)
    srv.daemon_threads = True
    srv.serve_forever()


def probe_once(proxy: tuple[str, int], url: str, timeout: float) -> tuple[bool, str]:
    try:
        with socket.create_connection(proxy, timeout=timeout) as s:
            s.settimeout(timeout)
            host = url.split("/")[2]
            s.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
                if len(data) > 65536:
                    break
    except OSError as e:
        return False, type(e).__name__
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0] + b" ":
        return False, head.split(b"\r\n")[0].decode(errors="replace")[:60] or "empty"
    text = body.decode(errors="replace").strip()
    return (True, text.split()[-1]) if text.startswith("served-by") else (False, "unexpected body")


def run_probe(proxy_host: str, port: int, url: str, interval: float, timeout: float, duration: float) -> None:
    """Client loop (inside the client namespace): one request every `interval`, each on its own thread;
    one JSON line per request: start/end on CLOCK_MONOTONIC (shared by all processes), ok, which node's address."""
    lock = threading.Lock()
    end = time.monotonic() + duration
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def one() -> None:
        t0 = time.monotonic()
        ok, what = probe_once((proxy_host, port), url, timeout)
        line = json.dumps({"t0": round(t0, 4), "t1": round(time.monotonic(), 4), "ok": ok, "by": what})
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    nxt = time.monotonic()
    while not stop.is_set() and time.monotonic() < end:
        threading.Thread(target=one, daemon=True).start()
        nxt += interval
        stop.wait(max(0.0, nxt - time.monotonic()))
    time.sleep(timeout + 0.1)


def get_status(proxy: tuple[str, int], url: str, timeout: float) -> str:
    """One GET through the proxy; the HTTP status code, or the error's name when nothing came back."""
    try:
        with socket.create_connection(proxy, timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(4096)
    except OSError as e:
        return type(e).__name__
    parts = data.split(b"\r\n", 1)[0].split()
    return parts[1].decode() if len(parts) > 1 and parts[0].startswith(b"HTTP/1.") else "no-http-answer"


def client_get(lab: dict, proxy_host: str, url: str, timeout: float = 5.0) -> str:
    """A client request from the client namespace through proxy_host:proxy_port; returns the status code."""
    argv = netns.in_ns(lab["client"]["netns"], [sys.executable, "-m", "appliance.lab.lab", "get", proxy_host,
                                                str(lab["proxy_port"]), url, str(timeout)])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, stdin=subprocess.DEVNULL)
    return r.stdout.strip() or f"exit {r.returncode}: {r.stderr.strip()[-200:]}"


def _main(argv: list[str]) -> int:
    if argv[:1] == ["get"]:
        print(get_status((argv[1], int(argv[2])), argv[3], float(argv[4])))
    elif argv[:1] == ["origin"]:
        serve_origin(argv[1], int(argv[2]))
    elif argv[:1] == ["probe"]:
        run_probe(argv[1], int(argv[2]), argv[3], float(argv[4]), float(argv[5]), float(argv[6]))
    else:
        print("usage: python -m appliance.lab.lab origin HOST PORT | get PROXYHOST PORT URL TIMEOUT | probe PROXYHOST PORT URL INTERVAL TIMEOUT DURATION",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
