"""Run a parse of untrusted input in a forked child with a memory, CPU and wall-clock bound (run_bounded).

What a peer pushes (the cluster file, the lists) is checked by code that was written for well-meant input; a
crafted file must cost the receiver a bounded amount, whatever parser path it finds. The child gets RLIMIT_AS
(its address space: what it has when forked plus `mem_bytes`) and RLIMIT_CPU, and is killed after `wall`
seconds. Its result or exception comes back pickled; a child that hits a limit raises LimitExceeded."""
from __future__ import annotations

import os
import pickle
import resource
import select
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from appliance.core.errors import EXIT_BAD_INPUT, ApplianceError

T = TypeVar("T")
CHECK_MEM_BYTES = int(os.environ.get("APPLIANCE_CHECK_MEM_MB", "1024")) << 20  # beyond what the child starts with
CHECK_CPU_SECONDS = int(os.environ.get("APPLIANCE_CHECK_CPU_S", "120"))
MAX_RESULT_BYTES = 64 << 20


class LimitExceeded(ApplianceError):
    """The bounded child ran out of memory, CPU or time (or died): the input is refused."""

    exit_code = EXIT_BAD_INPUT


def _vm_bytes() -> int:
    """This process's address-space size now (Linux /proc/self/statm); 0 where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _child(w: int, fn: Callable[..., Any], args: tuple, kw: dict, mem: int, cpu: int) -> None:
    """In the fork: set the limits, run, send (ok, value, exit_code) pickled; never returns."""
    code = 0
    try:
        base = _vm_bytes()
        resource.setrlimit(resource.RLIMIT_AS, (base + mem if base else mem,) * 2)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        try:
            out: tuple = (True, fn(*args, **kw), None)
        except MemoryError:
            out = (False, LimitExceeded(f"ran out of its memory bound ({mem >> 20} MiB)"), None)
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
            out = (False, e, getattr(e, "exit_code", None))
        try:
            data = pickle.dumps(out)
        except Exception:  # noqa: BLE001 - an unpicklable result or exception: its text
            data = pickle.dumps((False, ApplianceError("".join(traceback.format_exception_only(out[1])).strip()
                                                       if not out[0] else "result not picklable"), out[2]))
        with os.fdopen(w, "wb") as f:
            f.write(data)
    except BaseException:  # noqa: BLE001
        code = 3
    finally:
        os._exit(code)


def _read_all(r: int, pid: int, deadline: float) -> bytes | None:
    """Everything the child writes until it closes the pipe; None when the wall-clock bound passes first."""
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            return None
        b = os.read(r, 1 << 16)
        if not b:
            return b"".join(chunks)
        size += len(b)
        if size > MAX_RESULT_BYTES:
            return None
        chunks.append(b)


def run_bounded(fn: Callable[..., T], *args: Any, mem_bytes: int = CHECK_MEM_BYTES, cpu_seconds: int = CHECK_CPU_SECONDS,
                wall: float | None = None, what: str = "the check", usage: dict | None = None, **kw: Any) -> T:
    """fn(*args, **kw) in a forked child bounded by `mem_bytes` more address space, `cpu_seconds` of CPU and
    `wall` seconds (default 2 x cpu + 10). Returns its value or raises its exception (exit_code kept);
    LimitExceeded naming `what` and the bound when it hit one. `usage`, if given, gets the child's
    maxrss_kb, utime and stime (from wait4)."""
    wall = 2.0 * cpu_seconds + 10 if wall is None else wall
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(w, fn, args, kw, mem_bytes, cpu_seconds)
    os.close(w)
    try:
        data = _read_all(r, pid, time.monotonic() + wall)
    finally:
        os.close(r)
    if data is None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status, ru = os.wait4(pid, 0)
    if usage is not None:
        usage.update(maxrss_kb=ru.ru_maxrss, utime=ru.ru_utime, stime=ru.ru_stime)
    return _outcome(data, status, what, mem_bytes, cpu_seconds, wall)


def _outcome(data: bytes | None, status: int, what: str, mem: int, cpu: int, wall: float) -> Any:
    if data is None:
        raise LimitExceeded(f"{what} took longer than {wall:.0f} s and was stopped; refused")
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL):
        raise LimitExceeded(f"{what} used more than {cpu} s of CPU and was stopped; refused")
    if not data:
        raise LimitExceeded(f"{what} died (status {status}; memory bound {mem >> 20} MiB, CPU {cpu} s); refused")
    ok, value, code = pickle.loads(data)
    if ok:
        return value
    if isinstance(value, LimitExceeded):
        raise LimitExceeded(f"{what} {value}; refused")
    if code is not None and isinstance(value, ApplianceError):
        value.exit_code = code
    raise value
