"""A log file and its rotations (logrotate's access.log.1, access.log.2.gz, dateext; newsyslog's .0.bz2), oldest first."""
from __future__ import annotations

import bz2
import gzip
import lzma
import re
from pathlib import Path
from typing import IO

COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# NAME.N[.gz|.bz2|.xz] (logrotate, newsyslog) and NAME-YYYYMMDD[HH][.gz|...] (logrotate dateext)
_ROTATION = r"(?:\.(?P<num>\d{1,4})|-(?P<date>\d{8}(?:\d{2})?))(?:\.gz|\.bz2|\.xz)?"


def rotation_re(base: str) -> re.Pattern[str]:
    """The names of `base`'s rotations in its directory (the live file itself not included)."""
    return re.compile(re.escape(base) + _ROTATION)


def rotations(live: Path) -> list[Path]:
    """The live file's rotations beside it, oldest first: dated ones by date, numbered ones highest number first
    (logrotate and newsyslog move .1 to .2, so the higher the number, the older); the live file is not included."""
    rx = rotation_re(live.name)
    found = []
    try:
        entries = list(live.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = rx.fullmatch(p.name)
        if m is None or not p.is_file():
            continue
        # dated first by date (older than any numbered one is not knowable: mixed schemes sort dated first)
        key = (0, m.group("date"), 0) if m.group("date") else (1, "", -int(m.group("num")))
        found.append((key, p))
    return [p for _, p in sorted(found)]


def with_rotations(live: Path) -> list[Path]:
    """rotations() then the live file (when it exists): every file of the log, oldest first."""
    return rotations(live) + ([live] if live.is_file() else [])


def open_text(path: Path) -> IO[str]:
    """A log file for reading lines, decompressed by its suffix (.gz, .bz2, .xz); undecodable bytes replaced."""
    opener = COMPRESSED.get(path.suffix)
    if opener is not None:
        return opener(path, "rt", encoding="utf-8", errors="replace")  # type: ignore[operator]
    return open(path, encoding="utf-8", errors="replace")
