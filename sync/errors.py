"""Sync errors and their exit codes (shared by push, receive and the forced-command dispatcher)."""
from __future__ import annotations

OK = 0
PEER_FAILED = 1  # one or more peers failed (unreachable, transfer cut, refused)
BAD_INPUT = 2  # bad payload, bad arguments, config that does not validate
SPLIT_BRAIN = 3  # the peer also says MASTER
STALE = 4  # the peer's live generation is newer (or diverged) and --force was not given
BUSY = 5  # another sync holds the lock


class SyncError(Exception):
    """A sync failure with the process exit code it maps to."""

    def __init__(self, message: str, code: int = BAD_INPUT):
        super().__init__(message)
        self.code = code
