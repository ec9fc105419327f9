"""Prometheus text exposition read back into numbers (the proxy's /metrics, for status and the status page)."""
from __future__ import annotations


def parse(text: str) -> dict[str, float]:
    """{"name{labels}": value} from Prometheus text (comments and unreadable lines skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out
