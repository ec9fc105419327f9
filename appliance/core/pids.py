"""Processes named by pidfiles: is a PID alive, which live PID a pidfile names, is it ours, and signalling it.

A pidfile outlives its process (a crash, a SIGKILL, a reboot with a persistent run dir); its PID may by then
belong to anything. So a PID read from a file is signalled only after it is proven to be the program the file is
for (`role`: "proxy" for `appliance proxy`, "carp" for `appliance carp`):

- its command line names the appliance entry point and the role's subcommand (/proc/PID/cmdline on Linux,
  `ps -o command=` on FreeBSD and elsewhere), and
- where the start time can be read (Linux: /proc/PID/stat field 22 and /proc/stat btime), it started no later
  than the pidfile was last written: a PID recycled after the file was written started after it.

The file format stays a bare PID (rc.d, systemd and `kill $(cat ...)` read it as one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from appliance.core import state
from appliance.core.errors import ApplianceError

ROLES = {"proxy": "the appliance proxy", "carp": "the appliance CARP supervisor"}
START_SLACK = 2.0  # seconds: /proc/stat btime is whole seconds, and a pidfile is written right after start


class StalePidfile(ApplianceError):
    """A pidfile names a live PID that is not the program it is for: nothing was signalled."""


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


def _recorded(pidfile: Path) -> int | None:
    try:
        return int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_pid(pidfile: Path) -> int | None:
    """The PID written in `pidfile` if that process is alive, else None (not proven ours: see `verified_pid`)."""
    pid = _recorded(pidfile)
    return pid if alive(pid) else None


def cmdline(pid: int) -> list[str] | None:
    """The process's argv (Linux /proc; else `ps -o command=`, split on blanks); None when unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    except OSError:
        pass
    if sys.platform.startswith("linux"):
        return None
    try:
        r = subprocess.run(["ps", "-ww", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.split() if r.returncode == 0 and r.stdout.strip() else None


def _start_ticks(pid: int) -> int:
    """Clock ticks from boot to the process's fork (/proc/PID/stat field 22; exec keeps it)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22; fields after the (comm) start at 3


def fork_order(pid: int | None = None) -> tuple[str, int] | None:
    """(boot id, key) ordering processes by when they were forked: start tick, then PID (allocated in order) within
    a tick. An engine forks its up/down scripts in the order of its transitions, but under load their shells may run
    in any order, so a time a script reads itself can invert two of them; the fork time cannot. The key is only
    comparable within one boot. None where /proc cannot be read."""
    pid = os.getpid() if pid is None else pid
    try:
        key = (_start_ticks(pid) << 22) | pid  # pid_max is at most 2**22
    except (OSError, ValueError, IndexError):
        return None
    return state.boot_id(), key


def order_at(boottime: float) -> tuple[str, int]:
    """fork_order()'s key for a moment (CLOCK_BOOTTIME seconds) instead of a fork: below every process forked in
    that tick or later, above every one forked before."""
    return state.boot_id(), int(boottime * os.sysconf("SC_CLK_TCK")) << 22


def start_time(pid: int) -> float | None:
    """When the process started (epoch seconds), from /proc (Linux); None where that cannot be read."""
    try:
        ticks = _start_ticks(pid)
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def catches_signal(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` yet (Linux /proc/PID/status SigCgt); False when unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return bool(int(status.split("SigCgt:")[1].split()[0], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        return False


def signal_if_caught(pid: int, sig: int) -> bool:
    """Send `sig` only once the process handles it: a program still starting (a speaker before its handlers are set)
    would die of a signal whose default action is to terminate. Whether it was sent."""
    if not catches_signal(pid, sig):
        return False
    try:
        os.kill(pid, sig)
    except OSError:
        return False
    return True


def runs_role(argv: list[str], role: str) -> bool:
    """argv is `appliance ... ROLE ...`: the console script (any path) or `-m appliance.cli`, then the subcommand."""
    for i, a in enumerate(argv):
        entry = os.path.basename(a) == "appliance" or (a in ("appliance", "appliance.cli") and i and argv[i - 1] == "-m")
        if entry:
            return role in argv[i + 1:]
    return False


def why_not_ours(pidfile: Path, pid: int, role: str) -> str | None:
    """None when `pid` is provably the `role` program that wrote `pidfile`; else why not."""
    argv = cmdline(pid)
    if argv is None:
        return "its command line cannot be read"
    if not runs_role(argv, role):
        shown = " ".join(argv)
        return f"it runs {shown[:80] + ('...' if len(shown) > 80 else '')!r}"
    started = start_time(pid)
    try:
        written = Path(pidfile).stat().st_mtime
    except OSError:
        written = None
    if started is not None and written is not None and started > written + START_SLACK:
        return f"it started {started - written:.0f} s after the pidfile was written (a recycled PID)"
    return None


def verified_pid(pidfile: Path, role: str) -> int | None:
    """The live PID `pidfile` names once proven to be the `role` program; None when none is alive.

    StalePidfile when a live process has that PID but is not ours."""
    pid = read_pid(pidfile)
    if pid is None:
        return None
    why = why_not_ours(pidfile, pid, role)
    if why is not None:
        raise StalePidfile(f"pidfile {pidfile} names PID {pid}, which is not {ROLES.get(role, role)} "
                           f"(stale pidfile: {why}); nothing signalled. Remove the file if the program is stopped.")
    return pid


def signal_pidfile(pidfile: Path, sig: int, role: str) -> int | None:
    """Send `sig` to the `role` program `pidfile` names; its PID, or None when no live process is named.

    The one place a PID read from a file is signalled: StalePidfile (and nothing sent) unless it is ours."""
    pid = verified_pid(pidfile, role)
    if pid is not None:
        os.kill(pid, sig)
    return pid
