"""Sync errors, their exit codes, and the JSON reply a peer's sync-serve sends for each command."""
from __future__ import annotations

from appliance.core.errors import ApplianceError

OK = 0
PEER_FAILED = 1  # one or more peers failed (unreachable, transfer cut, refused)
BAD_INPUT = 2  # bad payload, bad arguments, config that does not validate
SPLIT_BRAIN = 3  # the peer also says MASTER
STALE = 4  # the peer's live generation is newer (or diverged) and --force was not given
BUSY = 5  # another sync holds the lock
CODES = (OK, PEER_FAILED, BAD_INPUT, SPLIT_BRAIN, STALE, BUSY)


class SyncError(ApplianceError):
    """A sync failure with the process exit code it maps to."""

    def __init__(self, message: str, code: int = BAD_INPUT):
        super().__init__(message, code)


def failure_reply(e: SyncError) -> dict:
    """What sync-serve prints on stdout when a command fails (the exit status carries the same code)."""
    return {"ok": False, "code": e.exit_code, "error": str(e)}


def from_reply(data: object, exit_status: int, fallback: str) -> dict:
    """A peer's reply as a dict; a failure reply (or a failed exit without one) raised as SyncError.

    `fallback` says what happened when the peer answered nothing readable (an older peer, a crash)."""
    if isinstance(data, dict) and data.get("ok") is False:
        code = data.get("code")
        raise SyncError(str(data.get("error") or fallback), code if code in CODES[2:] else PEER_FAILED)
    if exit_status != 0 or not isinstance(data, dict):
        raise SyncError(fallback, exit_status if exit_status in CODES[2:] else PEER_FAILED)
    return data
