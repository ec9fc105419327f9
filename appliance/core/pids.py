"""Processes named by pidfiles: is a PID alive, which live PID a pidfile names, and signalling it."""
from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int | None) -> bool:
    """True when a process with this PID exists (also when it belongs to another user)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def read_pid(pidfile: Path) -> int | None:
    """The PID written in `pidfile` if that process is alive, else None."""
    try:
        pid = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def signal_pidfile(pidfile: Path, sig: int) -> int | None:
    """Send `sig` to the process `pidfile` names; its PID, or None when no live process is named.

    The one place a PID read from a file is signalled (where a later check that it is ours belongs)."""
    pid = read_pid(pidfile)
    if pid is None:
        return None
    os.kill(pid, sig)
    return pid
