"""The speaker's --advskew-file: its own advskew, changed live by the supervisor (health demotion, admin demote)."""
from __future__ import annotations

import logging

from appliance.ha.watched import WatchedFile

MAX_BYTES = 64


class AdvskewFile(WatchedFile):
    """One number 0-254 on the first line, re-read when the file's mtime, size or inode changes (looked at no more
    than once per `every` seconds, or at once when asked). A file that is missing or does not parse is logged once
    per version and changes nothing: the speaker keeps the advskew it has."""

    what, keeps = "advskew file", "the advskew stays"

    def __init__(self, path: str, logger: logging.Logger, every: float = 0.25) -> None:
        super().__init__(path, logger, every)

    def read(self) -> int:
        """The file's advskew now; OSError or ValueError when it cannot be used."""
        raw = self.read_bytes(MAX_BYTES)
        line = raw.decode("ascii", "replace").split("\n", 1)[0].strip()
        if not line.isdigit() or not 0 <= int(line) <= 254:
            raise ValueError(f"{self.path}:1: advskew must be a number 0-254 (got {line[:20]!r})")
        return int(line)

    def initial(self, default: int) -> int:
        """At start: the file's advskew, else (logged) `default` from --advskew."""
        try:
            return self.read()
        except (OSError, ValueError) as e:
            self.log.warning("advskew file not used at start, advskew %d: %s", default, getattr(e, "strerror", None) or e)
            return default
