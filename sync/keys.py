"""Where the sync keys live in a config tree, and the authorized_keys / known_hosts lines built from them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from appliance.core.errors import ApplianceError
from appliance.core.model import Appliance

KEYS_DIR = "keys"
SYNC_KEY = "sync_ed25519"  # each node's own push key: <state>/keys/ (Paths.sync_key), never synced
# The old layout kept ONE key, shared by every node, in the synced tree (keys/sync_ed25519): whoever read any node's
# tree could push as any node, and it could not be revoked alone. It still works until `appliance keys init` has
# made this node's own key (then it is ignored; delete it from the tree), see docs/security.md.
KEY_COMMENT = "appliance-sync"  # authorized_keys comment: appliance-sync@<node> names the key's owner
KNOWN_HOSTS = "known_hosts"  # pinned host keys of every node's sync address (never trust-on-first-use)
HOST_KEYS_DIR = "hosts"  # keys/hosts/<node>/ssh_host_ed25519_key[.pub]: node-local, never synced
SERVE_COMMAND = "sync-serve"  # the only command a sync key may run on a peer


class KeygenError(ApplianceError):
    """ssh-keygen is missing or failed."""


def keygen(path: Path, comment: str, exe: str | None = None) -> str:
    """A fresh ed25519 key pair without passphrase (private 0600 from creation, public 0644); the public line.

    An existing pair at `path` is replaced (ssh-keygen would otherwise stop and ask)."""
    exe = exe or shutil.which("ssh-keygen")
    if exe is None:
        raise KeygenError(f"ssh-keygen not found (needed to create {path}); install openssh-client")
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, pub):
        p.unlink(missing_ok=True)
    old = os.umask(0o077)
    try:
        r = subprocess.run([exe, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    finally:
        os.umask(old)
    if r.returncode != 0:
        raise KeygenError(f"ssh-keygen failed for {path}: {r.stderr.strip()}")
    os.chmod(path, 0o600)
    os.chmod(pub, 0o644)
    return pub.read_text()


def keys_dir(config_dir: Path) -> Path:
    return config_dir / KEYS_DIR


def sync_key(config_dir: Path) -> Path:
    return keys_dir(config_dir) / SYNC_KEY


def known_hosts(config_dir: Path) -> Path:
    return keys_dir(config_dir) / KNOWN_HOSTS


def host_key(config_dir: Path, node: str) -> Path:
    return keys_dir(config_dir) / HOST_KEYS_DIR / node / "ssh_host_ed25519_key"


def node_sync_key(config_dir: Path, node: str) -> Path:
    """Build input (`make image`): `node`'s own sync key, keys/hosts/<node>/sync_ed25519 beside its host key (node-local,
    never synced); the image puts it at the node's Paths.sync_key, where `appliance keys init` makes it on a node."""
    return keys_dir(config_dir) / HOST_KEYS_DIR / node / SYNC_KEY


# How the forced command gains the rights it needs on the peer (write <state>, SIGHUP the root-owned proxy):
# "none" runs it as the login user (sync.user: root with PermitRootLogin forced-commands-only), "doas" (FreeBSD
# image, security/doas) and "sudo" (Linux) run exactly `<appliance> sync-serve` as root through a one-command rule.
ELEVATE = {"none": (), "doas": ("/usr/local/bin/doas", "-n"), "sudo": ("/usr/bin/sudo", "-n")}
# what the rule must pass through the reset environment: the command the master asked for, and who asked (logs)
PASSED_ENV = ("SSH_ORIGINAL_COMMAND", "SSH_CLIENT")


def default_elevate(user: str, platform: str | None = None) -> str:
    """root needs nothing; otherwise doas on FreeBSD (what the image ships), sudo elsewhere."""
    platform = sys.platform if platform is None else platform
    if user == "root":
        return "none"
    return "doas" if platform.startswith("freebsd") else "sudo"


def serve_command(appliance_bin: str = "/usr/local/bin/appliance", elevate: str = "none") -> str:
    """The forced command: `<appliance> sync-serve`, through `doas -n` / `sudo -n` when elevated."""
    if elevate not in ELEVATE:
        raise ValueError(f"elevate: {elevate!r} is not one of {', '.join(ELEVATE)}")
    if '"' in appliance_bin or "\n" in appliance_bin:
        raise ValueError(f"appliance_bin: {appliance_bin!r} cannot go into an authorized_keys command=\"...\"")
    if ELEVATE[elevate] and (not appliance_bin.startswith("/") or any(c.isspace() or c == "\\" for c in appliance_bin)):
        # the doas/sudo rule names one absolute program; the forced command must name the very same string
        raise ValueError(f"appliance_bin: {appliance_bin!r} must be one absolute path (no spaces) for {elevate}")
    return " ".join((*ELEVATE[elevate], appliance_bin, SERVE_COMMAND))


