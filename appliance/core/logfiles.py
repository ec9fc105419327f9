"""A log file and its rotations (logrotate's access.log.1, access.log.2.gz, dateext; newsyslog's .0.bz2), oldest first."""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import stat
from pathlib import Path
from typing import IO, BinaryIO, Iterable

COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_BINARY = {".gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile}
# NAME.N[.gz|.bz2|.xz] (logrotate, newsyslog) and NAME-YYYYMMDD[HH][.gz|...] (logrotate dateext)
_ROTATION = r"(?:\.(?P<num>\d{1,4})|-(?P<date>\d{8}(?:\d{2})?))(?:\.gz|\.bz2|\.xz)?"
LOG_DIR = Path("/var/log/appliance")  # where the packages and images put the proxy's log (docs/security.md)
LOG_DIR_ENV = "APPLIANCE_LOG_DIR"  # node-local override (tests, a hand install); never from the synced config


def log_dir() -> Path:
    """This node's log directory: $APPLIANCE_LOG_DIR, else /var/log/appliance. Node-local, never synced."""
    return Path(os.environ.get(LOG_DIR_ENV) or LOG_DIR)


def rotation_re(base: str) -> re.Pattern[str]:
    """The names of `base`'s rotations in its directory (the live file itself not included)."""
    return re.compile(re.escape(base) + _ROTATION)


def rotation_names(base: str, names: Iterable[str]) -> list[str]:
    """The names among `names` that are `base`'s rotations, oldest first: dated ones by date, numbered ones highest
    number first (logrotate and newsyslog move .1 to .2, so the higher the number, the older)."""
    rx = rotation_re(base)
    found = []
    for name in names:
        m = rx.fullmatch(name)
        if m is None:
            continue
        # dated first by date (older than any numbered one is not knowable: mixed schemes sort dated first)
        key = (0, m.group("date"), 0) if m.group("date") else (1, "", -int(m.group("num")))
        found.append((key, name))
    return [n for _, n in sorted(found)]


def rotations(live: Path) -> list[Path]:
    """The live file's rotations beside it (regular files), oldest first; the live file is not included."""
    try:
        names = [p.name for p in live.parent.iterdir() if p.is_file()]
    except OSError:
        return []
    return [live.with_name(n) for n in rotation_names(live.name, names)]


def with_rotations(live: Path) -> list[Path]:
    """rotations() then the live file (when it exists): every file of the log, oldest first."""
    return rotations(live) + ([live] if live.is_file() else [])


def open_text(path: Path) -> IO[str]:
    """A log file for reading lines, decompressed by its suffix (.gz, .bz2, .xz); undecodable bytes replaced."""
    opener = COMPRESSED.get(path.suffix)
    if opener is not None:
        return opener(path, "rt", encoding="utf-8", errors="replace")  # type: ignore[operator]
    return open(path, encoding="utf-8", errors="replace")


def open_regular(name: str, dir_fd: int) -> int | None:
    """An fd of the regular file `name` directly in the directory `dir_fd`, never through a symlink and never
    blocking on a FIFO; None when it is missing, a link or not a regular file (a device, /proc file, FIFO)."""
    if "/" in name or name in ("", ".", ".."):
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:  # missing, a symlink (ELOOP), not readable: not served
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def open_binary(fd: int, name: str) -> BinaryIO:
    """The bytes of an open log file, decompressed by the suffix of `name` (.gz, .bz2, .xz); takes the fd."""
    raw = io.open(fd, "rb", closefd=True)
    opener = _BINARY.get(Path(name).suffix)
    if opener is None:
        return raw
    return _Closing(opener(raw), raw)  # type: ignore[operator, return-value]


class _Closing(io.BufferedIOBase):
    """A decompressing reader that also closes the file under it (GzipFile and friends leave a fileobj open)."""

    def __init__(self, inner: BinaryIO, under: BinaryIO):
        self.inner, self.under = inner, under

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> bytes:  # type: ignore[override]
        return self.inner.readline(-1 if size is None else size)

    def read(self, size: int | None = -1) -> bytes:
        return self.inner.read(-1 if size is None else size)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.under.close()
            super().close()
