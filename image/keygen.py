"""Build-input SSH keys: create each node's host key and own sync key once in the config dir, then reuse them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from appliance.core.model import Appliance
from image.errors import BuildError, MissingTool
from sync import keys


def _keygen(path: Path, comment: str) -> None:
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise MissingTool("ssh-keygen", "openssh-client", f"to create {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        keys.keygen(path, comment, exe)
    except keys.KeygenError as e:
        raise BuildError(str(e)) from None


def _check_pair(path: Path) -> None:
    pub = path.with_name(path.name + ".pub")
    if not pub.exists():
        raise BuildError(f"{path} exists but {pub} does not; restore it or remove both to make a new key")
    if os.stat(path).st_mode & 0o077:
        raise BuildError(f"{path} is readable by others (mode {oct(os.stat(path).st_mode & 0o777)}); chmod 600 it")


def wanted_keys(cfg: Appliance, config_dir: Path) -> list[tuple[Path, str]]:
    """Every build-input key of the cluster with its comment: per node its host key and its own sync key (both in
    keys/hosts/<node>/, node-local). The old shared sync key is neither made nor used."""
    wanted: list[tuple[Path, str]] = []
    for n in sorted(cfg.nodes):
        wanted.append((keys.host_key(config_dir, n), f"root@{cfg.nodes[n].hostname or n}"))
        wanted.append((keys.node_sync_key(config_dir, n), f"{keys.KEY_COMMENT}@{n}"))
    return wanted


def _check_distinct(cfg: Appliance, config_dir: Path) -> None:
    """A sync key copied to a second node (or the old shared key reused as a node's) could not be revoked alone."""
    seen: dict[str, Path] = {}
    paths = [keys.node_sync_key(config_dir, n) for n in sorted(cfg.nodes)]
    legacy = keys.sync_key(config_dir)
    if legacy.with_name(legacy.name + ".pub").exists():
        paths.insert(0, legacy)
    for p in paths:
        pub = public_key(p).split()[-1]
        if pub in seen:
            raise BuildError(f"{p} is the same key as {seen[pub]}: each node needs its own sync key "
                             f"(remove {p} and {p.name}.pub to make a new one)")
        seen[pub] = p


def ensure_keys(cfg: Appliance, config_dir: Path) -> list[Path]:
    """Make the missing keys (wanted_keys) once; return the ones created. A tree with only the old shared key gets
    the per-node sync keys made here; the shared key stays where it is (images no longer carry it, see above)."""
    made: list[Path] = []
    for path, comment in wanted_keys(cfg, config_dir):
        if path.exists():
            _check_pair(path)
            continue
        _keygen(path, comment)
        made.append(path)
    _check_distinct(cfg, config_dir)
    return made


def sync_pubs(cfg: Appliance, config_dir: Path, nodes) -> dict[str, str]:
    """node -> its own sync key's public half ("ssh-ed25519 AAAA..."), for the nodes asked for."""
    return {n: public_key(keys.node_sync_key(config_dir, n)) for n in nodes}


def public_key(private: Path) -> str:
    return " ".join(private.with_name(private.name + ".pub").read_text().split()[:2])
