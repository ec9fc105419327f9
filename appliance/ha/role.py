"""Role transitions: record the role, move the VIP and send gratuitous ARP (Linux), run hooks.d in name order."""
from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.core import state
from appliance.core.errors import BadInput
from appliance.core.paths import Paths
from appliance.ha import ip as netns

if TYPE_CHECKING:  # the up/down scripts' entry (transition.py) runs apply_group without the config's model
    from appliance.core.model import Appliance

log = logging.getLogger("appliance.ha")
ROLES = ("MASTER", "BACKUP")
IS_LINUX = sys.platform.startswith("linux")


@dataclass(frozen=True)
class Group:
    """One CARP group this node takes part in: the main vhid or one of cluster.extra_vhids."""

    vhid: int
    vip: ipaddress.IPv4Interface
    advskew: int
    main: bool


def groups(cfg: Appliance, node: str) -> list[Group]:
    c, n = cfg.cluster, cfg.nodes[node]
    out = [Group(c.vhid, c.vip, n.advskew, True)]
    for x in c.extra_vhids:
        out.append(Group(x.vhid, x.vip, x.advskew.get(node, n.advskew), False))
    return out


def group_for(cfg: Appliance, node: str, vhid: int | None) -> Group:
    for g in groups(cfg, node):
        if vhid is None or g.vhid == vhid:
            return g
    known = ", ".join(str(g.vhid) for g in groups(cfg, node))
    raise BadInput(f"--vhid {vhid} is not a vhid of this cluster (known: {known}; see cluster.vhid and cluster.extra_vhids)")


def log_line(message: str, paths: Paths) -> None:
    """One line to stderr (captured by the supervisor/syslog) and to <state>/ha.log."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}"
    log.info(message)
    print(f"appliance: {message}", file=sys.stderr, flush=True)
    try:
        paths.state.mkdir(parents=True, exist_ok=True)
        with open(paths.ha_log, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


# ---------------------------------------------------------------- hooks


def hook_dirs(config_path: Path | None, role: str, paths: Paths) -> list[Path]:
    """The node-local <hooks>/<role>/ (Paths.hooks): never the synced config tree, which carries no code. A
    hooks.d left beside the config (the old place) is not run; the log says where hooks go now."""
    if config_path is not None:
        old = Path(config_path).resolve().parent / "hooks.d"
        if old.exists():
            log_line(f"hooks: {old} is inside the synced config tree and is ignored; move the hooks to "
                     f"{paths.hooks}/<role>/ (node-local, root-owned)", paths)
    return [paths.hooks / role.lower()]


def unsafe(path: Path, is_dir: bool) -> str:
    """Why a hooks dir or hook must not run ('' when fine): it must be owned by root (or by whoever runs this,
    when that is not root: tests) and writable by nobody else."""
    st = os.stat(path)
    owners = {0, os.geteuid()}
    if st.st_uid not in owners:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"group/world-writable (mode {st.st_mode & 0o7777:o})"
    if is_dir != os.path.isdir(path):
        return "not a directory" if is_dir else "not a regular file"
    return ""


def list_hooks(dirs: list[Path], paths: Paths) -> list[Path]:
    """Executable regular files from all dirs, in name order (a name in a later dir runs after the same name earlier).
    A dir (or its parent, the hooks root) or hook that others could have written is refused, logged, never run."""
    found: list[tuple[str, int, Path]] = []
    for i, d in enumerate(dirs):
        if not d.is_dir():
            continue
        why = next((f"{x}: {w}" for x in (d.parent, d) if (w := unsafe(x, True))), "")
        if why:
            log_line(f"hooks in {d} refused, none run: {why}", paths)
            continue
        for p in d.iterdir():
            if p.name.startswith(".") or not p.is_file():
                continue
            if not os.access(p, os.X_OK):
                log_line(f"hook {p} is not executable; skipped", paths)
                continue
            if why := unsafe(p, False):
                log_line(f"hook {p} refused, not run: {why}", paths)
                continue
            found.append((p.name, i, p))
    return [p for _, _, p in sorted(found)]


def run_hooks(hooks: list[Path], env: dict[str, str], timeout: float, paths: Paths) -> list[dict]:
    """Run each hook with a timeout; a failing or hanging hook is logged and does not stop the others."""
    results = []
    for h in hooks:
        t0 = time.monotonic()
        rc: int | None
        try:
            p = subprocess.Popen([str(h)], env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            log_line(f"hook {h} failed to start: {e}", paths)
            results.append({"hook": str(h), "rc": None, "error": str(e)})
            continue
        try:
            out, _ = p.communicate(timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = p.communicate()
            rc = None
        dt = time.monotonic() - t0
        tail = (out or b"").decode(errors="replace").strip().splitlines()[-1:] if out else []
        if rc is None:
            log_line(f"hook {h} killed after {timeout:g} s timeout", paths)
        elif rc != 0:
            log_line(f"hook {h} exited {rc}{': ' + tail[0] if tail else ''}", paths)
        results.append({"hook": str(h), "rc": rc, "seconds": round(dt, 3)})
    return results


# ---------------------------------------------------------------- the transition


def _lock(vhid: int, paths: Paths):
    paths.run.mkdir(parents=True, exist_ok=True)
    f = open(paths.role_lock(vhid), "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def gratuitous_arp(iface: str, vip: ipaddress.IPv4Interface, paths: Paths) -> None:
    """Gratuitous ARP for the VIP, in the background (the role change does not wait for it)."""
    try:
        subprocess.Popen([netns.tool("arping"), "-q", "-U", "-c", "1", "-I", iface, str(vip.ip)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError as e:
        log_line(f"arping not run: {e}", paths)


def _move_vip(paths: Paths, role: str, iface: str, vip: ipaddress.IPv4Interface, send_garp: bool) -> bool:
    """Add (MASTER, with gratuitous ARP unless the engine sends it) or remove the VIP; True when it changed."""
    if role == "MASTER":
        changed = netns.add_address(iface, vip)
        if send_garp:
            gratuitous_arp(iface, vip, paths)
        return changed
    return netns.del_address(iface, vip)


def apply(paths: Paths, cfg: Appliance, node: str, role: str, vhid: int | None = None, iface: str | None = None,
          config_path: Path | None = None, seq: int | None = None, manage_vip: bool | None = None,
          reason: str = "", send_garp: bool = True, boot: str | None = None) -> dict:
    """Make this node MASTER or BACKUP of one vhid. Idempotent: hooks run and a line is logged only on a change.
    `seq` orders the engine's scripts (pids.fork_order); it is compared only with one recorded in the same `boot`."""
    return apply_group(paths, group_for(cfg, node, vhid), node, role, iface or cfg.cluster.interface,
                       cfg.ha.hook_timeout, config_path, seq=seq, manage_vip=manage_vip, reason=reason,
                       send_garp=send_garp, boot=boot)


