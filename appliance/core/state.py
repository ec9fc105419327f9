"""Node-local state files (role, vhid, since) written atomically under the state dir; never synced."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

from appliance.core.config import state_dir

ROLE_FILE = "role.json"


def write_atomic(path: Path, write: Callable[[BinaryIO], None], mode: int = 0o644) -> None:
    """Let `write` fill a temp file in the same directory, fsync, rename over `path`: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: Path, data: Any, mode: int = 0o644) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()), mode)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def role_file(vhid: int | None = None, base: Path | None = None) -> Path:
    """role.json for the cluster's main vhid; role-<vhid>.json for further vhids."""
    d = base or state_dir()
    return d / (ROLE_FILE if vhid is None else f"role-{vhid}.json")


def read_role(vhid: int | None = None, base: Path | None = None) -> dict | None:
    """{"role": "MASTER"|"BACKUP"|"INIT", "vhid": int, "iface": str, "since": epoch seconds} or None."""
    return read_json(role_file(vhid, base))


def write_role(role: str, vhid: int, iface: str, main_vhid: bool = True, base: Path | None = None, **extra: Any) -> dict:
    """Record a role; `since` only moves when the role really changes (idempotent re-runs keep it)."""
    path = role_file(None if main_vhid else vhid, base)
    old = read_json(path) or {}
    since = old.get("since") if old.get("role") == role and old.get("vhid") == vhid else time.time()
    data = {**old, **extra, "role": role, "vhid": vhid, "iface": iface, "since": since}
    write_json_atomic(path, data)
    return data


def is_master(base: Path | None = None) -> bool:
    r = read_role(base=base)
    return bool(r and r.get("role") == "MASTER")


HA_FILE = "ha.json"


def ha_file(base: Path | None = None) -> Path:
    return (base or state_dir()) / HA_FILE


def read_ha(base: Path | None = None) -> dict:
    """{"demoted": bool (admin, survives restarts), "health_demoted": bool, "reason": str, "at": epoch}."""
    return {"demoted": False, "health_demoted": False, **(read_json(ha_file(base)) or {})}


def write_ha(base: Path | None = None, **changes: Any) -> dict:
    data = {**read_ha(base), **changes, "at": time.time()}
    write_json_atomic(ha_file(base), data)
    return data


def sync_generation(base: Path | None = None) -> int | None:
    """The live release: integer name of the <state>/current symlink target, or None."""
    cur = (base or state_dir()) / "current"
    try:
        target = os.readlink(cur)
    except OSError:
        return None
    name = Path(target).name
    return int(name) if name.isdigit() else None
