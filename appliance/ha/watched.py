"""A small file the speaker re-reads when it changes (mtime, size or inode), at most once per interval."""
from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod


class WatchedFile(ABC):
    """Subclasses give read() (the value now; OSError or ValueError when unusable), `what` (for the log) and `keeps`
    (what stays when the file cannot be used). A missing or bad file is logged once per version and changes nothing."""

    what = "file"
    keeps = "the previous value stays"

    def __init__(self, path: str, logger: logging.Logger, every: float = 1.0) -> None:
        self.path, self.log, self.every = path, logger, every
        self._sig: tuple | None = None
        self._next = 0.0

    @abstractmethod
    def read(self):
        """The file's value now; OSError or ValueError when it cannot be used."""

    def read_bytes(self, limit: int) -> bytes:
        """The file's bytes, recording the version read (what poll() compares); ValueError above `limit` bytes."""
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            self._sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            raw = f.read(limit + 1)
        if len(raw) > limit:
            raise ValueError(f"{self.path}: longer than {limit} bytes")
        return raw

    def poll(self, now: float, force: bool = False):
        """The new value when the file changed since the last look, else None (also when it is unusable)."""
        if now < self._next and not force:
            return None
        self._next = now + self.every
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._sig != ("missing",):
                self._sig = ("missing",)
                self.log.warning("%s %s: %s; %s", self.what, self.path, e.strerror, self.keeps)
            return None
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._sig:
            return None
        try:
            return self.read()
        except (OSError, ValueError) as e:
            self.log.warning("%s not used, %s: %s", self.what, self.keeps, getattr(e, "strerror", None) or e)
            return None
