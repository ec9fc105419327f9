"""What was read from a squidGuard.conf: times, destinations, sources, acls, and the notes on what is not carried."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional

TERMINATORS = {"all": True, "any": True, "none": False}
IN_ADDR = "in-addr"


@dataclass(frozen=True)
class Note:
    """A construct not carried over exactly: where, what, why, and whether decisions may differ because of it."""
    path: str
    line: int
    what: str
    why: str
    decisions: bool = True

    def __str__(self) -> str:
        tag = "decisions may differ" if self.decisions else "no effect on decisions"
        return f"{self.path}:{self.line}: {self.what}: {self.why} [{tag}]"

    def to_json(self) -> dict:
        return {"file": self.path, "line": self.line, "what": self.what, "why": self.why,
                "decisions_may_differ": self.decisions}


@dataclass
class TimeElem:
    line: int
    days: frozenset[int]  # 0 = Monday
    spans: list[tuple[int, int]]  # minutes [from, to)


@dataclass
class TimeDef:
    name: str
    line: int
    weekly: list[TimeElem] = field(default_factory=list)
    dates: list[tuple[int, str]] = field(default_factory=list)  # (line, text): not carried


@dataclass(frozen=True)
class TimeRef:
    mode: str  # within | outside
    name: str
    line: int


@dataclass(frozen=True)
class ListRef:
    kind: str  # domains | urls | expressions
    path: str
    line: int


@dataclass
class Dest:
    name: str
    line: int
    lists: list[ListRef] = field(default_factory=list)
    time: Optional[TimeRef] = None
    has_redirect: bool = False  # a dest with a redirect only is active yet never matches


@dataclass
class Source:
    name: str
    line: int
    nets: list[ipaddress.IPv4Network] = field(default_factory=list)
    has_ip: bool = False
    iplists: list[tuple[int, str]] = field(default_factory=list)  # (line, file): read against dbhome
    other: list[tuple[int, str]] = field(default_factory=list)  # (line, keyword): user/domain/ldap criteria
    time: Optional[TimeRef] = None
    cont: Optional[int] = None  # line of `continue`


@dataclass(frozen=True)
class PassItem:
    name: str
    allow: bool
    line: int


@dataclass
class Branch:
    line: int
    passes: Optional[list[PassItem]] = None  # None: no `pass` statement (SquidGuard then uses the default's)


@dataclass
class Acl:
    name: str
    line: int
    time: Optional[TimeRef]
    branch: Branch
    orelse: Optional[Branch] = None


@dataclass
class SgConfig:
    path: str
    dbhome: Optional[str] = None
    dbhome_line: int = 0
    times: dict[str, TimeDef] = field(default_factory=dict)
    dests: dict[str, Dest] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    acls: list[Acl] = field(default_factory=list)
    default: Optional[Acl] = None
    notes: list[Note] = field(default_factory=list)

    def note(self, line: int, what: str, why: str, decisions: bool = True) -> None:
        self.notes.append(Note(self.path, line, what, why, decisions))

    def source(self, name: str) -> Optional[Source]:
        return next((s for s in self.sources if s.name == name), None)
