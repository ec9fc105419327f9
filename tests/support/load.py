"""A bounded CPU load: two busy loops per core for a given time (the fast liveness layer's saturated runs)."""
from __future__ import annotations

import multiprocessing
import os
import time


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def saturate(seconds: float) -> int:
    """Both cores busy for `seconds` (two busy loops per core, each bounded by the same time); returns how many."""
    ctx = multiprocessing.get_context("fork")
    burners = [ctx.Process(target=_burn, args=(seconds,)) for _ in range(2 * (os.cpu_count() or 2))]
    for b in burners:
        b.start()
    try:
        for b in burners:
            b.join(timeout=seconds + 30)
    finally:
        for b in burners:
            if b.is_alive():
                b.kill()
    return len(burners)