def apply_group(paths: Paths, g: Group, node: str, role: str, iface: str, hook_timeout: float,
                config_path: Path | None = None, seq: int | None = None, manage_vip: bool | None = None,
                reason: str = "", send_garp: bool = True, boot: str | None = None) -> dict:
    """apply() for one group, with what it needs from the config already picked out."""
    role = role.upper()
    if role not in ROLES:
        raise BadInput(f"role must be master or backup (got {role.lower()!r})")
    manage_vip = IS_LINUX if manage_vip is None else manage_vip
    with _lock(g.vhid, paths):
        old = state.read_role(paths, None if g.main else g.vhid) or {}
        if seq is not None and isinstance(old.get("seq"), int) and old.get("boot") == boot and old["seq"] > seq:
            # an older up/down script (forked earlier) that lost the race to a newer one: the newer one's decision stands
            log_line(f"carp: {role} for vhid {g.vhid} not applied: a script forked after it already ran "
                     f"(seq {seq} < {old['seq']}); {old.get('role')} stands", paths)
            return {**old, "stale": True}
        vip_changed = _move_vip(paths, role, iface, g.vip, send_garp) if manage_vip else False
        extra = {"vip": str(g.vip), "node": node}
        if seq is not None:
            extra["seq"] = seq
            if boot is not None:
                extra["boot"] = boot
        data = state.write_role(paths, role, g.vhid, iface, main_vhid=g.main, **extra)
        changed = old.get("role") != role
        if changed:
            why = f" ({reason})" if reason else ""
            log_line(f"carp: {old.get('role', 'INIT')} -> {role} vhid {g.vhid} vip {g.vip} on {iface}{why}", paths)
    # hooks run outside the lock: a slow hook never delays the next transition's VIP move
    data["changed"] = changed
    data["vip_changed"] = vip_changed
    if changed:
        env = {"APPLIANCE_ROLE": role, "APPLIANCE_PREVIOUS_ROLE": old.get("role", "INIT"),
               "APPLIANCE_VHID": str(g.vhid), "APPLIANCE_VIP": str(g.vip), "APPLIANCE_IFACE": iface,
               "APPLIANCE_NODE": node}
        hooks = list_hooks(hook_dirs(config_path, role, paths), paths)
        data["hooks"] = run_hooks(hooks, env, hook_timeout, paths)
    return data
