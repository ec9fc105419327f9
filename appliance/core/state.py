"""Node-local state records (role per vhid, admin/health demotion, live sync generation); never synced."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from appliance.core.fsio import read_json, write_json_atomic
from appliance.core.paths import Paths


def read_role(paths: Paths, vhid: int | None = None) -> dict | None:
    """{"role": "MASTER"|"BACKUP"|"INIT", "vhid": int, "iface": str, "since": epoch seconds} or None."""
    return read_json(paths.role_file(vhid))


def write_role(paths: Paths, role: str, vhid: int, iface: str, main_vhid: bool = True, **extra: Any) -> dict:
    """Record a role; `since` only moves when the role really changes (idempotent re-runs keep it)."""
    path = paths.role_file(None if main_vhid else vhid)
    old = read_json(path) or {}
    since = old.get("since") if old.get("role") == role and old.get("vhid") == vhid else time.time()
    data = {**old, **extra, "role": role, "vhid": vhid, "iface": iface, "since": since}
    write_json_atomic(path, data)
    return data


def role_of(paths: Paths) -> str | None:
    """The recorded role of the main vhid, or None when none was ever recorded."""
    return (read_role(paths) or {}).get("role")


def is_master(paths: Paths) -> bool:
    return role_of(paths) == "MASTER"


def read_ha(paths: Paths) -> dict:
    """{"demoted": bool (admin, survives restarts), "health_demoted": bool, "reason": str, "at": epoch}."""
    return {"demoted": False, "health_demoted": False, **(read_json(paths.ha_file) or {})}


def write_ha(paths: Paths, **changes: Any) -> dict:
    data = {**read_ha(paths), **changes, "at": time.time()}
    write_json_atomic(paths.ha_file, data)
    return data


def sync_generation(paths: Paths) -> int | None:
    """The live release: integer name of the <state>/current symlink target, or None."""
    try:
        target = os.readlink(paths.current)
    except OSError:
        return None
    name = Path(target).name
    return int(name) if name.isdigit() else None


def boot_id() -> str:
    """This boot's identity: Linux's random boot_id, else the kernel's boot time (FreeBSD kern.boottime)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    try:
        r = subprocess.run(["sysctl", "-n", "kern.boottime"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def mark_carp_stopped(paths: Paths) -> None:
    """The CARP supervisor was stopped on purpose (an admin's `systemctl stop` / rc.d stop: SIGTERM)."""
    write_json_atomic(paths.carp_stopped, {"boot": boot_id(), "at": time.time()})


def clear_carp_stopped(paths: Paths) -> None:
    try:
        paths.carp_stopped.unlink()
    except FileNotFoundError:
        pass


def carp_stopped_on_purpose(paths: Paths) -> bool:
    """True only after a deliberate stop in this boot. A crash (the service manager restarts it), a node that has
    just booted and not started CARP yet, or one whose supervisor never ran, count as CARP on: a CARP change
    synced in such a window would be applied when the supervisor starts, without anyone having stopped it."""
    d = read_json(paths.carp_stopped)
    return isinstance(d, dict) and bool(d.get("boot")) and d.get("boot") == boot_id()
