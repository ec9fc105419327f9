"""Stream access-log files (plain or compressed, oldest first) line by line into Figures, with the time and client filters."""
from __future__ import annotations

import ipaddress
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from appliance.core.errors import BadInput
from appliance.core.logfiles import open_text
from appliance.report.figures import Figures, Source
from appliance.report.parse import BadLine, parse_line

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_CLIENT_CACHE = 65536  # client addresses remembered by the --client test (cleared when full: memory stays bounded)


@dataclass
class Window:
    """Which records count: since <= time < until (epoch seconds, None: open), client inside `net` (None: any)."""

    since: float | None = None
    until: float | None = None
    net: Network | None = None

    def __post_init__(self) -> None:
        self._seen: dict[str, bool] = {}

    def client_ok(self, client: str) -> bool:
        ok = self._seen.get(client)
        if ok is None:
            if len(self._seen) >= _CLIENT_CACHE:
                self._seen.clear()
            try:
                ok = ipaddress.ip_address(client) in self.net  # type: ignore[operator]
            except ValueError:
                ok = False
            self._seen[client] = ok
        return ok

    def file_too_old(self, path: Path) -> bool:
        """A local file last written before `since` holds no record after it (a record's time is its start)."""
        try:
            return self.since is not None and os.stat(path).st_mtime < self.since
        except OSError:
            return False


def read_lines(lines: Iterable[str], src: Source, fig: Figures, window: Window, strict: bool = False) -> int:
    """Add the records among `lines` to `fig` (the hot loop); a line that is not a record is counted in `src` and
    `fig` (BadInput at once with --strict, naming file:line). Returns the number of lines read."""
    since, until, net = window.since, window.until, window.net
    add, n = fig.add, 0
    for n, line in enumerate(lines, 1):
        try:
            rec = parse_line(line)
        except BadLine as e:
            src.bad += 1
            fig.bad(f"{src.file}:{n}", str(e))
            if strict:
                raise BadInput(f"{src.file}:{n}: not a Squid access-log record: {e}") from None
            continue
        if (since is not None and rec.ts < since) or (until is not None and rec.ts >= until) or (
                net is not None and not window.client_ok(rec.client)):
            fig.skipped += 1
            continue
        add(rec)
    src.lines = n
    return n


def read_file(path: Path, fig: Figures, window: Window, strict: bool = False, node: str | None = None) -> Source:
    """read_lines() over one file (plain or compressed); a file that cannot be read or ends short (a cut .gz) is
    noted in its Source and the figures keep what was read (BadInput with --strict)."""
    src = Source(str(path), node)
    fig.sources.append(src)
    counted = _Counting()
    try:
        with open_text(path) as fh:
            read_lines(counted.wrap(fh), src, fig, window, strict)
    except (OSError, EOFError, zlib.error) as e:
        src.lines = counted.n
        src.error = f"{type(e).__name__}: {e}"
        if strict:
            raise BadInput(f"{src.file}: cannot read after line {counted.n}: {src.error}") from None
    return src


class _Counting:
    """Lines handed on so far, for the message when a read fails half-way."""

    def __init__(self) -> None:
        self.n = 0

    def wrap(self, lines: Iterable[str]) -> Iterator[str]:
        for self.n, line in enumerate(lines, 1):
            yield line


def read_all(paths: Iterable[Path], fig: Figures, window: Window, strict: bool = False, node: str | None = None,
             skip_old: bool = True) -> Figures:
    """read_file() for each path in order; with `skip_old`, files last written before --since are not opened."""
    for p in paths:
        if skip_old and window.file_too_old(p):
            continue
        read_file(p, fig, window, strict, node)
    return fig
