"""Where the sync keys live in a config tree, and the authorized_keys / known_hosts lines built from them."""
from __future__ import annotations

from pathlib import Path

from appliance.config import Appliance

KEYS_DIR = "keys"
SYNC_KEY = "sync_ed25519"  # the push key: the same on every node, so whichever node is master can push
KNOWN_HOSTS = "known_hosts"  # pinned host keys of every node's sync address (never trust-on-first-use)
HOST_KEYS_DIR = "hosts"  # keys/hosts/<node>/ssh_host_ed25519_key[.pub]: node-local, never synced
SERVE_COMMAND = "sync-serve"  # the only command a sync key may run on a peer


def keys_dir(config_dir: Path) -> Path:
    return config_dir / KEYS_DIR


def sync_key(config_dir: Path) -> Path:
    return keys_dir(config_dir) / SYNC_KEY


def known_hosts(config_dir: Path) -> Path:
    return keys_dir(config_dir) / KNOWN_HOSTS


def host_key(config_dir: Path, node: str) -> Path:
    return keys_dir(config_dir) / HOST_KEYS_DIR / node / "ssh_host_ed25519_key"


def authorized_keys_line(cfg: Appliance, node: str, pubkey: str, appliance_bin: str = "/usr/local/bin/appliance") -> str:
    """The line for `node`'s sync user: only the sync command, only from the other nodes' sync addresses."""
    sources = ",".join(str(n.sync.ip) for name, n in cfg.nodes.items() if name != node)
    key = " ".join(pubkey.split()[:2])
    return f'command="{appliance_bin} {SERVE_COMMAND}",from="{sources}",restrict {key} appliance-sync'


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