def authorized_keys_line(cfg: Appliance, node: str, pubkey: str, appliance_bin: str = "/usr/local/bin/appliance",
                         elevate: str = "none", owner: str | None = None) -> str:
    """The line for `node`'s sync user: only the sync command; with `owner` (per-node keys) owner's key, only from
    owner's sync address, tagged appliance-sync@owner; without it the old shared key, from every other node."""
    if owner is not None and (owner == node or owner not in cfg.nodes):
        raise ValueError(f"owner: {owner!r} must be another node of the cluster than {node!r}")
    names = [owner] if owner else [n for n in cfg.nodes if n != node]
    sources = ",".join(str(cfg.nodes[n].sync.ip) for n in names)
    key = " ".join(pubkey.split()[:2])
    tag = f"{KEY_COMMENT}@{owner}" if owner else KEY_COMMENT
    return f'command="{serve_command(appliance_bin, elevate)}",from="{sources}",restrict {key} {tag}'


def node_authorized_keys(cfg: Appliance, node: str, pubkeys: dict[str, str], appliance_bin: str = "/usr/local/bin/appliance",
                         elevate: str = "none") -> list[str]:
    """`node`'s authorized_keys: one line per OTHER node's own public key (pubkeys: node -> public line)."""
    return [authorized_keys_line(cfg, node, pubkeys[o], appliance_bin, elevate, owner=o)
            for o in cfg.nodes if o != node and o in pubkeys]


def revoke(text: str, owner: str) -> tuple[str, int, int]:
    """authorized_keys text without owner's lines (tagged appliance-sync@owner): (new text, removed, shared) where
    `shared` counts old shared-key lines left, which a per-node revocation cannot take away alone."""
    keep, removed, shared = [], 0, 0
    for line in text.splitlines():
        words = line.split()
        if words and words[-1] == f"{KEY_COMMENT}@{owner}":
            removed += 1
            continue
        shared += bool(words) and words[-1] == KEY_COMMENT
        keep.append(line)
    return "".join(l + "\n" for l in keep), removed, shared


def push_key(node_key: Path, config_dir: Path) -> Path:
    """The key this node pushes with: its own (node_key, Paths.sync_key), else the old shared key of the tree
    (kept working until `appliance keys init` ran on this node), else its own path (missing: the caller says so)."""
    if node_key.exists():
        return node_key
    legacy = sync_key(config_dir)
    return legacy if legacy.exists() else node_key


def doas_rule(user: str, appliance_bin: str = "/usr/local/bin/appliance") -> str:
    """doas.conf(5): `user` may run exactly `<appliance> sync-serve` as root, keeping only the SSH variables."""
    return f"permit nopass setenv {{ {' '.join(PASSED_ENV)} }} {user} as root cmd {appliance_bin} args {SERVE_COMMAND}"


def sudoers_rules(user: str, appliance_bin: str = "/usr/local/bin/appliance") -> list[str]:
    """sudoers(5) lines for /etc/sudoers.d/<user>: the same single command as root, the SSH variables kept."""
    return [f'Defaults:{user} env_keep += "{" ".join(PASSED_ENV)}", !requiretty',
            f"{user} ALL=(root) NOPASSWD: {appliance_bin} {SERVE_COMMAND}"]


def elevation_rules(elevate: str, user: str, appliance_bin: str = "/usr/local/bin/appliance") -> tuple[str, list[str]]:
    """(file on the peer, its lines) that lets the forced command run; ("", []) when nothing is needed."""
    if elevate == "doas":
        return "/usr/local/etc/doas.conf", [doas_rule(user, appliance_bin)]
    if elevate == "sudo":
        return f"/etc/sudoers.d/{user}", sudoers_rules(user, appliance_bin)
    return "", []


def known_hosts_lines(cfg: Appliance, host_pubkeys: dict[str, str], port: int | None = None) -> list[str]:
    """One line per node: its sync address (with [addr]:port when not 22) and its pinned host key."""
    port = cfg.sync.ssh_port if port is None else port
    out = []
    for name, n in cfg.nodes.items():
        if name not in host_pubkeys:
            continue
        addr = str(n.sync.ip) if port == 22 else f"[{n.sync.ip}]:{port}"
        out.append(f"{addr} {' '.join(host_pubkeys[name].split()[:2])}")
    return out
