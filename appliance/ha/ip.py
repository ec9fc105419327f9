"""Thin wrappers over `ip` for network namespaces, links and addresses (used by the role engine and the lab)."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path

SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


def tool(name: str) -> str:
    """Absolute path of a system tool (ip, arping, ucarp), also when /sbin is not on PATH."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN)
    return found or name


def ip(*args: str, netns: str | None = None, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    cmd = [tool("ip")] + (["-n", netns] if netns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def in_ns(netns: str | None, argv: list[str]) -> list[str]:
    """argv prefixed to run inside `netns` (unchanged when netns is None)."""
    return ([tool("ip"), "netns", "exec", netns] if netns else []) + list(argv)


def addresses(iface: str, netns: str | None = None) -> list[ipaddress.IPv4Interface]:
    """IPv4 addresses on `iface` (empty when the interface does not exist)."""
    r = ip("-j", "-4", "addr", "show", "dev", iface, netns=netns, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    out = []
    for link in json.loads(r.stdout):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                out.append(ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}"))
    return out


def has_address(iface: str, addr: ipaddress.IPv4Interface | ipaddress.IPv4Address, netns: str | None = None) -> bool:
    want = addr.ip if isinstance(addr, ipaddress.IPv4Interface) else addr
    return any(a.ip == want for a in addresses(iface, netns))


def add_address(iface: str, addr: ipaddress.IPv4Interface, netns: str | None = None) -> bool:
    """Add `addr` to `iface`; False when it was already there (idempotent)."""
    if has_address(iface, addr, netns):
        return False
    r = ip("addr", "add", str(addr), "dev", iface, netns=netns, check=False)
    if r.returncode != 0 and "File exists" not in r.stderr:
        raise RuntimeError(f"ip addr add {addr} dev {iface}: {r.stderr.strip()}")
    return r.returncode == 0


def del_address(iface: str, addr: ipaddress.IPv4Interface, netns: str | None = None) -> bool:
    """Remove `addr` from `iface`; False when it was not there (idempotent)."""
    if not has_address(iface, addr, netns):
        return False
    r = ip("addr", "del", str(addr), "dev", iface, netns=netns, check=False)
    if r.returncode != 0 and "Cannot assign" not in r.stderr:
        raise RuntimeError(f"ip addr del {addr} dev {iface}: {r.stderr.strip()}")
    return r.returncode == 0


def link_up(iface: str, netns: str | None = None) -> bool:
    """True when the link is administratively up and has carrier (operstate UP or UNKNOWN)."""
    if netns is None:
        p = Path("/sys/class/net") / iface / "operstate"
        try:
            return p.read_text().strip() in ("up", "unknown")
        except OSError:
            return False
    r = ip("-j", "link", "show", "dev", iface, netns=netns, check=False)
    if r.returncode != 0:
        return False
    try:
        return json.loads(r.stdout)[0].get("operstate") in ("UP", "UNKNOWN")
    except (ValueError, IndexError):
        return False


def neighbour_state(addr: str, netns: str | None = None) -> str | None:
    """The kernel's neighbour-table state for `addr` (REACHABLE, STALE, ...) without sending anything."""
    r = ip("-j", "neigh", "show", "to", addr, netns=netns, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return None
    try:
        entries = json.loads(r.stdout)
    except ValueError:
        return None
    for e in entries:
        st = e.get("state") or []
        return ",".join(st) if isinstance(st, list) else str(st)
    return None


def netns_list() -> list[str]:
    r = ip("-j", "netns", "list", check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    return [e["name"] for e in json.loads(r.stdout)]


def netns_add(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def netns_del(name: str) -> None:
    if name in netns_list():
        ip("netns", "del", name, check=False)


def netns_pids(name: str) -> list[int]:
    r = ip("netns", "pids", name, check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def sysctl(netns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    r = subprocess.run(in_ns(netns, ["sh", "-c", f"echo {value} > {path}"]), capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"sysctl {key}={value} in {netns}: {r.stderr.strip()}")
