"""The node's own interface addresses (every interface: WAN, management, docker bridges, global IPv6), for the guard."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("filters.proxy.ifaddrs")
PROC = Path("/proc/net")
_IFCONFIG_INET = re.compile(r"^\s+inet6?\s+(?:addr:)?([0-9a-fA-F.:]+)(?:%\S+)?\s", re.M)


def local_addresses(proc: Path = PROC) -> list[tuple[str, str]]:
    """(address, interface or "local") for every address of this host, each once. Linux reads /proc (no process,
    no dependency): IPv4 from the local routing table (/proc/net/fib_trie, entries `/32 host LOCAL`), IPv6 from
    /proc/net/if_inet6. Elsewhere (FreeBSD) `ifconfig -a` is parsed. [] when neither works (logged): the rules
    from the config still apply."""
    try:
        if (proc / "fib_trie").exists() or (proc / "if_inet6").exists():
            return _dedup(_fib_trie(proc / "fib_trie") + _if_inet6(proc / "if_inet6"))
        if not sys.platform.startswith("linux"):
            return _dedup(_ifconfig())
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("cannot read this host's interface addresses: %s", e)
    return []


def _dedup(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list({a: (a, i) for a, i in reversed(pairs)}.values())[::-1]


def _fib_trie(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    out, last = [], None
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("|--") or s.startswith("+--"):
            last = s[3:].split()[0]
        elif "/32 host LOCAL" in s and last is not None:
            out.append((last, "local"))
    return out


def _if_inet6(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) >= 6 and len(f[0]) == 32:
            out.append((":".join(f[0][i:i + 4] for i in range(0, 32, 4)), f[5]))
    return out


def _ifconfig() -> list[tuple[str, str]]:
    text = subprocess.run(["ifconfig", "-a"], capture_output=True, text=True, timeout=5, check=True).stdout
    return [(m.group(1), "local") for m in _IFCONFIG_INET.finditer(text)]
