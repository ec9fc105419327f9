"""Two sync nodes on loopback: state dirs and a private sshd for each peer (the sync tests' harness)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from appliance.core.loader import load
from appliance.core.paths import Paths
from appliance.core.state import write_role
from sync import keys as keymod
from tests.support.env import APPLIANCE, EXAMPLES, config_tree, free_port, need_tool

SSHD = shutil.which("sshd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "/usr/sbin/sshd"


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited {proc.returncode}: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on {host}:{port} within {timeout}s")


def _common_port(addrs: list[str], tries: int = 20) -> int:
    """A port free on every node's sync address (sync.ssh_port is one setting for the cluster)."""
    for _ in range(tries):
        port = free_port(addrs[0])
        try:
            for a in addrs[1:]:
                with socket.socket() as s:
                    s.bind((a, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {addrs} after {tries} tries")


class Node:
    """One appliance node: its state dir with releases/1 + current, node.yaml, role; optionally an sshd."""

    def __init__(self, lab: "SyncLab", name: str, addr: str):
        self.lab, self.name, self.addr = lab, name, addr
        self.state = lab.root / name
        self.sshd: subprocess.Popen | None = None
        self.port = lab.port

    @property
    def key(self) -> Path:
        """This node's own sync key (node-local, Paths.sync_key)."""
        return Paths(self.state).sync_key

    @property
    def config(self) -> Path:
        return self.state / "current" / "appliance.yaml"

    @property
    def log_dir(self) -> Path:
        """This node's own log directory (`<root>/<name>-log`, not made here): what its `logs` verb may read."""
        return self.lab.root / f"{self.name}-log"

    @property
    def tree(self) -> Path:
        return (self.state / "current").resolve()

    def env(self, **extra: str) -> dict:
        return {**os.environ, "APPLIANCE_STATE_DIR": str(self.state), "APPLIANCE_CONFIG": str(self.config),
                "APPLIANCE_NODE": self.name, **extra}

    def appliance(self, *args: str, timeout: float = 120, check: bool = False, **popen) -> subprocess.CompletedProcess:
        r = subprocess.run([APPLIANCE, *args], env=self.env(), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, **popen)
        if check and r.returncode != 0:
            raise AssertionError(f"appliance {' '.join(args)} exited {r.returncode}: {r.stderr}")
        return r

    def sync(self, *args: str, timeout: float = 120) -> tuple[int, dict]:
        r = self.appliance("sync", "--json", *args, timeout=timeout)
        try:
            data = json.loads(r.stdout)
        except ValueError:
            raise AssertionError(f"sync printed no JSON (exit {r.returncode}): {r.stdout!r} {r.stderr!r}")
        return r.returncode, data

    def role(self, role: str) -> None:
        write_role(Paths(self.state), role, 1, "lo")

    def live(self) -> int | None:
        try:
            return int(Path(os.readlink(self.state / "current")).name)
        except FileNotFoundError:
            return None

    def start_sshd(self) -> None:
        d = self.state.parent / f"sshd-{self.name}"
        d.mkdir(exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation dir sshd insists on
        cfg = d / "sshd_config"
        cfg.write_text(
            f"Port {self.port}\nListenAddress {self.addr}\nHostKey {self.lab.host_keys[self.name]}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nPidFile none\nLogLevel VERBOSE\n"
            "AllowTcpForwarding no\nX11Forwarding no\nPermitTTY no\nMaxStartups 50\n"
        )
        # APPLIANCE_LOG_DIR: the only directory this node's `logs` verb serves (node-local, like the state dir)
        bin_ = f"/usr/bin/env APPLIANCE_STATE_DIR={self.state} APPLIANCE_LOG_DIR={self.log_dir} APPLIANCE_SYNC_NO_COMPILE={os.environ.get('APPLIANCE_SYNC_NO_COMPILE', '0')} {APPLIANCE}"
        pubs = {n: node.key.with_name(node.key.name + ".pub").read_text() for n, node in self.lab.nodes.items()}
        lines = keymod.node_authorized_keys(self.lab.cfg_obj(), self.name, pubs, appliance_bin=bin_)  # every other node's own key
        (d / "authorized_keys").write_text("".join(l + "\n" for l in lines))
        self.sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "wb"))
        try:
            _wait_port(self.addr, self.port, self.sshd)
        except BaseException:
            self.stop()  # the lab fixture calls this before its try/finally: never leave sshd running
            raise

    def stop(self) -> None:
        if self.sshd and self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(5)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait(5)


class SyncLab:
    """A master (fw1, 127.0.0.1) and backups (fw2 127.0.0.2, ...) sharing one port on loopback."""

    def __init__(self, root: Path, peers: int = 1, mutate=None, examples: Path = EXAMPLES):
        need_tool("sshd", "rsync", "ssh-keygen")
        self.root = root
        self.port = _common_port([f"127.0.0.{i + 1}" for i in range(peers + 1)])
        names = ["fw1"] + [f"fw{i + 2}" for i in range(peers)]
        self.nodes = {n: Node(self, n, f"127.0.0.{i + 1}") for i, n in enumerate(names)}
        data = yaml.safe_load((examples / "appliance.yaml").read_text())
        data["nodes"] = {n: {"lan": f"192.168.1.{i + 2}/24", "sync": f"127.0.0.{i + 1}/29", "advskew": i * 50}
                         for i, n in enumerate(names)}
        data["sync"].update({"user": "root", "ssh_port": self.port, "timeout": 20, "keep_releases": 3})
        data["proxy"]["metrics_port"] = free_port()
        data["proxy"]["access_log"] = str(root / "access.log")
        if mutate:
            mutate(data)
        self.data = data
        seed = root / "seed"
        # a node's config tree holds one cluster file and its lists: not examples/debian.yaml (another cluster file,
        # with its own CARP pass), nor the keys/ and compiled/ that `make image` / `make run` leave in examples/
        # (the lab makes its own keys)
        config_tree(seed, examples)
        (seed / "appliance.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        self.host_keys = {}
        pubs = {}
        for n in names:
            hk = root / "hostkeys" / n / "ssh_host_ed25519_key"
            hk.parent.mkdir(parents=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)], check=True)
            self.host_keys[n] = hk
            pubs[n] = hk.with_suffix(".pub").read_text()
        kh = keymod.known_hosts_lines(self.cfg_obj(seed), pubs)
        keymod.known_hosts(seed).parent.mkdir(exist_ok=True)
        keymod.known_hosts(seed).write_text("\n".join(kh) + "\n")
        for n, node in self.nodes.items():  # the image ships releases/1 as a plain copy, no metadata
            (node.state / "releases").mkdir(parents=True)
            shutil.copytree(seed, node.state / "releases" / "1", symlinks=True)
            os.symlink("releases/1", node.state / "current")
            (node.state / "node.yaml").write_text(f"node: {n}\n")
            node.role("MASTER" if n == "fw1" else "BACKUP")
            keymod.keygen(node.key, f"appliance-sync@{n}")  # each node's own key pair, never in the synced tree

    def cfg_obj(self, tree: Path | None = None):
        return load((tree or self.root / "seed") / "appliance.yaml")

    @property
    def master(self) -> Node:
        return self.nodes["fw1"]

    @property
    def backup(self) -> Node:
        return self.nodes["fw2"]

    def close(self) -> None:
        for n in self.nodes.values():
            n.stop()
