"""One Squid native access-log line as a Record, with the appliance's optional trailing tag (block:, refused:, denied:)."""
from __future__ import annotations

from typing import NamedTuple

TAG_KINDS = ("block", "refused", "denied")


class BadLine(ValueError):
    """A line that is not a Squid native record; the message says which field."""


class Record(NamedTuple):
    """The ten Squid fields (`%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`) and the tag."""

    ts: float
    elapsed_ms: int
    client: str
    code: str
    status: int
    size: int
    method: str
    url: str
    user: str
    hier: str
    peer: str
    mime: str
    tag_kind: str | None  # block | refused | denied | None (no tag: an allowed request, or a plain Squid log)
    tag_name: str | None  # the category, the refusal reason, or "client"

    @property
    def denied(self) -> bool:
        return self.code == "TCP_DENIED" or self.tag_kind is not None


def parse_tag(fields: list[str]) -> tuple[str | None, str | None]:
    """The appliance's tag among the fields after Squid's ten (other bracketed extras, e.g. Squid's log_mime_hdrs,
    are skipped); (None, None) when there is none."""
    for f in fields:
        if len(f) > 2 and f[0] == "[" and f[-1] == "]":
            kind, sep, name = f[1:-1].partition(":")
            if sep and kind in TAG_KINDS and name:
                return kind, name
    return None, None


def parse_line(line: str) -> Record:
    """A Record; BadLine naming the field when the line is not a Squid native record."""
    f = line.split()
    if len(f) < 10:
        raise BadLine(f"{len(f)} fields, a Squid native record has 10" if f else "empty line")
    try:
        ts = float(f[0])
    except ValueError:
        raise BadLine(f"time {f[0][:40]!r} is not seconds.milliseconds") from None
    if not 0 <= ts < 1e11:
        raise BadLine(f"time {f[0][:40]!r} out of range")
    code, slash, status = f[3].partition("/")
    hier, slash2, peer = f[8].partition("/")
    if not slash or not code or not slash2:
        raise BadLine(f"result {f[3][:40]!r} or hierarchy {f[8][:40]!r} is not CODE/VALUE")
    try:
        elapsed, st, size = int(f[1]), int(status), int(f[4])
    except ValueError:
        raise BadLine(f"elapsed {f[1][:20]!r}, status {status[:20]!r} or size {f[4][:20]!r} is not a number") from None
    kind, name = parse_tag(f[10:]) if len(f) > 10 else (None, None)
    return Record(ts, elapsed, f[2], code, st, size, f[5], f[6], f[7], hier, peer, f[9], kind, name)


def host_of(url: str, method: str = "") -> str:
    """The host a URL or CONNECT target names, lower case, without user info and port ("-" when there is none)."""
    if method == "CONNECT" or "://" not in url:
        rest = url
    else:
        rest = url.split("://", 1)[1]
    rest = rest.split("/", 1)[0].split("?", 1)[0]
    rest = rest.rpartition("@")[2]
    if rest.startswith("["):
        return rest[: rest.find("]") + 1].lower() or "-"
    return rest.split(":", 1)[0].lower() or "-"
