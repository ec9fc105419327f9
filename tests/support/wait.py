"""One bounded wait: poll a condition until it holds or a deadline passes, then fail with a message."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


class Timeout(AssertionError):
    """The condition did not hold before the deadline."""


def wait_until(pred: Callable[[], T], timeout: float, message: str = "", step: float = 0.05) -> T:
    """The first truthy value of pred() within timeout seconds; else Timeout naming message and the last value."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise Timeout(f"{message or 'condition'} not met within {timeout:g} s (last value {v!r})")
        time.sleep(step)


def poll(pred: Callable[[], T], timeout: float, step: float = 0.05) -> T:
    """Like wait_until, but returns the last (falsy) value at the deadline instead of failing."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(step)
