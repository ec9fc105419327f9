"""Policy schedules: day ranges and time ranges in local time, e.g. "mon-fri 08:00-17:00; sat 09:00-12:00"."""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_ALIASES = {"daily": "mon-sun", "*": "mon-sun", "weekdays": "mon-fri", "weekend": "sat-sun"}
_TIME = re.compile(r"^([01]?\d|2[0-4]):([0-5]\d)$")


@dataclass(frozen=True)
class Clause:
    days: frozenset[int]  # 0 = Monday
    spans: tuple[tuple[int, int], ...]  # minutes since midnight, [start, end); end < start wraps midnight

    def matches(self, when: dt.datetime) -> bool:
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        for start, end in self.spans:
            if start < end:
                if day in self.days and start <= minute < end:
                    return True
            else:  # crosses midnight: the part after midnight belongs to the previous day's range
                if day in self.days and minute >= start:
                    return True
                if (day - 1) % 7 in self.days and minute < end:
                    return True
        return False


@dataclass(frozen=True)
class ScheduleSpec:
    text: str
    clauses: tuple[Clause, ...]

    def matches(self, when: dt.datetime) -> bool:
        return any(c.matches(when) for c in self.clauses)

    def __str__(self) -> str:
        return self.text


def _days(spec: str) -> frozenset[int]:
    spec = _ALIASES.get(spec, spec)
    out: set[int] = set()
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            if a not in DAYS or b not in DAYS:
                raise ValueError(f"unknown day in {part!r} (use mon..sun)")
            i, j = DAYS.index(a), DAYS.index(b)
            out |= {d % 7 for d in range(i, i + ((j - i) % 7) + 1)}
        else:
            if part not in DAYS:
                raise ValueError(f"unknown day {part!r} (use mon..sun, daily, weekdays, weekend)")
            out.add(DAYS.index(part))
    return frozenset(out)


def _minutes(t: str) -> int:
    m = _TIME.match(t)
    if not m or (m.group(1) == "24" and m.group(2) != "00"):
        raise ValueError(f"bad time {t!r} (use HH:MM, 00:00-24:00)")
    return int(m.group(1)) * 60 + int(m.group(2))


def parse(text: str) -> ScheduleSpec:
    """Parse `DAYS [HH:MM-HH:MM[,HH:MM-HH:MM...]]` clauses joined by ';'."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("must be a schedule such as 'mon-fri 08:00-17:00'")
    clauses = []
    for raw in text.split(";"):
        words = raw.strip().lower().split()
        if not words or len(words) > 2:
            raise ValueError(f"bad clause {raw.strip()!r} (expected 'DAYS [HH:MM-HH:MM,...]')")
        if _TIME.match(words[0].split("-")[0]) and len(words) == 1:
            words = ["daily", words[0]]
        days = _days(words[0])
        spans = []
        for span in (words[1].split(",") if len(words) == 2 else ["00:00-24:00"]):
            if "-" not in span:
                raise ValueError(f"bad time range {span!r} (expected HH:MM-HH:MM)")
            a, b = span.split("-", 1)
            start, end = _minutes(a), _minutes(b)
            if start == end:
                raise ValueError(f"empty time range {span!r}")
            spans.append((start, end % 1440 if end != 1440 else 1440))
        clauses.append(Clause(days, tuple(spans)))
    return ScheduleSpec(" ".join(text.split()), tuple(clauses))


def _coerce(v: Any) -> ScheduleSpec:
    return v if isinstance(v, ScheduleSpec) else parse(v)


Schedule = Annotated[ScheduleSpec, BeforeValidator(_coerce), PlainSerializer(str, return_type=str)]
