"""Build-input SSH keys: create the sync key and each node's host key once in the config dir, then reuse them."""
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


def ensure_keys(cfg: Appliance, config_dir: Path) -> list[Path]:
    """Make the missing keys (sync key, one host key per node); return the ones created."""
    made: list[Path] = []
    wanted = [(keys.sync_key(config_dir), f"{cfg.sync.user}@carpguard")]
    wanted += [(keys.host_key(config_dir, n), f"root@{cfg.nodes[n].hostname or n}") for n in sorted(cfg.nodes)]
    for path, comment in wanted:
        if path.exists():
            _check_pair(path)
            continue
        _keygen(path, comment)
        made.append(path)
    return made


def public_key(private: Path) -> str:
    return " ".join(private.with_name(private.name + ".pub").read_text().split()[:2])
