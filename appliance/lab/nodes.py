"""Each lab node's files: release 1 of its config tree (the lab's cluster file, 0600), its identity, its own sync
key pair (node-local) and known_hosts, and its private sshd's host key, config and authorized_keys."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from appliance.core import loader
from appliance.core.fsio import write_secret
from appliance.core.model import Appliance
from appliance.core.paths import Paths
from appliance.ha import ip as netns
from appliance.lab.daemons import VENV_BIN
from appliance.lab.model import Lab, LabError
from sync import keys as keymod

SSHD_CONFIG = """\
# the lab's private sshd for {node}: only the other nodes' sync keys, only their forced command
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


def keygen(path: Path, comment: str) -> str:
    """A fresh ed25519 key pair (private 0600); returns the public line."""
    try:
        return keymod.keygen(path, comment, netns.tool("ssh-keygen"))
    except keymod.KeygenError as e:
        raise LabError(str(e)) from None


def render_config(text: str) -> str:
    """The lab's copy of the cluster file: sync logs in as root (the lab runs as root; the forced command
    is the only thing the key may run, PermitRootLogin forced-commands-only)."""
    data = yaml.safe_load(text)
    data.setdefault("sync", {})
    data["sync"]["user"] = "root"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def seed_tree(state: Path, config_path: Path, node: str) -> Path:
    """The node's state dir with release 1 live: a node's config tree, i.e. the lab's copy of the cluster file and
    the lists it names (filter.lists, when inside the config dir), nothing else of the source dir (no other cluster
    file such as examples/debian.yaml, no keys/ or compiled/ a build left there, no hooks.d); returns the live
    cluster file."""
    release = state / "releases" / "1"
    release.mkdir(parents=True)
    source = config_path.parent.resolve()
    lists = loader.load(config_path).lists_dir(config_path.parent).resolve()
    if lists.is_dir() and lists.is_relative_to(source) and lists != source:
        shutil.copytree(lists, release / lists.relative_to(source), symlinks=True,
                        ignore=shutil.ignore_patterns(".git", "__pycache__"))
    # the cluster file holds the CARP pass: never copied with the source's mode, written 0600 from creation
    write_secret(release / config_path.name, render_config(config_path.read_text()))
    os.symlink("releases/1", state / "current")
    (state / "node.yaml").write_text(f"node: {node}\n")
    return state / "current" / config_path.name


def setup_ssh(lab: Lab, cfg: Appliance) -> None:
    """Each node's own sync key pair (node-local, <state>/keys/, never in its tree: docs/security.md), a host key
    per node in the lab dir, keys/known_hosts pinning every node's host key on its sync address, and each node's
    sshd files authorising every OTHER node's own key from that node's sync address only."""
    sync_pubs = {}
    for node, n in lab.nodes.items():
        own = Paths(n.state)
        own.keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        own.keys.chmod(0o700)
        sync_pubs[node] = keygen(own.sync_key, f"{keymod.KEY_COMMENT}@{node}")
    host_pubs = {node: keygen(n.sshd_dir / "ssh_host_ed25519_key", f"root@{node}") for node, n in lab.nodes.items()}
    kh = "\n".join(keymod.known_hosts_lines(cfg, host_pubs)) + "\n"
    for node, n in lab.nodes.items():
        known = keymod.known_hosts(n.state / "releases" / "1")
        known.parent.mkdir(exist_ok=True)
        known.write_text(kh)
        _write_sshd_files(lab, cfg, node, sync_pubs)


def _write_sshd_files(lab: Lab, cfg: Appliance, node: str, sync_pubs: dict[str, str]) -> None:
    """authorized_keys (one line per other node's key: the forced `sync-serve` with this node's state dir) and
    sshd_config on the sync address."""
    n = lab.nodes[node]
    sd = n.sshd_dir
    env = f"APPLIANCE_STATE_DIR={n.state} APPLIANCE_NODE={node} APPLIANCE_CONFIG={n.config}"
    lines = keymod.node_authorized_keys(cfg, node, sync_pubs, appliance_bin=f"/usr/bin/env {env} {VENV_BIN}/appliance")
    write_secret(sd / "authorized_keys", "".join(line + "\n" for line in lines))
    write_secret(sd / "sshd_config", SSHD_CONFIG.format(
        node=node, port=cfg.sync.ssh_port, addr=n.sync_ip, host_key=sd / "ssh_host_ed25519_key",
        authorized_keys=sd / "authorized_keys"))
