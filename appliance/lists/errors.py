"""The list update's errors and exit codes (a refusal is bad input: exit 2; a failed download or tool: exit 1)."""
from __future__ import annotations

from appliance.core.errors import EXIT_BAD_INPUT, EXIT_FAILED, ApplianceError


class ListsError(ApplianceError):
    """An update refused or failed; the live lists and the sync generation are as they were."""

    exit_code = EXIT_BAD_INPUT


def refused(message: str) -> ListsError:
    return ListsError(message, EXIT_BAD_INPUT)


def failed(message: str) -> ListsError:
    return ListsError(message, EXIT_FAILED)
