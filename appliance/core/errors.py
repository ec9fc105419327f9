"""The one exception base: a message for the user and the process exit code it maps to."""
from __future__ import annotations

import sys

# Exit codes every command shares; sync adds its own (sync/errors.py), image its own (image/errors.py).
EXIT_OK = 0
EXIT_FAILED = 1  # something did not work (a tool, a peer, a running process)
EXIT_BAD_INPUT = 2  # the input is wrong: config, arguments, payload


class ApplianceError(Exception):
    """An error for the user. `appliance` prints it as `appliance: error: ...` (one line per line) and exits
    with `exit_code`; nothing else prints or parses that text."""

    exit_code: int = EXIT_FAILED

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        # set by a command that already showed the error in its own format (a --json report)
        self.reported = False

    @property
    def message(self) -> str:
        return str(self)


def report(e: ApplianceError) -> int:
    """The one place an error becomes `appliance: error: ...` lines on stderr (for the CLI and the CARP scripts'
    entry, appliance/ha/transition.py); returns the exit status."""
    if not e.reported:
        for line in str(e).splitlines() or ["error"]:
            print(f"appliance: error: {line}", file=sys.stderr, flush=True)
    return e.exit_code


class BadInput(ApplianceError, ValueError):
    """Input that is wrong (an argument, a value): exit 2. Also a ValueError, for callers that validate."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(ApplianceError):
    """A config problem, already formatted as `file:line: field: message (got value)`."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]
